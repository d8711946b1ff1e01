"""Image files: which names count as images, and one decoder for the trainer, `genclip score` and the agent.

Everything that reads an image file reads it here, so a file is accepted or refused for
the same reason whether it is training data, a folder-source frame or a `score` input.
(OpenCV is imported on first use: `genclip config check` stays quick.)
The bytes are read once and decoded from memory: a file replaced while it is read gives
one image or the other, never a mix.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})


class ImageReadError(ValueError):
    """A file that is not a usable image; `reason` says why in a few words."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def is_image_name(path: Path) -> bool:
    """An image by its extension (any case), not hidden."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def decode_image(path: Path, what: str = "image") -> np.ndarray:
    """Decode any file OpenCV understands, keeping bit depth and channels (np.fromfile: non-ASCII paths)."""
    import cv2
    import numpy as np

    path = Path(path)
    try:
        data = np.fromfile(str(path), dtype=np.uint8)
    except OSError as exc:
        raise ImageReadError(path, f"cannot read {what}: {exc.strerror or exc}") from None
    if data.size == 0:
        raise ImageReadError(path, f"{what} file is empty")
    try:
        pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageReadError(path, f"cannot decode {what}: {str(exc).strip()}") from None
    if pixels is None or pixels.size == 0:
        raise ImageReadError(path, f"{what} is not a decodable image")
    return pixels
