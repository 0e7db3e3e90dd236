"""File I/O that works on local paths and on any filesystem ``tf.io.gfile`` knows.

Paths stay strings: ``pathlib.Path("gs://bucket/x")`` is ``gs:/bucket/x``, so a path that
may be a URL (``gs://``, ``s3://``, ``hdfs://``, TensorFlow's in-memory ``ram://``) is never
turned into a ``Path``. Local paths go through Python's own ``open`` / ``os`` (faster);
URLs through ``tf.io.gfile``. Writers and readers that need a local file (Keras'
``model.save``, h5py, OpenCV) go through :func:`staged` (write a local file, then put it in
place atomically) and :func:`local_copy`; :func:`write_atomic` and :func:`staged_folder`
replace a file or a folder only once the new one is complete. A write that fails for lack of
room or rights (disk full, quota, read-only, permissions) raises :class:`WriteError`: one
line naming the file, the reason and the free space; the file it was to replace is intact.

Example:
    >>> from kpnet import fs
    >>> fs.write_atomic("ram://kpnet-doc/a/b.txt", b"hello")
    >>> fs.read_bytes(fs.join("ram://kpnet-doc/a", "b.txt"))
    b'hello'
    >>> fs.is_url("ram://kpnet-doc/a"), fs.is_url("/tmp/a"), fs.exists("ram://kpnet-doc/a/b.txt")
    (True, False, True)
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

PathLike = str | os.PathLike

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: PathLike) -> bool:
    """True for ``scheme://...`` paths (read and written through ``tf.io.gfile``)."""
    return bool(_URL.match(os.fspath(path)))


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


def as_path(path: PathLike) -> str | Path:
    """A URL as a string (without a trailing ``/``), a local path as a ``Path``."""
    return os.fspath(path).rstrip("/") if is_url(path) else Path(path)


def join(base: PathLike, *parts: str) -> str:
    """``base/part/...`` as a string; URLs joined with ``/`` (``Path`` would drop a slash)."""
    base = os.fspath(base)
    return posixpath.join(base, *parts) if is_url(base) else os.path.join(base, *parts)


def resolve(path: PathLike, base: PathLike) -> str:
    """``path`` against the folder ``base`` (a URL or local), normalised; URLs and absolute
    paths as they are.

    Example:
        >>> resolve("../data/a.json", "gs://bucket/recipes"), resolve("/x", "gs://b")
        ('gs://bucket/data/a.json', '/x')
    """
    path = os.fspath(path)
    if is_url(path) or os.path.isabs(path):
        return path
    if not is_url(base):
        return os.path.normpath(os.path.join(os.fspath(base), path))
    scheme, rest = os.fspath(base).split("://", 1)
    return f"{scheme}://{posixpath.normpath(posixpath.join(rest, path))}"


def dirname(path: PathLike) -> str:
    path = os.fspath(path)
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(path)


def basename(path: PathLike) -> str:
    """The last part of ``path`` (of a URL, without its trailing ``/``)."""
    path = os.fspath(path)
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def child(base: PathLike, *parts: str) -> str | Path:
    """``base / parts``: a ``Path`` when ``base`` is local, a string when it is a URL."""
    return as_path(join(base, *parts))


def parent(path: PathLike) -> str | Path:
    """The folder holding ``path``: ``Path.parent`` locally, a string for a URL."""
    return as_path(dirname(path)) if is_url(path) else Path(path).parent


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
    """Create the folder ``path`` and its parents; WriteError when that is not allowed."""
    with _write_errors(path):
        if is_url(path):
            _gfile().makedirs(os.fspath(path))
        else:
            os.makedirs(path, exist_ok=True)


def listdir(path: PathLike) -> list[str]:
    names = _gfile().listdir(os.fspath(path)) if is_url(path) else os.listdir(path)
    return sorted(n.rstrip("/") for n in names)


def files_under(folder: PathLike) -> list[str]:
    """Every file below ``folder`` (a local path or a URL), as sorted ``/``-joined paths
    relative to it; [] when it does not exist."""
    folder = os.fspath(as_path(folder))
    walk = _gfile().walk(folder) if is_url(folder) else os.walk(folder)
    found = []
    for root, _, names in walk:
        rel = os.path.relpath(root, folder) if not is_url(folder) else root[len(folder) :]
        parts = [p for p in rel.replace(os.sep, "/").split("/") if p not in ("", ".")]
        found += ["/".join([*parts, n]) for n in names]
    return sorted(found)


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
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with staged(path) as tmp, open(tmp, "wb") as f:
        f.write(payload)


