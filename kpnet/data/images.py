"""Image files: the pixel limit and header probing (format and size without decoding).

The one place kpnet reads image headers: the training pipeline, the DLC loader,
``kpnet data check`` and ``kpnet predict`` probe through here, and refuse an image whose
header declares more than the pixel limit (:data:`MAX_PIXELS`, ``data.max_pixels`` in a
recipe, ``--max-pixels`` on the command line) before anything decodes it: a 20000x20000 PNG
of a few kilobytes would otherwise take 1.2 GB (RGB) to decode.

PNG (IHDR), JPEG (start-of-frame), GIF, BMP, WebP and TIFF headers are parsed here (a few
bytes each); other formats go through Pillow's lazy ``Image.open``, which reads the header
only.

Example:
    >>> import struct, zlib
    >>> ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    >>> png = (b"\\x89PNG\\r\\n\\x1a\\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
    ...        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))
    >>> header = header_of(png)
    >>> header, header.pixels
    (ImageHeader(format='png', height=20000, width=20000), 400000000)
    >>> print(too_large(header, MAX_PIXELS))
    the image is 20000x20000 = 400,000,000 pixels, over the limit of 178,956,970 \
(data.max_pixels); shrink it, or raise data.max_pixels if you trust the file
"""

from __future__ import annotations

import io
import os
import struct
import warnings
from dataclasses import dataclass
from typing import IO

from kpnet import fs
from kpnet.data.records import DataError

#: Largest image (height x width) kpnet decodes by default: Pillow's decompression-bomb
#: limit. Recipes override it with ``data.max_pixels``.
MAX_PIXELS = 178_956_970

PathLike = str | os.PathLike

JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # JPEG start-of-frame markers


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header declares.

    Attributes:
        format: ``"jpeg"``, ``"png"``, ``"gif"``, ``"bmp"``, ``"webp"``, ``"tiff"``, or
            Pillow's format name in lower case.
        height: rows, as declared (the file may hold fewer if it is truncated).
        width: columns, as declared.
    """

    format: str
    height: int
    width: int

    @property
    def pixels(self) -> int:
        """height x width."""
        return self.height * self.width

    @property
    def hw(self) -> tuple[int, int]:
        """(height, width)."""
        return self.height, self.width


def read_header(f: IO[bytes]) -> ImageHeader | None:
    """The header of the seekable binary file ``f`` (read from its start), or None when
    it is not an image format kpnet knows or the header is cut short or invalid."""
    f.seek(0)
    head = f.read(32)
    try:
        return _dispatch(f, head)
    except (struct.error, ValueError, OverflowError):  # a header cut short or nonsense
        return None


def _dispatch(f: IO[bytes], head: bytes) -> ImageHeader | None:
    if head.startswith(JPEG_MAGIC):
        return _header("jpeg", _jpeg_hw(f))
    if head.startswith(PNG_MAGIC):
        ok = head[12:16] == b"IHDR"
        return _header("png", _be32(head, 20, 16) if ok else None)
    if head.startswith((b"GIF87a", b"GIF89a")):
        return _header("gif", _le16(head, 8, 6))
    if head.startswith(b"BM") and len(head) >= 26:
        return _header("bmp", _bmp_hw(head))
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _header("webp", _webp_hw(head))
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return _header("tiff", _tiff_hw(f, "<" if head[:2] == b"II" else ">"))
    return _pillow_header(f) if head else None


def header_of(data: bytes) -> ImageHeader | None:
    """:func:`read_header` of an image file's bytes (or their first few kilobytes)."""
    return read_header(io.BytesIO(data))


def probe(path: PathLike) -> ImageHeader:
    """The header of the image file at ``path`` (local or a URL), without decoding.

    Raises:
        DataError: one line naming the file: it cannot be read, is empty, or is not an
            image whose size kpnet can read from its header.
    """
    try:
        with fs.open_file(path, "rb") as f:
            header = read_header(f)
            empty = header is None and not (f.seek(0) or f.read(1))
    except fs.io_errors() as err:
        reason = getattr(err, "strerror", None) or fs.reason(err)
        raise DataError(f"{path}: cannot read the image file ({reason})") from None
    if empty:
        raise DataError(f"{path}: the image file is empty")
    if header is None:
        raise DataError(f"{path}: not an image file, or its header is damaged (no size)")
    return header


