"""Read a PyTorch state dict saved in the legacy (non-zip) format with NumPy alone, safely.

A ``.pth`` file is a pickle, and a pickle is a program: unpickling calls whatever global it
names (``os.system`` included). :func:`read_legacy_state_dict` runs the unpickler with an
**allow-list** of the few globals a state dict needs (``collections.OrderedDict``,
``torch._utils._rebuild_tensor_v2`` and the typed storages) and refuses every other one
before it is called; it imports no torch.

The legacy layout (``torch.save(..., _use_new_zipfile_serialization=False)``) is five pickles
in a row (magic number, protocol version 1001, system info, the object whose tensors point
to storages by persistent id, the list of storage keys), then for each key in that order an
8-byte little-endian element count and the storage's raw little-endian data.

Example:
    >>> import io
    >>> try:
    ...     read_legacy_state_dict(io.BytesIO(b"not a pickle"))
    ... except TorchWeightsError as err:
    ...     print(err)
    <stream>: not a PyTorch legacy (non-zip) weights file (could not read its magic number: \
invalid load key, 'n'.)
"""

from __future__ import annotations

import collections
import os
import pickle
from typing import Any, BinaryIO

import numpy as np

#: The magic number the legacy format starts with, and its protocol version.
MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001
#: torch storage class -> NumPy dtype (bfloat16 is read as its raw 16 bits widened to float32).
STORAGE_DTYPES: dict[str, str] = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
    "BFloat16Storage": "<u2", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}  # fmt: skip


class TorchWeightsError(ValueError):
    """A weights file that cannot be read safely; the message names the file."""


class _StorageType(str):
    """Stands in for ``torch.FloatStorage`` & co.: only its dtype is kept."""


class _TensorRef(tuple):
    """(storage key, offset, shape, stride) of a tensor, resolved once the data are read."""


def _rebuild_tensor_v2(storage, offset, size, stride, *_rest) -> _TensorRef:
    return _TensorRef((storage, int(offset), tuple(size), tuple(stride)))


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", name): _StorageType(name) for name in STORAGE_DTYPES},
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused the pickle global {module}.{name} (a weights file needs only "
                "tensors and dicts; this one would run code)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        # ('storage', storage_type, key, location, numel, view_metadata)
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):  # fmt: skip
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel, view = pid
        return (str(key), str(kind), int(numel), view)


def read_legacy_state_dict(source: str | os.PathLike | BinaryIO) -> dict[str, np.ndarray]:
    """The tensors of a legacy-format PyTorch state dict as ``{key: float32/int array}``.

    Raises:
        TorchWeightsError: not such a file, a refused pickle global, truncated data or a
            tensor that does not fit its storage; one line naming the file.
    """
    name = str(source) if isinstance(source, (str, os.PathLike)) else "<stream>"
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return _read(f, name)
    return _read(source, name)


def _read(f: BinaryIO, name: str) -> dict[str, np.ndarray]:
    try:
        magic = _Unpickler(f).load()
    except Exception as err:
        raise TorchWeightsError(
            f"{name}: not a PyTorch legacy (non-zip) weights file (could not read its magic "
            f"number: {err})"
        ) from None
    if magic != MAGIC_NUMBER:
        raise TorchWeightsError(f"{name}: not a PyTorch legacy (non-zip) weights file")
    try:
        if _Unpickler(f).load() != PROTOCOL_VERSION:
            raise pickle.UnpicklingError(f"protocol version is not {PROTOCOL_VERSION}")
        _Unpickler(f).load()  # system info (endianness and type sizes)
        state = _Unpickler(f).load()
        keys = _Unpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise TorchWeightsError(f"{name}: unsafe or corrupt weights file: {err}") from None
    if not isinstance(state, dict):
        raise TorchWeightsError(f"{name}: holds a {type(state).__name__}, not a state dict")
    storages = _read_storages(f, name, state, keys)
    return {str(k): _tensor(v, storages, name, str(k)) for k, v in state.items()
            if isinstance(v, _TensorRef)}  # fmt: skip


def _read_storages(f: BinaryIO, name: str, state: dict, keys: list) -> dict[str, np.ndarray]:
    kinds = {}
    for ref in state.values():
        if isinstance(ref, _TensorRef):
            key, kind, _numel, _view = ref[0]
            kinds[key] = kind
    out = {}
    for key in keys:
        header = f.read(8)
        if len(header) < 8:
            raise TorchWeightsError(f"{name}: truncated (storage {key} missing): re-install it")
        numel = int.from_bytes(header, "little")
        dtype = np.dtype(STORAGE_DTYPES[kinds.get(str(key), "FloatStorage")])
        data = f.read(numel * dtype.itemsize)
        if len(data) < numel * dtype.itemsize:
            raise TorchWeightsError(f"{name}: truncated (storage {key} is short): re-install it")
        out[str(key)] = np.frombuffer(data, dtype)
    return out


def _tensor(ref: _TensorRef, storages: dict, name: str, key: str) -> np.ndarray:
    (skey, kind, _numel, view), offset, shape, stride = ref
    if skey not in storages:
        raise TorchWeightsError(f"{name}: tensor {key!r} points to a missing storage")
    data = storages[skey]
    if view is not None:  # (view key, offset, size) of an old-style storage view
        data = data[int(view[1]): int(view[1]) + int(view[2])]
    count = int(np.prod(shape)) if shape else 1
    last = offset + sum((n - 1) * s for n, s in zip(shape, stride, strict=True)) if count else 0
    if offset < 0 or min(stride, default=0) < 0 or (count and last >= data.size):
        raise TorchWeightsError(f"{name}: tensor {key!r} {shape} does not fit its storage")
    if not shape:  # a scalar (as_strided reads an empty shape as "keep the input's")
        array = np.array(data[offset])
    else:
        array = np.lib.stride_tricks.as_strided(
            data[offset:], shape, tuple(s * data.itemsize for s in stride), writeable=False
        ).copy()
    if kind == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array
