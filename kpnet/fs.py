"""File I/O that works on local paths and on any filesystem ``tf.io.gfile`` knows.

Paths stay strings: ``pathlib.Path("gs://bucket/x")`` is ``gs:/bucket/x``, so a path that
may be a URL (``gs://``, ``s3://``, ``hdfs://``, TensorFlow's in-memory ``ram://``) is never
turned into a ``Path``. Local paths go through Python's own ``open`` / ``os`` (faster);
URLs through ``tf.io.gfile``.

Example:
    >>> from kpnet import fs
    >>> fs.write_atomic("ram://kpnet-doc/a/b.txt", b"hello")
    >>> fs.read_bytes(fs.join("ram://kpnet-doc/a", "b.txt"))
    b'hello'
    >>> fs.is_url("ram://kpnet-doc/a"), fs.is_url("/tmp/a"), fs.exists("ram://kpnet-doc/a/b.txt")
    (True, False, True)
"""

from __future__ import annotations

import os
import posixpath
import re
import uuid
from typing import IO, Any

PathLike = str | os.PathLike

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: PathLike) -> bool:
    """True for ``scheme://...`` paths (read and written through ``tf.io.gfile``)."""
    return bool(_URL.match(os.fspath(path)))


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def join(base: PathLike, *parts: str) -> str:
    """``base/part/...`` as a string; URLs joined with ``/`` (``Path`` would drop a slash)."""
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def dirname(path: PathLike) -> str:
    path = os.fspath(path)
    return posixpath.dirname(path) if is_url(path) else os.path.dirname(path)


def exists(path: PathLike) -> bool:
    return _gfile().exists(os.fspath(path)) if is_url(path) else os.path.exists(path)


def isfile(path: PathLike) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    g = _gfile()
    return g.exists(os.fspath(path)) and not g.isdir(os.fspath(path))


def isdir(path: PathLike) -> bool:
    return _gfile().isdir(os.fspath(path)) if is_url(path) else os.path.isdir(path)


def makedirs(path: PathLike) -> None:
    if is_url(path):
        _gfile().makedirs(os.fspath(path))
    else:
        os.makedirs(path, exist_ok=True)


def listdir(path: PathLike) -> list[str]:
    names = _gfile().listdir(os.fspath(path)) if is_url(path) else os.listdir(path)
    return sorted(n.rstrip("/") for n in names)


def size(path: PathLike) -> int:
    return _gfile().stat(os.fspath(path)).length if is_url(path) else os.path.getsize(path)


def open_file(path: PathLike, mode: str = "rb") -> IO[Any]:
    """``open`` for local paths, ``tf.io.gfile.GFile`` for URLs (same file-object methods)."""
    if is_url(path):
        return _gfile().GFile(os.fspath(path), mode)
    return open(path, mode, **({} if "b" in mode else {"encoding": "utf-8"}))  # noqa: SIM115


def read_bytes(path: PathLike) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def write_atomic(path: PathLike, data: bytes | str) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``.

    The folder is created if needed; a reader never sees a half-written file (on object
    stores such as gs://, where a rename is a copy, the final object appears whole).
    """
    path = os.fspath(path)
    folder = dirname(path)
    if folder:
        makedirs(folder)
    tmp = join(folder, f".{posixpath.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open_file(tmp, "wb") as f:
            f.write(payload)
        rename(tmp, path)
    finally:
        if exists(tmp):
            remove(tmp)


def rename(src: PathLike, dst: PathLike) -> None:
    """Rename ``src`` over ``dst`` (replacing it)."""
    if is_url(src) or is_url(dst):
        _gfile().rename(os.fspath(src), os.fspath(dst), overwrite=True)
    else:
        os.replace(src, dst)


def remove(path: PathLike) -> None:
    if is_url(path):
        _gfile().remove(os.fspath(path))
    else:
        os.remove(path)


def rmtree(path: PathLike) -> None:
    if is_url(path):
        if _gfile().exists(os.fspath(path)):
            _gfile().rmtree(os.fspath(path))
    else:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
