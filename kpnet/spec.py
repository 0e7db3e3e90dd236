"""Keypoint specifications: names, flip pairs, skeleton, OKS sigmas and the channel map.

A :class:`KeypointSpec` describes *what* a model predicts. The channel map says which
heatmap channel each keypoint is drawn into; several keypoints may share one channel
(the two-pin detector draws both pins into channel 0).

Example:
    >>> spec = KeypointSpec(names=("left_pin", "right_pin"), channel_map=(0, 0))
    >>> spec.num_keypoints, spec.num_channels
    (2, 1)
    >>> coco = KeypointSpec.coco17()
    >>> coco.flip_index[:3]
    (0, 2, 1)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

COCO17_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)  # fmt: skip
COCO17_SIGMAS = (
    0.026, 0.025, 0.025, 0.035, 0.035, 0.079, 0.079, 0.072, 0.072,
    0.062, 0.062, 0.107, 0.107, 0.087, 0.087, 0.089, 0.089,
)  # fmt: skip
COCO17_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
COCO17_SKELETON = (
    (15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7),
    (6, 8), (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6),
)  # fmt: skip


class SpecError(ValueError):
    """A keypoint specification is inconsistent; the message names the field."""


@dataclass(frozen=True)
class KeypointSpec:
    """What a keypoint model predicts.

    Args:
        names: one unique name per keypoint (K names).
        flip_pairs: index pairs (i, j) swapped by a horizontal flip.
        skeleton: index pairs drawn as limbs.
        sigmas: per-keypoint OKS sigmas (K values), or None when unknown (no OKS AP).
        channel_map: heatmap channel of each keypoint (K values); default one per keypoint.
    """

    names: tuple[str, ...]
    flip_pairs: tuple[tuple[int, int], ...] = ()
    skeleton: tuple[tuple[int, int], ...] = ()
    sigmas: tuple[float, ...] | None = None
    channel_map: tuple[int, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        object.__setattr__(self, "flip_pairs", _pairs(self.flip_pairs))
        object.__setattr__(self, "skeleton", _pairs(self.skeleton))
        if self.sigmas is not None:
            object.__setattr__(self, "sigmas", tuple(float(s) for s in self.sigmas))
        if self.channel_map is not None:
            object.__setattr__(self, "channel_map", tuple(int(c) for c in self.channel_map))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        k = len(self.names)
        if k == 0:
            raise SpecError("spec.names: at least one keypoint name is required")
        dupes = sorted({n for n in self.names if self.names.count(n) > 1})
        if dupes:
            raise SpecError(f"spec.names: duplicate keypoint names {dupes}")
        for key in ("flip_pairs", "skeleton"):
            for i, j in getattr(self, key):
                if not (0 <= i < k and 0 <= j < k):
                    raise SpecError(
                        f"spec.{key}: pair ({i}, {j}) is out of range for {k} keypoints "
                        f"(valid indices 0..{k - 1})"
                    )
        seen: set[int] = set()
        for i, j in self.flip_pairs:
            if i == j or i in seen or j in seen:
                raise SpecError(f"spec.flip_pairs: keypoint {i} or {j} appears twice")
            seen.update((i, j))
        if self.sigmas is not None:
            if len(self.sigmas) != k:
                raise SpecError(f"spec.sigmas: {len(self.sigmas)} values for {k} keypoints")
            if any(s <= 0 for s in self.sigmas):
                raise SpecError("spec.sigmas: every sigma must be > 0")
        if self.channel_map is not None:
            if len(self.channel_map) != k:
                raise SpecError(
                    f"spec.channel_map: {len(self.channel_map)} values for {k} keypoints"
                )
            used = sorted(set(self.channel_map))
            if used != list(range(len(used))):
                raise SpecError(
                    f"spec.channel_map: channels must be 0..C-1 with none skipped, got {used}"
                )
            for i, j in self.flip_pairs:
                ci, cj = self.channel_map[i], self.channel_map[j]
                if ci != cj and (self.channel_map.count(ci) > 1 or self.channel_map.count(cj) > 1):
                    raise SpecError(
                        f"spec.flip_pairs: pair ({i}, {j}) swaps shared channels {ci} and {cj}"
                    )

    # ------------------------------------------------------------------ derived views
    @property
    def num_keypoints(self) -> int:
        return len(self.names)

    @property
    def channels(self) -> tuple[int, ...]:
        """Channel of each keypoint (identity when no channel map is given)."""
        return self.channel_map if self.channel_map is not None else tuple(range(len(self.names)))

    @property
    def num_channels(self) -> int:
        return max(self.channels) + 1

    @property
    def shares_channels(self) -> bool:
        """True when some heatmap channel holds several keypoints (multi-peak decoding)."""
        return self.num_channels < self.num_keypoints

    @property
    def flip_index(self) -> tuple[int, ...]:
        """Permutation of keypoints under a horizontal flip."""
        perm = list(range(self.num_keypoints))
        for i, j in self.flip_pairs:
            perm[i], perm[j] = j, i
        return tuple(perm)

    @property
    def channel_flip_index(self) -> tuple[int, ...]:
        """Permutation of heatmap channels under a horizontal flip."""
        perm = list(range(self.num_channels))
        for i, j in self.flip_pairs:
            ci, cj = self.channels[i], self.channels[j]
            perm[ci], perm[cj] = cj, ci
        return tuple(perm)

    def keypoints_in_channel(self, channel: int) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.channels) if c == channel)

    # ------------------------------------------------------------------ construction
    @classmethod
    def coco17(cls) -> KeypointSpec:
        """The 17 COCO person keypoints with the official OKS sigmas."""
        return cls(COCO17_NAMES, COCO17_FLIP_PAIRS, COCO17_SKELETON, COCO17_SIGMAS)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> KeypointSpec:
        """Build from a mapping; pairs may name keypoints (``[left_eye, right_eye]``)."""
        data = dict(data)
        if data.get("preset"):
            preset = data.pop("preset")
            if preset != "coco17":
                raise SpecError(f"spec.preset: unknown preset {preset!r} (known: 'coco17')")
            base = cls.coco17().to_dict()
            base.update({k: v for k, v in data.items() if v is not None})
            data = base
        unknown = set(data) - {"names", "flip_pairs", "skeleton", "sigmas", "channel_map"}
        if unknown:
            raise SpecError(f"spec: unknown keys {sorted(unknown)}")
        if "names" not in data:
            raise SpecError("spec.names: required")
        names = tuple(data["names"])
        index = {n: i for i, n in enumerate(names)}

        def resolve(key: str) -> tuple[tuple[int, int], ...]:
            out = []
            for pair in data.get(key) or ():
                if len(pair) != 2:
                    raise SpecError(f"spec.{key}: {pair!r} is not a pair")
                ij = []
                for p in pair:
                    if isinstance(p, str):
                        if p not in index:
                            raise SpecError(f"spec.{key}: unknown keypoint name {p!r}")
                        p = index[p]
                    ij.append(int(p))
                out.append((ij[0], ij[1]))
            return tuple(out)

        return cls(
            names=names,
            flip_pairs=resolve("flip_pairs"),
            skeleton=resolve("skeleton"),
            sigmas=data.get("sigmas"),
            channel_map=data.get("channel_map"),
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["names"] = list(self.names)
        d["flip_pairs"] = [list(p) for p in self.flip_pairs]
        d["skeleton"] = [list(p) for p in self.skeleton]
        d["sigmas"] = list(self.sigmas) if self.sigmas is not None else None
        d["channel_map"] = list(self.channel_map) if self.channel_map is not None else None
        return d


def _pairs(pairs: Sequence[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    out = []
    for p in pairs:
        if len(p) != 2:
            raise SpecError(f"spec: {p!r} is not a pair of keypoint indices")
        out.append((int(p[0]), int(p[1])))
    return tuple(out)