def too_large(
    header: ImageHeader | tuple[int, int], max_pixels: int, setting: str = "data.max_pixels",
    what: str = "the image",
) -> str | None:  # fmt: skip
    """Why an image (a header or (H, W)) is too large to decode, or None when it is not;
    ``setting`` is the recipe key or option that raises the limit, ``what`` the subject."""
    h, w = header.hw if isinstance(header, ImageHeader) else (int(v) for v in header)
    if h * w <= max_pixels:
        return None
    return (
        f"{what} is {w}x{h} = {h * w:,} pixels, over the limit of {max_pixels:,} "
        f"({setting}); shrink it, or raise {setting} if you trust the file"
    )


# --------------------------------------------------------------------------- formats
def _header(fmt: str, hw: tuple[int, int] | None) -> ImageHeader | None:
    if hw is None or min(hw) <= 0:
        return None
    return ImageHeader(fmt, int(hw[0]), int(hw[1]))


def _be32(head: bytes, h_at: int, w_at: int) -> tuple[int, int] | None:
    if len(head) < max(h_at, w_at) + 4:
        return None
    return struct.unpack_from(">I", head, h_at)[0], struct.unpack_from(">I", head, w_at)[0]


def _le16(head: bytes, h_at: int, w_at: int) -> tuple[int, int] | None:
    if len(head) < max(h_at, w_at) + 2:
        return None
    return struct.unpack_from("<H", head, h_at)[0], struct.unpack_from("<H", head, w_at)[0]


def _jpeg_hw(f: IO[bytes]) -> tuple[int, int] | None:
    """(H, W) from a JPEG's start-of-frame segment (seeks over the others), or None."""
    f.seek(2)
    while True:
        marker = f.read(4)
        if len(marker) < 4 or marker[0] != 0xFF or marker[1] in (0xD9, 0xDA):
            return None
        if marker[1] == 0xFF:  # fill byte
            f.seek(-3, os.SEEK_CUR)
            continue
        if marker[1] in _SOF:
            sof = f.read(5)
            if len(sof) < 5:
                return None
            return int.from_bytes(sof[1:3], "big"), int.from_bytes(sof[3:5], "big")
        f.seek(int.from_bytes(marker[2:4], "big") - 2, os.SEEK_CUR)


def _bmp_hw(head: bytes) -> tuple[int, int]:
    if struct.unpack_from("<I", head, 14)[0] == 12:  # OS/2 BITMAPCOREHEADER
        w, h = struct.unpack_from("<HH", head, 18)
    else:
        w, h = struct.unpack_from("<ii", head, 18)
    return abs(h), w  # negative height: rows stored top-down


def _webp_hw(head: bytes) -> tuple[int, int] | None:
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack_from("<HH", head, 26)
        return h & 0x3FFF, w & 0x3FFF
    if chunk == b"VP8L" and head[20:21] == b"\x2f":
        bits = int.from_bytes(head[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if chunk == b"VP8X":
        return int.from_bytes(head[27:30], "little") + 1, int.from_bytes(head[24:27], "little") + 1
    return None


def _tiff_hw(f: IO[bytes], order: str) -> tuple[int, int] | None:
    """(H, W) from the first IFD's ImageLength / ImageWidth tags (classic TIFF)."""
    f.seek(4)
    f.seek(struct.unpack(order + "I", f.read(4))[0])
    raw = f.read(2)
    if len(raw) < 2:
        return None
    entries = f.read(12 * struct.unpack(order + "H", raw)[0])
    found: dict[int, int] = {}
    for at in range(0, len(entries) - 11, 12):
        tag, kind = struct.unpack_from(order + "HH", entries, at)
        if tag in (256, 257) and kind in (3, 4):  # SHORT or LONG
            found[tag] = struct.unpack_from(order + ("H" if kind == 3 else "I"), entries, at + 8)[0]
    return (found[257], found[256]) if len(found) == 2 else None


def _pillow_header(f: IO[bytes]) -> ImageHeader | None:
    """Other formats: Pillow's lazy open (header only). None when Pillow does not know the
    format, or refuses to open it as a decompression bomb (over twice its own limit)."""
    from PIL import Image

    f.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                return _header((im.format or "unknown").lower(), (im.height, im.width))
    except (OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError):
        return None
