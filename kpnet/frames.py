"""Frame sources for prediction: image files, folders of images and videos, one frame at a time.

Every input is an image file, a folder (its images and videos, in natural file-name order:
``img2.png`` before ``img10.png``) or a video that OpenCV reads (mp4, avi, mov, mkv, ...).
:func:`iter_frames` yields :class:`Frame` objects with RGB uint8 pixels; :func:`count_frames`
counts them up front for a progress bar; :class:`VideoWriter` writes labelled frames back to a
video and :class:`Progress` prints frames done / total and frames per second on stderr.

Images are decoded ONE way in the whole package, :func:`read_image`: TensorFlow's
``tf.io.decode_image`` on the file bytes, exactly as the training pipeline does. It ignores EXIF
orientation (a phone photo tagged "rotate 90" keeps its stored pixel grid, so keypoints are in
the grid the model saw in training). Formats TensorFlow cannot decode (TIFF, and WebP on older
TensorFlow) fall back to OpenCV, also ignoring EXIF orientation.

Example:
    >>> import tempfile, pathlib, numpy as np, cv2
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> for i in (1, 2, 10):
    ...     _ = cv2.imwrite(str(folder / f"img{i}.png"), np.zeros((4, 6, 3), np.uint8))
    >>> [(f.name, f.index, f.image.shape) for f in iter_frames([folder])]
    [('img1.png', 0, (4, 6, 3)), ('img2.png', 1, (4, 6, 3)), ('img10.png', 2, (4, 6, 3))]
    >>> count_frames([folder])
    3
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import numpy as np

from kpnet import fs
from kpnet.data.images import MAX_PIXELS, read_header, too_large
from kpnet.data.records import DataError

PathLike = str | os.PathLike

#: File suffixes read as still images (lower case).
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".jp2", ".pbm",
     ".pgm", ".ppm", ".pnm"}
)  # fmt: skip
#: File suffixes read as videos through ``cv2.VideoCapture`` (lower case).
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm", ".flv",
     ".mj2", ".ogv", ".3gp"}
)  # fmt: skip
#: Signatures of formats every supported TensorFlow decodes (no OpenCV fallback for these, so
#: a corrupt JPEG is an error, never a partial OpenCV decode).
_TF_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM")
#: fourcc per output video suffix (codecs the opencv-python-headless wheels can write).
_FOURCC = {".mp4": "mp4v", ".m4v": "mp4v", ".mov": "mp4v", ".avi": "MJPG", ".mkv": "MJPG"}

T = TypeVar("T")

#: A video decoding to fewer than (1 - this) x the frames its header announces (and at
#: least 2 fewer) is reported as truncated: container frame counts are estimates for some
#: formats, so a frame or two missing is tolerated.
TRUNCATION_TOLERANCE = 0.01
#: Frames decoded ahead of the model by :func:`prefetch` (bounded: never a whole video).
PREFETCH_FRAMES = 32


@dataclass(frozen=True)
class Frame:
    """One frame to predict.

    Attributes:
        source: the file the pixels came from (the video, or the image file).
        index: frame number in the video, or position of the image in its input (0 for a
            single image file).
        name: ``clip.avi#000012`` for a video frame, the file name for an image.
        image: RGB uint8 [H, W, 3].
        fps: frames per second of the video (None for images).
        input: the input argument the frame came from (video, folder or image file): frames
            of one input go to one output table.
    """

    source: Path
    index: int
    name: str
    image: np.ndarray = field(repr=False)
    fps: float | None = None
    input: Path | None = None

    @property
    def is_video(self) -> bool:
        """True for a frame decoded from a video."""
        return self.fps is not None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image."""
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclass(frozen=True)
class Skipped:
    """An input file :func:`iter_frames` could not read (``on_error="skip"``).

    Attributes:
        source: the image or video file.
        why: one line naming the file and what is wrong. A video's frames decoded before
            it failed (truncated) come before its ``Skipped``.
        input: the input argument the file came from.
    """

    source: Path
    why: str
    input: Path | None = None