def _temp_beside(path: str) -> str:
    """A hidden temporary name beside ``path`` that ends like it (Keras wants ``.keras``)."""
    return join(dirname(path), f".tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}.{basename(path)}")


@contextlib.contextmanager
def staged(path: PathLike) -> Iterator[str]:
    """A local file path to write; when the block ends without an error it becomes ``path``.

    For a local ``path`` the file is a temporary one beside it, renamed over ``path``; for a
    URL a file in a local temporary folder, copied to a temporary object beside ``path`` and
    renamed over it. Either way ``path`` is replaced only by a complete file, its folder is
    created if needed and nothing is left behind on failure; a block that writes no file
    leaves ``path`` as it was. This is how kpnet writes what
    needs a local file (``model.save``, ``save_weights``, OpenCV's video writer) to any path.

    Example:
        >>> with staged("ram://kpnet-doc/model.bin") as local, open(local, "wb") as f:
        ...     _ = f.write(b"weights")
        >>> read_bytes("ram://kpnet-doc/model.bin")
        b'weights'
    """
    path = os.fspath(path)
    folder = dirname(path)
    if folder:
        makedirs(folder)
    if not is_url(path):
        tmp = _temp_beside(path)

        def discard() -> None:
            if os.path.lexists(tmp):
                os.remove(tmp)

        try:
            with _write_errors(path, discard):
                yield tmp
                if os.path.lexists(tmp):
                    os.replace(tmp, path)
        finally:
            discard()
        return
    local_dir = tempfile.mkdtemp(prefix="kpnet-")
    tmp = _temp_beside(path)
    try:
        local = os.path.join(local_dir, basename(path))
        with _write_errors(path, lambda: shutil.rmtree(local_dir, ignore_errors=True)):
            yield local
            if os.path.exists(local):
                _gfile().copy(local, tmp, overwrite=True)
                rename(tmp, path)
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)
        if exists(tmp):
            remove(tmp)


@contextlib.contextmanager
def local_copy(path: PathLike) -> Iterator[str]:
    """A local path holding the file ``path``: itself when local, else a temporary copy
    (same file name) that is deleted when the block ends. For readers that need a local
    file (``keras.saving.load_model``, h5py, pandas)."""
    if not is_url(path):
        yield os.fspath(path)
        return
    local_dir = tempfile.mkdtemp(prefix="kpnet-")
    try:
        local = os.path.join(local_dir, basename(path))
        _gfile().copy(os.fspath(path), local, overwrite=True)
        yield local
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(path: PathLike) -> Iterator[str]:
    """A temporary folder beside ``path`` to fill; when the block ends without an error it
    replaces the folder ``path`` (on failure it is deleted and ``path`` is left as it was).

    Locally the new folder is renamed into place. Object stores have no folder rename: the
    files are moved one by one, deepest first, so the top-level files (a SavedModel's
    ``saved_model.pb``) appear last.
    """
    path = os.fspath(as_path(path))  # no trailing "/": the temporary folder goes beside
    folder = dirname(path)
    if folder:
        makedirs(folder)
    tmp = _temp_beside(path)
    makedirs(tmp)
    try:
        with _write_errors(path, lambda: rmtree(tmp)):
            yield tmp
            rmtree(path)
            if is_url(path):
                _move_files(tmp, path)
            else:
                os.rename(tmp, path)
    finally:
        rmtree(tmp)


def _move_files(src: str, dst: str) -> None:
    """Move every file under the URL folder ``src`` to the same place under ``dst``."""
    files = []
    for root, _, names in _gfile().walk(src):
        rel = posixpath.relpath(root, src)
        makedirs(join(dst, rel) if rel != "." else dst)  # empty folders too
        files += [(join(root, n), posixpath.normpath(posixpath.join(rel, n))) for n in names]
    for source, rel in sorted(files, key=lambda f: -f[1].count("/")):
        rename(source, join(dst, rel))


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
        shutil.rmtree(path, ignore_errors=True)


def io_errors() -> tuple[type[BaseException], ...]:
    """What a failed read or write raises: ``OSError``, and TensorFlow's ``OpError`` once
    TensorFlow is imported (``tf.io.gfile`` on a URL). Use as ``except fs.io_errors():``."""
    tf = sys.modules.get("tensorflow")
    errors = getattr(tf, "errors", None)
    return (OSError,) if errors is None else (OSError, errors.OpError)


