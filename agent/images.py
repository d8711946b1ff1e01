"""Image files as the engine takes them: one reader for `genclip score` and the folder source.

Both must accept and reject the same files for the same reasons, so that an image that
scores from the command line also scores when a frame grabber drops it into a folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from model.image_files import IMAGE_EXTENSIONS, ImageReadError, decode_image

if TYPE_CHECKING:
    import numpy as np

IMAGE_SUFFIXES = tuple(sorted(IMAGE_EXTENSIONS))
DEFAULT_MAX_PIXELS = 50_000_000  # [model].max_frame_pixels' default; callers pass the configured value


class UnreadableImageError(Exception):
    """An input that cannot be scored; the message says why, for the error line."""


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def read_frame(path: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The image as the engine takes it (uint8/uint16, gray HxW or BGR HxWx3), or UnreadableImageError.

    The bytes are read once and decoded from memory, so a file replaced while it is read
    gives either image, never a mix. An image over `max_pixels` ([model].max_frame_pixels) is
    refused from its header, before it is decoded, where the format gives its size there.
    """
    import numpy as np

    from model import InvalidFrameError
    from model.preprocess import check_frame

    if path.is_dir():
        raise UnreadableImageError(f"folder has no image files ({', '.join(s[1:] for s in IMAGE_SUFFIXES)})")
    if not path.exists():
        raise UnreadableImageError("file not found")
    if not path.is_file():
        raise UnreadableImageError("not a regular file")
    if not os.access(path, os.R_OK):
        raise UnreadableImageError("permission denied")
    try:
        frame = decode_image(path, max_pixels=max_pixels)
    except ImageReadError as exc:
        if "not a decodable" in exc.reason:
            raise UnreadableImageError("cannot decode: corrupt, truncated or not a supported image format") from None
        raise UnreadableImageError(exc.reason) from None
    if frame.dtype not in (np.uint8, np.uint16):
        raise UnreadableImageError(f"unsupported {frame.dtype} pixels: need 8- or 16-bit")
    if frame.ndim == 3 and frame.shape[2] == 2:  # gray + alpha
        frame = frame[:, :, 0]
    try:
        return check_frame(frame)  # drops an alpha channel, rejects odd shapes and tiny images
    except InvalidFrameError as exc:
        raise UnreadableImageError(exc.reason) from None