# --------------------------------------------------------------------------- images
def read_image(
    path: PathLike, max_pixels: int = MAX_PIXELS, setting: str = "--max-pixels"
) -> np.ndarray:
    """RGB uint8 [H, W, 3] pixels of an image file, EXIF orientation ignored.

    TensorFlow decodes JPEG, PNG, GIF (first frame), BMP (and WebP on recent versions), exactly
    as the training pipeline does; other formats (TIFF, ...) go through OpenCV. 16-bit images
    become 8-bit, grey ones RGB. An image whose header declares more than ``max_pixels``
    pixels is refused before decoding (``setting``: what raises the limit, for the message).

    Raises:
        DataError: one line naming the file when it is missing, empty, over the pixel limit,
            corrupt or in a format neither decoder reads.

    Example:
        >>> import tempfile, pathlib
        >>> bad = pathlib.Path(tempfile.mkdtemp()) / "bad.png"
        >>> _ = bad.write_bytes(b"not an image")
        >>> try:
        ...     read_image(bad)
        ... except DataError as err:
        ...     print(str(err).split(": ", 1)[1])
        cannot decode the image (corrupt, or a format neither TensorFlow nor OpenCV reads; ...)
    """
    path = Path(path)
    data = _image_bytes(path, max_pixels, setting)
    image, why = _decode_tf(data)
    if image is not None:
        return image
    if data.startswith(_TF_MAGIC):
        raise DataError(f"{path}: cannot decode the image (corrupt or truncated: {why})")
    image = _decode_cv2(data)
    if image is None:
        raise DataError(
            f"{path}: cannot decode the image (corrupt, or a format neither TensorFlow nor "
            "OpenCV reads; convert it to PNG or JPEG)"
        )
    return image


def _image_bytes(path: Path, max_pixels: int, setting: str) -> bytes:
    """The file's bytes, read only once its header is known to be within ``max_pixels``."""
    try:
        with open(path, "rb") as f:
            header = read_header(f)
            why = too_large(header, max_pixels, setting) if header else None
            f.seek(0)
            data = b"" if why else f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the image file ({err.strerror or err})") from None
    if why:
        raise DataError(f"{path}: {why}")
    if not data:
        raise DataError(f"{path}: the image file is empty")
    return data


def _decode_tf(data: bytes) -> tuple[np.ndarray | None, str | None]:
    import tensorflow as tf

    try:
        image = tf.io.decode_image(data, channels=3, expand_animations=False)
    except (tf.errors.OpError, ValueError) as err:
        return None, fs.reason(err)
    return np.asarray(image, dtype=np.uint8), None


def _decode_cv2(data: bytes) -> np.ndarray | None:
    import cv2

    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if bgr is None or bgr.size == 0:
        return None
    if bgr.dtype != np.uint8:  # IMREAD_COLOR already gives 8 bits; be safe with odd builds
        bgr = (bgr / (np.iinfo(bgr.dtype).max / 255.0)).round().astype(np.uint8)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- inputs
def natural_key(name: str) -> tuple:
    """Sort key ordering embedded numbers by value: ``img2.png`` before ``img10.png``.

    Example:
        >>> sorted(["img10.png", "img2.png", "IMG1.png"], key=natural_key)
        ['IMG1.png', 'img2.png', 'img10.png']
    """
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p), p) if p.isdigit() else (1, p.lower(), p) for p in parts)


