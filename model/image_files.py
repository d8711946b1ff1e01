"""Image files: which names count as images, and one decoder for the trainer, `genclip score` and the agent.

Everything that reads an image file reads it here, so a file is accepted or refused for
the same reason whether it is training data, a folder-source frame or a `score` input.
(OpenCV is imported on first use: `genclip config check` stays quick.)
The bytes are read once and decoded from memory: a file replaced while it is read gives
one image or the other, never a mix.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
PIXEL_LIMIT_NAME = "[model].max_frame_pixels"
# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the image size.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


class ImageReadError(ValueError):
    """A file that is not a usable image; `reason` says why in a few words."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def is_image_name(path: Path) -> bool:
    """An image by its extension (any case), not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def header_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) from a PNG, JPEG, BMP or TIFF header, without decoding; None for other content.

    Only the header is looked at (JPEG: the segments up to the first frame header; TIFF: the first
    directory), so a file that claims 20000x20000 pixels is measured in microseconds and never allocated.
    """
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            return width, height
        if data[:2] == b"\xff\xd8":
            return _jpeg_size(data)
        if data[:2] == b"BM":
            (dib,) = struct.unpack("<I", data[14:18])
            if dib == 12:  # BITMAPCOREHEADER: 16-bit sizes
                width, height = struct.unpack("<HH", data[18:22])
            else:
                width, height = struct.unpack("<ii", data[18:26])
            return abs(width), abs(height)
        if data[:4] in (b"II*\x00", b"MM\x00*"):
            return _tiff_size(data)
    except struct.error:  # shorter than its header: the decoder will say it is truncated
        return None
    return None


def _jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # stand-alone markers
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return (width, height) if height else None  # height 0: given later by a DNL marker
        pos += 2 + length
    return None


def _tiff_size(data: bytes | memoryview) -> tuple[int, int] | None:
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[offset : offset + 2])
    found: dict[int, int] = {}
    for i in range(min(count, 4096)):
        entry = data[offset + 2 + 12 * i : offset + 14 + 12 * i]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag in (256, 257):  # ImageWidth, ImageLength: a SHORT (type 3) or a LONG
            value = entry[8:10] if kind == 3 else entry[8:12]
            (found[tag],) = struct.unpack(order + ("H" if kind == 3 else "I"), value)
    if 256 in found and 257 in found:
        return found[256], found[257]
    return None


def pixel_limit_error(width: int, height: int, max_pixels: int | None, setting: str = PIXEL_LIMIT_NAME) -> str | None:
    """The refusal of a width x height image over `max_pixels` (None: no limit), or None when it fits."""
    if max_pixels is None or width * height <= max_pixels:
        return None
    return f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels} ({setting})"


def decode_image(path: Path, what: str = "image", *, max_pixels: int | None = None) -> np.ndarray:
    """Decode any file OpenCV understands, keeping bit depth and channels (np.fromfile: non-ASCII paths).

    With `max_pixels`, a PNG, JPEG, BMP or TIFF whose header declares more pixels is refused before
    it is decoded (so it is never allocated); other formats are checked once decoded.
    """
    import cv2
    import numpy as np

    path = Path(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(path, f"cannot read {what}: {exc.strerror or exc}") from None
    if data.size == 0:
        raise ImageReadError(path, f"{what} file is empty")
    if max_pixels is not None:
        size = header_size(data.data)  # a view of the bytes, no copy
        refusal = pixel_limit_error(*size, max_pixels) if size is not None else None
        if refusal is not None:
            raise ImageReadError(path, refusal)
    try:
        pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageReadError(path, f"cannot decode {what}: {str(exc).strip()}") from None
    if pixels is None or pixels.size == 0:
        raise ImageReadError(path, f"{what} is not a decodable image")
    refusal = pixel_limit_error(pixels.shape[1], pixels.shape[0], max_pixels)
    if refusal is not None:
        raise ImageReadError(path, refusal)
    return pixels
