"""Write a PyTorch state dict in the legacy (non-zip) layout without torch, for the tests.

What ``torch.save(state, f, _use_new_zipfile_serialization=False)`` writes: five pickles
(magic number, protocol version, system info, the dict whose tensors are
``torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, ...)`` with storages by
persistent id, the list of storage keys), then each storage as an 8-byte little-endian
element count and its raw data.
"""

from __future__ import annotations

import collections
import io
import pickle
from typing import Any, BinaryIO

import numpy as np

from kpnet.models.torch_weights import MAGIC_NUMBER, PROTOCOL_VERSION

_KINDS = {np.dtype("float32"): "FloatStorage", np.dtype("int64"): "LongStorage"}


class GlobalRef:
    """Pickled as the global ``module.name`` without importing it (any name, for tests)."""

    def __init__(self, module: str, name: str) -> None:
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> None:  # pickle wants a callable in a reduce
        raise NotImplementedError


class Call:
    """Pickled as ``func(*args)`` (a REDUCE of a :class:`GlobalRef`)."""

    def __init__(self, func: GlobalRef, args: tuple) -> None:
        self.func, self.args = func, args


class _Pickler(pickle._Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return obj[1] if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__pid__" else None

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if isinstance(obj, GlobalRef):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        elif isinstance(obj, Call):
            self.save_reduce(obj.func, obj.args, obj=obj)
        else:
            super().save(obj, save_persistent_id)


def dumps(obj: Any) -> bytes:
    out = io.BytesIO()
    _Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def write_legacy_state_dict(tensors: dict[str, np.ndarray], target: BinaryIO,
                            state: Any = None) -> None:
    """Write float32 / int64 ``tensors`` (or an arbitrary ``state`` object instead)."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}  # C or Fortran order: strides kept
    keys = [str(i) for i in range(len(arrays))]
    if state is None:
        state = collections.OrderedDict()
        for key, (name, a) in zip(keys, arrays.items(), strict=True):
            kind = GlobalRef("torch", _KINDS[a.dtype])
            pid = ("__pid__", ("storage", kind, key, "cpu", a.size, None))
            stride = tuple(s // a.itemsize for s in a.strides)
            state[name] = Call(GlobalRef("torch._utils", "_rebuild_tensor_v2"),
                               (pid, 0, a.shape, stride, False, collections.OrderedDict()))
    for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": PROTOCOL_VERSION}):
        target.write(pickle.dumps(obj, protocol=2))
    target.write(dumps(state))
    target.write(pickle.dumps(keys, protocol=2))
    for a in arrays.values():
        order = "F" if a.flags.f_contiguous and not a.flags.c_contiguous else "C"
        data = a.astype(a.dtype.newbyteorder("<")).tobytes(order=order)
        target.write(a.size.to_bytes(8, "little") + data)