def is_video(path: PathLike) -> bool:
    """True when the file suffix is a video format (``VIDEO_SUFFIXES``)."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def is_image(path: PathLike) -> bool:
    """True when the file suffix is an image format (``IMAGE_SUFFIXES``)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def list_inputs(inputs: Sequence[PathLike]) -> list[tuple[Path, list[Path]]]:
    """Check the inputs up front: ``[(input, [its image or video files in order])]``.

    A folder contributes its images and videos (not its sub-folders) in natural order.

    Raises:
        DataError: an input does not exist, is not an image or video file, or is a folder
            without any.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            files = [p for p in path.iterdir() if p.is_file() and (is_image(p) or is_video(p))]
            if not files:
                raise DataError(
                    f"{path}: no image or video files in this folder (images: "
                    f"{', '.join(sorted(IMAGE_SUFFIXES))}; videos: "
                    f"{', '.join(sorted(VIDEO_SUFFIXES))})"
                )
            out.append((path, sorted(files, key=lambda p: natural_key(p.name))))
        elif path.is_file():
            if not (is_image(path) or is_video(path)):
                raise DataError(
                    f"{path}: not an image or video file (by its suffix {path.suffix!r}); "
                    "pass images, videos or folders of images"
                )
            out.append((path, [path]))
        else:
            raise DataError(f"{path}: no such file or folder")
    return out


def iter_frames(
    inputs: Sequence[PathLike], on_error: str = "raise", max_pixels: int = MAX_PIXELS
) -> Iterator[Frame | Skipped]:
    """Every frame of every input, in order: image files, folders of images, videos.

    All inputs are checked (:func:`list_inputs`) before the first frame is decoded, so a typo
    in the last argument fails at once. Images (and video frames) over ``max_pixels`` pixels
    are refused by their header, before decoding.

    ``on_error="skip"``: a file that cannot be read (an undecodable or unreadable image, one
    over the pixel limit, a video OpenCV cannot open, without frames, or truncated) is
    yielded as a :class:`Skipped` (naming it and why) instead of raising, and the other
    files still follow; a truncated video's ``Skipped`` follows the frames it did decode.

    Raises:
        DataError: a missing or unsupported input; with ``on_error="raise"`` also any of the
            files above.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    listed = list_inputs(inputs)
    for item, files in listed:
        position = 0
        for path in files:
            try:
                if is_video(path):
                    yield from _video_frames(path, item, max_pixels)
                else:
                    position += 1  # a skipped image keeps its place: ids stay put
                    image = read_image(path, max_pixels)
                    yield Frame(path, position - 1, path.name, image, None, item)
            except DataError as err:
                if on_error == "raise":
                    raise
                yield Skipped(path, str(err), item)


def _open_video(path: Path):
    import cv2

    cap = cv2.VideoCapture(str(path))
    if not cap.isOpened():
        cap.release()
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{path}: the video file is empty (0 bytes)")
        raise DataError(
            f"{path}: OpenCV cannot open this video (corrupt, or a codec its FFmpeg lacks); "
            "convert it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4"
        )
    return cap


def _video_frames(path: Path, item: Path, max_pixels: int = MAX_PIXELS) -> Iterator[Frame]:
    import cv2

    cap = _open_video(path)
    try:
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        fps = fps if math.isfinite(fps) and fps > 0 else 30.0
        announced = float(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0)
        hw = (cap.get(cv2.CAP_PROP_FRAME_HEIGHT) or 0, cap.get(cv2.CAP_PROP_FRAME_WIDTH) or 0)
        why = too_large(hw, max_pixels, "--max-pixels", what="each frame")
        if why:
            raise DataError(f"{path}: {why}")
        index = 0
        while True:
            ok, bgr = cap.read()
            if not ok or bgr is None:
                break
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            yield Frame(path, index, f"{path.name}#{index:06d}", rgb, fps, item)
            index += 1
    finally:
        cap.release()
    if index == 0:
        raise DataError(f"{path}: the video has no frames OpenCV can decode")
    if math.isfinite(announced) and index < announced - max(2.0, TRUNCATION_TOLERANCE * announced):
        raise DataError(
            f"{path}: the video stops after {index} of the {int(announced)} frames its header "
            "announces (truncated or corrupt); re-encode or re-copy it"
        )


def read_video_frames(video: PathLike, wanted: Sequence[int]) -> tuple[dict[int, np.ndarray], int]:
    """``({frame: RGB image}, frames the header announces)`` for the wanted frame numbers,
    read sequentially (exact for every codec).

    Raises:
        DataError: the video cannot be opened, or ends before a wanted frame (truncated).
    """
    import cv2

    path = Path(video)
    if not path.is_file():
        raise DataError(f"{path}: no such video file")
    cap = _open_video(path)
    announced = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    want = set(int(i) for i in wanted)
    out: dict[int, np.ndarray] = {}
    try:
        index = 0
        last = max(want) if want else -1
        while index <= last:
            if index in want:
                ok, bgr = cap.read()
                if ok and bgr is not None:
                    out[index] = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            else:
                ok = cap.grab()
            if not ok:
                break
            index += 1
    finally:
        cap.release()
    missing = sorted(want - set(out))
    if missing:
        raise DataError(
            f"{path}: the video ends before frame {missing[0]} (it decodes {index} frames); "
            "is it truncated, or is the table from another video?"
        )
    return out, announced


def announced_frames(video: PathLike) -> int:
    """The frame count a video's header announces (0 when it gives none).

    Raises:
        DataError: the file is missing or OpenCV cannot open it.
    """
    import cv2

    path = Path(video)
    if not path.is_file():
        raise DataError(f"{path}: no such video file")
    cap = _open_video(path)
    try:
        return int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    finally:
        cap.release()


def count_frames(inputs: Sequence[PathLike], on_error: str = "raise") -> int | None:
    """Number of frames :func:`iter_frames` will yield, or None when a video does not say.

    Videos report ``CAP_PROP_FRAME_COUNT`` from their header (exact for most containers,
    an estimate for some); images count one each; with ``on_error="skip"`` a video OpenCV
    cannot open counts none (:func:`iter_frames` skips it).

    Raises:
        DataError: as :func:`list_inputs`, or (``on_error="raise"``) for a video OpenCV
            cannot open.
    """
    import cv2

    total = 0
    for _, files in list_inputs(inputs):
        for path in files:
            if not is_video(path):
                total += 1
                continue
            try:
                cap = _open_video(path)
            except DataError:
                if on_error == "raise":
                    raise
                continue
            n = cap.get(cv2.CAP_PROP_FRAME_COUNT)
            cap.release()
            if not n or not math.isfinite(n) or n <= 0:
                return None
            total += int(n)
    return total


def prefetch(items: Iterable[T], size: int = PREFETCH_FRAMES) -> Iterator[T]:
    """Yield ``items`` as they are produced by a background thread, at most ``size`` ahead.

    Video decoding (OpenCV releases the GIL) then overlaps the model's forward pass; memory
    stays bounded by ``size`` frames. An error raised by the producer is raised here, in
    order; closing the generator early stops the thread.

    Example:
        >>> list(prefetch(iter(range(5)), size=2))
        [0, 1, 2, 3, 4]
    """
    import queue
    import threading

    buffer: queue.Queue = queue.Queue(maxsize=max(1, size))
    stop = threading.Event()
    done = object()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    close = getattr(items, "close", None)
                    if close is not None:
                        close()  # releases an open video
                    return
            buffer.put((done, None))
        except BaseException as err:  # handed to the consumer
            buffer.put((done, err))

    thread = threading.Thread(target=produce, name="kpnet-decode", daemon=True)
    thread.start()
    try:
        while True:
            item, err = buffer.get()
            if item is done:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                buffer.get_nowait()
            except queue.Empty:
                thread.join(0.05)


# --------------------------------------------------------------------------- writing
def write_image(path: PathLike, image: np.ndarray) -> None:
    """Write an RGB uint8 image, encoded by its suffix (.jpg, .png, ...), atomically
    (:func:`kpnet.fs.write_atomic`); ``path`` may be a URL."""
    import cv2

    suffix = os.path.splitext(fs.basename(path))[1].lower() or ".png"
    try:
        ok, data = cv2.imencode(suffix, cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))
    except cv2.error:
        ok = False
    if not ok:
        raise DataError(f"{path}: cannot encode a {suffix} image; use .jpg or .png")
    fs.write_atomic(path, data.tobytes())