def reason(err: BaseException) -> str:
    """An error's message on one line: the first line (TensorFlow's ``OpError.message`` for
    URLs), or for a YAML syntax error what is wrong and where.

    Example:
        >>> import yaml
        >>> try:
        ...     yaml.safe_load("bodyparts: a: b")
        ... except yaml.YAMLError as err:
        ...     print(reason(err))
        mapping values are not allowed here (line 1, column 13)
    """
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is not None and problem:  # yaml.MarkedYAMLError: its str() spans several lines
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    text = str(getattr(err, "message", None) or err) or type(err).__name__
    text = _TF_NOISE.sub("", (text.strip().splitlines() or [""])[0]).strip()  # TF's op names
    return (text or type(err).__name__)[:200]


#: What TensorFlow wraps an op's message in: ``{{function_node ...}} ... [Op:DecodeImage] name:``.
_TF_NOISE = re.compile(r"\{\{.*?\}\}|\[Op:\w+\]( name:.*)?$")


# --------------------------------------------------------------------------- write errors
#: ``errno`` values that mean a file cannot be written where it was asked for.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                          errno.EPERM})  # fmt: skip
#: Of those, the ones that more room would cure.
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
#: How libraries that lose the errno (HDF5, TensorFlow's file systems) say the same.
_WRITE_TEXTS = {
    "no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
    "read-only file system": errno.EROFS, "permission denied": errno.EACCES,
    "resource_exhausted": errno.ENOSPC,
}  # fmt: skip


class WriteError(OSError):
    """A file could not be written (disk full, quota, read-only, no permission).

    ``str()`` is one line: the file, the reason, the free space of its folder and what to do.
    Raised by :func:`write_atomic`, :func:`staged`, :func:`staged_folder` and :func:`makedirs`,
    which never leave a partial file under the real name.
    """

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


def write_errno(err: BaseException) -> int | None:
    """The write-failure ``errno`` of ``err`` (see :data:`WRITE_ERRNOS`), or None for others."""
    code = getattr(err, "errno", None)
    if code in WRITE_ERRNOS:
        return code
    text = str(getattr(err, "message", None) or err).lower()
    return next((c for t, c in _WRITE_TEXTS.items() if t in text), None)


def as_write_error(err: BaseException, path: PathLike) -> BaseException:
    """``err`` as a :class:`WriteError` naming ``path`` when it is a write failure, else itself.

    >>> str(as_write_error(OSError(errno.EROFS, "Read-only file system"), "/ro/a.json"))
    'cannot write /ro/a.json: Read-only file system; write to another folder'
    """
    code = write_errno(err)
    if code is None or isinstance(err, WriteError):
        return err
    path = os.fspath(path)
    folder = dirname(path) or "."
    if code in FULL_ERRNOS:
        what = (f"{os.strerror(code)} ({free_space(folder)}); no file already there was "
                "replaced. Free some space or write elsewhere")  # fmt: skip
    elif code == errno.EROFS:
        what = f"{os.strerror(code)}; write to another folder"
    else:
        what = f"{os.strerror(code)}; check the rights on {folder}, or write elsewhere"
    return WriteError(f"cannot write {path}: {what}", code)


@contextlib.contextmanager
def _write_errors(path: PathLike, cleanup: Callable[[], Any] | None = None) -> Iterator[None]:
    """Turn a write failure inside the block into a :class:`WriteError` naming ``path``;
    ``cleanup`` (dropping the temporary file) runs first, so the free space is measured
    without it."""
    try:
        yield
    except io_errors() as err:
        if cleanup is not None:
            cleanup()
        converted = as_write_error(err, path)
        if converted is err:
            raise
        raise converted from err


def free_space(folder: PathLike) -> str:
    """``"2.1 MB free in FOLDER"`` (its nearest existing parent; ``shutil.disk_usage``), or
    ``"free space unknown"`` for a URL."""
    if is_url(folder):
        return f"free space of {os.fspath(folder)} unknown"
    probe = os.path.abspath(os.fspath(folder))
    while not os.path.isdir(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return f"free space of {os.fspath(folder)} unknown"
    return f"{human_size(free)} free in {os.fspath(folder)}"


def human_size(n: float) -> str:
    """Bytes for people: ``human_size(2_100_000) == "2.1 MB"``."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable
