"""Sharded TFRecord datasets: the original encoded images plus their instance records.

``kpnet data convert SOURCE --to tfrecord -o DIR --shards N`` writes ``DIR/index.json`` and
``DIR/shard-00000-of-0000N.tfrecord`` ...; ``data.source: tfrecord`` (or
:func:`load_tfrecord_set` + :func:`kpnet.data.pipeline.build_dataset`) trains from them.
DIR may be any path ``tf.io.gfile`` knows (``gs://bucket/coco-train``, ``ram://...``).

- one ``tf.train.Example`` per image file: its bytes as they are on disk (JPEG / PNG, not
  re-encoded), (height, width), and all of its instances (boxes, keypoints, record ids, the
  record's position in the converted list);
- shards are contiguous runs of images, balanced by bytes; the index holds the format
  version, the keypoint spec, per-shard image / instance / byte counts and a table of image
  sizes, so start-up reads one small json whatever the dataset's size;
- reading streams the files: per epoch the shard order is permuted (stateless, seeded),
  up to 16 shards are read interleaved, images pass a shuffle buffer, and blocks of 64
  images get their crop geometry in one batched graph call (the same functions as the
  folder pipeline, :mod:`kpnet.data.pipeline`); nothing of the dataset becomes a graph
  constant. Under tf.distribute each input pipeline (worker) reads only its own shards
  (``files[i::n]``), so a dataset needs at least as many shards as workers.

Without shuffling (evaluation) images come in the converted order, so the crops equal the
folder pipeline's. With augmentation the random draws are keyed by (seed, epoch, block), not
by record: the distribution is the folder pipeline's, the individual draws are not.

Example:
    >>> import numpy as np, cv2, tempfile, os
    >>> from kpnet.data.records import InstanceRecord
    >>> from kpnet.spec import KeypointSpec
    >>> folder = tempfile.mkdtemp()
    >>> _ = cv2.imwrite(os.path.join(folder, "a.png"), np.zeros((40, 60, 3), np.uint8))
    >>> kp = np.array([[10, 12, 2], [30, 11, 2]], np.float32)
    >>> records = [InstanceRecord(os.path.join(folder, "a.png"), (5, 5, 30, 20), kp)]
    >>> spec = KeypointSpec(names=("l", "r"), flip_pairs=((0, 1),))
    >>> tset = write_tfrecords(records, spec, "ram://kpnet-doc/tfr", shards=1)
    >>> len(tset), tset.num_images, load_tfrecord_set("ram://kpnet-doc/tfr").image_sizes
    (1, 1, [[40, 60, 1]])
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from kpnet import fs
from kpnet.data.columns import Columns, check_files, group, record_arrays
from kpnet.data.images import JPEG_MAGIC
from kpnet.data.records import DataError, InstanceRecord, RecordTable
from kpnet.spec import KeypointSpec

INDEX = "index.json"
FORMAT = "kpnet-tfrecord"
VERSION = 1
#: Default shard size when ``shards`` is not given (TensorFlow suggests 100-200 MB).
SHARD_BYTES = 128 * 2**20

_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/path": tf.io.FixedLenFeature([], tf.string),
    "image/id": tf.io.FixedLenFeature([], tf.int64),
    "image/height": tf.io.FixedLenFeature([], tf.int64),
    "image/width": tf.io.FixedLenFeature([], tf.int64),
    "instance/box": tf.io.RaggedFeature(tf.float32),
    "instance/keypoints": tf.io.RaggedFeature(tf.float32),
    "instance/record_id": tf.io.RaggedFeature(tf.int64),
    "instance/index": tf.io.RaggedFeature(tf.int64),
    "instance/score": tf.io.RaggedFeature(tf.float32),
}


@dataclass(frozen=True)
class TFRecordSet:
    """A converted dataset: its folder, shard files and index (no record is loaded).

    ``len()`` is the number of instances; pass it to :func:`kpnet.data.pipeline.build_dataset`
    in place of a record list.
    """

    root: str
    files: tuple[str, ...]
    spec: KeypointSpec
    num_images: int
    shard_records: tuple[int, ...]
    shard_images: tuple[int, ...]
    image_sizes: list[list[int]]

    def __len__(self) -> int:
        return sum(self.shard_records)

    def __bool__(self) -> bool:
        return len(self) > 0


# --------------------------------------------------------------------------- writing
def _feature(values, kind: str) -> tf.train.Feature:
    if kind == "bytes":
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))
    if kind == "int":
        return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
    return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def _example(data: bytes, path: str, hw, members: np.ndarray, cols: Columns) -> bytes:
    feats = {
        "image/encoded": _feature([data], "bytes"),
        "image/path": _feature([path.encode("utf-8")], "bytes"),
        "image/id": _feature([int(cols.image_ids[members[0]])], "int"),
        "image/height": _feature([int(hw[0])], "int"),
        "image/width": _feature([int(hw[1])], "int"),
        "instance/box": _feature(cols.boxes[members].reshape(-1).tolist(), "float"),
        "instance/keypoints": _feature(cols.keypoints[members].reshape(-1).tolist(), "float"),
        "instance/record_id": _feature(cols.record_ids[members].tolist(), "int"),
        "instance/index": _feature(members.tolist(), "int"),
        "instance/score": _feature(cols.scores[members].tolist(), "float"),
    }
    return tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString()


def _split_shards(sizes: Sequence[int], shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous [start, end) runs of images with about equal bytes, none empty.

    Example:
        >>> _split_shards([5, 5, 5, 5, 10], 2)
        [(0, 3), (3, 5)]
    """
    n = len(sizes)
    shards = max(1, min(shards, n))
    cum = np.cumsum(sizes, dtype=np.float64)
    cuts = [0]
    for s in range(1, shards):
        cut = int(np.searchsorted(cum, cum[-1] * s / shards, side="left")) + 1
        cuts.append(min(max(cut, cuts[-1] + 1), n - (shards - s)))
    cuts.append(n)
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def write_tfrecords(
    records: Sequence[InstanceRecord],
    spec: KeypointSpec,
    out_dir: str | os.PathLike,
    shards: int | None = None,
    on_error: str = "raise",
    source: str = "",
) -> TFRecordSet:
    """Write ``records`` and their image files as a sharded TFRecord set in ``out_dir``.

    Images are checked first (readable JPEG / PNG, see :mod:`kpnet.data.pipeline`); a bad
    one raises :class:`DataError` naming it, or with ``on_error="skip"`` its records are
    left out. ``shards`` defaults to one per :data:`SHARD_BYTES` of images. Every file is
    written under a temporary name and renamed; ``index.json`` comes last, so a set without
    an index is unfinished. A folder that already holds a set is refused.
    """
    out = os.fspath(out_dir)
    if fs.exists(fs.join(out, INDEX)):
        raise DataError(f"{out}: already holds a TFRecord set ({INDEX}); choose another output "
                        "folder or delete it first")  # fmt: skip
    if not isinstance(records, RecordTable):
        records = list(records)
    if not len(records):
        raise DataError(f"{source or out}: no records to convert")
    if shards is not None and int(shards) < 1:
        raise DataError(f"--shards must be >= 1, got {shards}")
    cols = record_arrays(records, spec)
    keep, sizes, _, _ = check_files(cols, records, on_error, check=True)
    groups = group(cols, keep, consecutive=False)
    if not len(groups):
        raise DataError(f"{source or out}: every record's image file is unusable")
    paths = [cols.paths[j] for j in groups.path_index.tolist()]
    splits = groups.splits
    nbytes = [fs.size(p) for p in paths]
    if shards is None:
        shards = max(1, math.ceil(sum(nbytes) / SHARD_BYTES))
    runs = _split_shards(nbytes, int(shards))
    fs.makedirs(out)
    token = uuid.uuid4().hex[:8]
    entries, size_counts = [], {}
    for s, (start, end) in enumerate(runs):
        name = f"shard-{s:05d}-of-{len(runs):05d}.tfrecord"
        tmp = fs.join(out, f".{name}.{token}.tmp")
        count = 0
        try:  # TFRecordWriter streams to URLs itself: a temporary name, renamed when complete
            with tf.io.TFRecordWriter(tmp) as writer:
                for g in range(start, end):
                    hw = tuple(sizes[groups.path_index[g]].tolist())
                    size_counts[hw] = size_counts.get(hw, 0) + 1
                    members = groups.members[splits[g] : splits[g + 1]]
                    data = fs.read_bytes(paths[g])
                    writer.write(_example(data, paths[g], hw, members, cols))
                    count += len(members)
            fs.rename(tmp, fs.join(out, name))
        finally:
            if fs.exists(tmp):  # a failed shard leaves no .tmp file behind
                fs.remove(tmp)
        entries.append({"file": name, "images": end - start, "records": count,
                        "bytes": int(sum(nbytes[start:end]))})  # fmt: skip
    common = sorted(size_counts.items(), key=lambda kv: -kv[1])
    index = {
        "format": FORMAT,
        "version": VERSION,
        "source": source,
        "spec": spec.to_dict(),
        "num_images": len(paths),
        "num_records": int(sum(e["records"] for e in entries)),
        "skipped_records": len(records) - len(keep),
        "shards": entries,
        "image_sizes": [[h, w, c] for (h, w), c in common[:64]],  # [height, width, images]
    }
    fs.write_atomic(fs.join(out, INDEX), json.dumps(index, indent=1))
    return load_tfrecord_set(out)