class VideoWriter:
    """Write RGB uint8 frames to an mp4 (``mp4v``) or avi (``MJPG``) video with OpenCV.

    The file is written under a temporary name (:func:`kpnet.fs.staged`: beside ``path``, or
    a local file for a URL) and put in place when the writer closes without an error, so a
    failed run never leaves half a video (or clobbers an old one). The frame size comes from
    the first frame unless given.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "labelled.avi"
        >>> with VideoWriter(out, fps=10) as writer:
        ...     for i in range(3):
        ...         writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
        >>> out.is_file(), writer.frames
        (True, 3)
    """

    def __init__(
        self, path: PathLike, fps: float = 30.0, size: tuple[int, int] | None = None,
        fourcc: str | None = None,
    ) -> None:  # fmt: skip
        self.path = fs.as_path(path)  # a URL stays a string
        suffix = os.path.splitext(fs.basename(self.path))[1].lower()
        if fourcc is None and suffix not in _FOURCC:
            raise DataError(
                f"{self.path}: cannot write a {suffix or 'suffix-less'} video; use one of "
                f"{', '.join(sorted(_FOURCC))}"
            )
        self.fourcc = fourcc or _FOURCC[suffix]
        self.fps = float(fps) if fps and math.isfinite(fps) and fps > 0 else 30.0
        self.size = tuple(size) if size is not None else None  # (height, width)
        self.frames = 0
        self._staging: contextlib.ExitStack | None = None
        self._tmp = ""
        self._writer = None
        if self.size is not None:
            self._open()

    def _open(self) -> None:
        import cv2

        self._staging = contextlib.ExitStack()
        self._tmp = self._staging.enter_context(fs.staged(self.path))
        h, w = self.size
        writer = cv2.VideoWriter(
            self._tmp, cv2.VideoWriter_fourcc(*self.fourcc), self.fps, (int(w), int(h))
        )
        if not writer.isOpened():
            writer.release()
            self._finish(keep=False)
            raise DataError(
                f"{self.path}: OpenCV cannot write this video (codec {self.fourcc}, "
                f"{w}x{h} at {self.fps:g} fps); try an .avi (MJPG) or .mp4 (mp4v) file name"
            )
        self._writer = writer

    def write(self, image: np.ndarray) -> None:
        """Append one RGB uint8 [H, W, 3] frame (grey [H, W] frames are accepted too)."""
        import cv2

        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if self.size is None:
            self.size = (int(image.shape[0]), int(image.shape[1]))
        if self._writer is None:
            self._open()
        if tuple(image.shape[:2]) != tuple(self.size):
            raise ValueError(
                f"{self.path}: frame {self.frames} is {image.shape[1]}x{image.shape[0]}, the "
                f"video is {self.size[1]}x{self.size[0]}"
            )
        bgr = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2BGR)
        self._writer.write(bgr)
        self.frames += 1

    def close(self, keep: bool = True) -> None:
        """Finish the file (``keep=False``: delete what was written)."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        self._finish(keep and self.frames > 0)

    def _finish(self, keep: bool) -> None:
        """Put the staged file in place (``keep``) or drop it."""
        if self._staging is None:
            return
        if not keep and os.path.exists(self._tmp):
            os.remove(self._tmp)  # staged() then leaves the path as it was
        staging, self._staging = self._staging, None
        staging.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(keep=exc_type is None)


# --------------------------------------------------------------------------- progress
class Progress:
    """A one-line progress report on stderr: frames done / total, frames per second, ETA.

    On a terminal the line updates in place (carriage return) at most every ``interval``
    seconds; otherwise (logs, pipes, pytest) only the final line is printed by :meth:`close`.

    Example:
        >>> import io
        >>> stream = io.StringIO()
        >>> with Progress(3, "predict", stream=stream) as bar:
        ...     for _ in bar.iterate(range(3)):
        ...         pass
        >>> stream.getvalue().startswith("predict: 3/3 frames")
        True
    """

    def __init__(
        self, total: int | None, desc: str = "", stream: IO[str] | None = None,
        interval: float = 0.2, unit: str = "frames",
    ) -> None:  # fmt: skip
        self.total = total if total and total > 0 else None
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.interval = interval
        self.unit = unit
        self.done = 0
        self._start = time.perf_counter()
        self._last = -math.inf
        self._width = 0
        self._closed = False
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())

    def update(self, n: int = 1) -> None:
        """Count ``n`` more frames done."""
        self.done += n
        now = time.perf_counter()
        if self.live and now - self._last >= self.interval:
            self._last = now
            self._print(self.line(), end="\r")

    def iterate(self, items: Iterable[T]) -> Iterator[T]:
        """Yield ``items``, counting one per item."""
        for item in items:
            yield item
            self.update()

    def line(self) -> str:
        """The current report, e.g. ``predict: 120/300 frames (40%), 23.5 fps, ETA 8 s``."""
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        rate = self.done / elapsed
        head = f"{self.desc}: " if self.desc else ""
        if self.total:
            percent = 100 * self.done / self.total
            text = f"{head}{self.done}/{self.total} {self.unit} ({percent:.0f}%)"
        else:
            text = f"{head}{self.done} {self.unit}"
        text += f", {rate:.1f} fps"
        if self.total and not self._closed and self.done and self.done < self.total:
            text += f", ETA {(self.total - self.done) / rate:.0f} s"
        elif self._closed:
            text += f", {elapsed:.1f} s"
        return text

    def _print(self, text: str, end: str) -> None:
        pad = max(self._width - len(text), 0)
        self._width = len(text)
        self.stream.write(text + " " * pad + end)
        self.stream.flush()

    def close(self) -> None:
        """Print the final line (once)."""
        if self._closed:
            return
        self._closed = True
        self._print(self.line(), end="\n")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