# --------------------------------------------------------------------------- reading
def load_tfrecord_set(root: str | os.PathLike) -> TFRecordSet:
    """The :class:`TFRecordSet` in ``root`` (reads ``index.json`` only); DataError if bad."""
    root = os.fspath(root)
    path = fs.join(root, INDEX)
    if not fs.exists(path):
        raise DataError(f"{root}: no {INDEX}, so not a kpnet TFRecord set; write one with "
                        f"`kpnet data convert SOURCE --to tfrecord -o {root}`")  # fmt: skip
    try:
        index = json.loads(fs.read_text(path))
        if index.get("format") != FORMAT:
            raise ValueError(f"format is {index.get('format')!r}, not {FORMAT!r}")
        if int(index.get("version", 0)) > VERSION:
            raise ValueError(f"version {index['version']} is newer than this kpnet reads "
                             f"({VERSION}); upgrade kpnet")  # fmt: skip
        spec = KeypointSpec.from_dict(index["spec"])
        shards = index["shards"]
        files = tuple(fs.join(root, e["file"]) for e in shards)
        counts = tuple(int(e["records"]) for e in shards), tuple(int(e["images"]) for e in shards)
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a valid kpnet TFRecord index ({err}); convert the "
                        "source again") from None  # fmt: skip
    present = set(fs.listdir(root))
    missing = [e["file"] for e in shards if e["file"] not in present]
    if missing:
        raise DataError(
            f"{root}: shard file {missing[0]} listed in {INDEX} is missing "
            f"({len(missing)} missing); copy the whole folder or convert again"
        )
    return TFRecordSet(root, files, spec, int(index["num_images"]), *counts,
                       [list(v) for v in index.get("image_sizes", [])])  # fmt: skip


def parse_examples(serialized: tf.Tensor, num_keypoints: int) -> dict[str, tf.Tensor]:
    """A block of serialized examples [B] -> per-image tensors and flat instance tensors."""
    ex = tf.io.parse_example(serialized, _FEATURES)
    splits = ex["instance/record_id"].row_splits
    hw = tf.cast(tf.stack([ex["image/height"], ex["image/width"]], 1), tf.int32)
    return {
        "image": ex["image/encoded"],
        "hw": hw,
        "splits": splits,
        "boxes": tf.reshape(ex["instance/box"].flat_values, [-1, 4]),
        "keypoints": tf.reshape(ex["instance/keypoints"].flat_values, [-1, num_keypoints, 3]),
        "index": ex["instance/index"].flat_values,
        "record_id": ex["instance/record_id"].flat_values,
        "score": ex["instance/score"].flat_values,
        "path": ex["image/path"],
        "image_id": ex["image/id"],
    }


def read_records(tset: TFRecordSet, image_dir: str | None = None) -> list[InstanceRecord]:
    """The instance records of a set, eagerly (for validation sets: small ones).

    Each image is written to ``image_dir`` (default a fresh ``ram://`` folder: TensorFlow's
    in-memory filesystem, read by the pipeline like any file), so the records work with every
    path that takes records (validation, ``kpnet evaluate``).
    """
    image_dir = image_dir or f"ram://kpnet-{uuid.uuid4().hex[:12]}"
    fs.makedirs(image_dir)
    k = tset.spec.num_keypoints
    ds = tf.data.TFRecordDataset(list(tset.files)).batch(256)
    records: list[InstanceRecord] = []
    for block in ds:
        p = parse_examples(block, k)
        splits = p["splits"].numpy()
        for g, data in enumerate(p["image"].numpy()):
            ext = ".jpg" if data.startswith(JPEG_MAGIC) else ".png"
            path = fs.join(image_dir, f"{len(records):09d}{ext}")
            with fs.open_file(path, "wb") as f:
                f.write(data)
            hw = tuple(int(v) for v in p["hw"][g].numpy())
            original = p["path"][g].numpy().decode("utf-8")
            for i in range(splits[g], splits[g + 1]):
                records.append(InstanceRecord(
                    image_path=path, box=tuple(float(v) for v in p["boxes"][i].numpy()),
                    keypoints=p["keypoints"][i].numpy(), image_id=int(p["image_id"][g]),
                    record_id=int(p["record_id"][i]), score=float(p["score"][i]),
                    image_size=hw, source=f"{tset.root} (image {original})",
                ))  # fmt: skip
    return records
