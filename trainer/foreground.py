"""Where the product is in a good image, so that synthetic defects land on it and not on the background.

`genclip synth --foreground` takes `all` (anywhere: textures, where the whole frame is product),
a folder of masks, or `auto`: the object is estimated as what stands out from the plain
background that touches the image border (in colour or in texture), cleaned up with morphology
and reduced to its largest connected piece. An estimate that is implausible is rejected with a
reason and the caller falls back to `all`, so full-frame textures keep the behaviour they always
had: next to nothing or almost the whole frame, many similar pieces (dots), thin lines or a
background cut into many pieces (a tile pattern's grout), or a region that barely stands out
(the brighter middle of a vignetted texture). Thresholds were chosen on the procedural textures
(none accepted without extra vignetting) and on textured parts on plain backdrops.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

AUTO, ALL = "auto", "all"
WORK_SIZE = 256
"""Longest side the estimate works at: enough for an outline, and a few ms per image."""
MIN_SHARE, MAX_SHARE = 0.01, 0.95
"""An estimate covering less or more of the image than this is not an object on a background."""
MIN_MAIN_OBJECT = 1 / 2
"""The object must hold at least this share of all that stands out (else: a pattern of separate pieces)."""
MIN_MAIN_BACKGROUND = 1 / 3
"""The largest background piece must hold at least this share of the background (else: a pattern)."""
MIN_THICKNESS = 0.04
"""An object thinner on average than this share of the image is more likely the lines of a pattern (grout)."""
MIN_CONTRAST = 1.4
"""Half the object's pixels must stand out by this many times the limit (tail of a texture, shading: ~1)."""
ENERGY_SIGMA = 1.0
"""Blur (px at WORK_SIZE) of the gradient energy: wider finds faint textures but spreads past edges."""
HALO = 3
"""Pixels (at WORK_SIZE) eroded from the estimate: how far the blurs spread past an edge."""


class ForegroundError(ValueError):
    """A foreground mask is missing, unreadable, empty or of the wrong size (the message names the file)."""


class Foreground(NamedTuple):
    """The product's pixels in one image and how they were found."""

    mask: np.ndarray | None  # bool HxW; None: the whole image
    used: str  # "auto", "all" or "mask"
    detail: str = ""  # why auto fell back to the whole image, or the mask file

    @property
    def share(self) -> float:
        return 1.0 if self.mask is None else float(self.mask.mean())


def _disc(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def estimate_foreground(image: np.ndarray) -> tuple[np.ndarray | None, str]:
    """(bool mask of the object, "") or (None, why not) for a uint8 BGR image of an object on a plain background.

    The background model is the median colour of a strip along the image border, and the spread
    of colour and of texture (gradient energy) in that strip: a pixel belongs to the object when
    it differs from the background by well over that spread. The result errs towards the inside
    of the object (its halo is eroded away), since a defect off the product is the failure to avoid.
    """
    height, width = image.shape[:2]
    scale = min(1.0, WORK_SIZE / max(height, width))
    small = image
    if scale < 1.0:
        small = cv2.resize(
            image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA
        )
    lab = cv2.cvtColor(small.astype(np.float32) / 255.0, cv2.COLOR_BGR2Lab)
    rows, cols = lab.shape[:2]
    size = min(rows, cols)
    strip = max(2, size // 32)
    border = np.ones((rows, cols), bool)
    border[strip:-strip, strip:-strip] = False

    smooth = cv2.GaussianBlur(lab, (0, 0), 1.5)
    colour = np.linalg.norm(smooth - np.median(smooth[border], axis=0), axis=2)
    gx = cv2.Sobel(lab[:, :, 0], cv2.CV_32F, 1, 0)
    gy = cv2.Sobel(lab[:, :, 0], cv2.CV_32F, 0, 1)
    energy = cv2.GaussianBlur(cv2.magnitude(gx, gy), (0, 0), ENERGY_SIGMA)
    # floors: a colour difference of 6 (CIELAB) and a luminance slope of 0.5 per pixel are not an object
    colour_limit = max(6.0, 3.0 * float(np.percentile(colour[border], 75)))
    energy_limit = max(4.0, 3.0 * float(np.percentile(energy[border], 75)))
    strength = np.maximum(colour / colour_limit, energy / energy_limit)  # > 1: stands out from the background

    found = cv2.morphologyEx((strength > 1).astype(np.uint8), cv2.MORPH_OPEN, _disc(1))
    found = cv2.morphologyEx(found, cv2.MORPH_CLOSE, _disc(max(1, size // 40)))
    count, labels, stats, _ = cv2.connectedComponentsWithStats(found, connectivity=8)
    if count < 2:
        return None, "nothing stands out from the border (a full-frame surface?)"
    areas = stats[1:, cv2.CC_STAT_AREA]
    largest = 1 + int(np.argmax(areas))
    if areas.max() < MIN_MAIN_OBJECT * areas.sum():
        return None, f"{count - 1} separate pieces stand out, none dominant (a pattern of dots or blobs?)"
    found = cv2.erode((labels == largest).astype(np.uint8), _disc(HALO))  # the blur and gradient halo

    share = float(found.mean())
    if share < MIN_SHARE:
        return None, f"the object found covers only {share:.1%} of the image (a full-frame surface?)"
    if share > MAX_SHARE:
        return None, f"the object found covers {share:.0%} of the image"
    outline = np.count_nonzero(found - cv2.erode(found, _disc(1), borderType=cv2.BORDER_CONSTANT, borderValue=0))
    thickness = 2 * np.count_nonzero(found) / max(1, int(outline))  # a ring of width w has area / outline = w / 2
    if thickness < MIN_THICKNESS * size:
        return None, f"the object found is {thickness / scale:.0f} px thick on average (the lines of a pattern?)"
    _, _, pieces, _ = cv2.connectedComponentsWithStats(1 - found, connectivity=4)
    areas = pieces[1:, cv2.CC_STAT_AREA]
    if areas.max() < MIN_MAIN_BACKGROUND * areas.sum():
        return None, f"the background is cut into {len(areas)} pieces (a pattern such as tiles, not one object)"
    contrast = float(np.median(strength[found > 0]))
    if contrast < MIN_CONTRAST:
        return None, f"the object found barely stands out ({contrast:.2f} x the background's spread; shading?)"
    if scale < 1.0:
        return cv2.resize(found * 255, (width, height), interpolation=cv2.INTER_LINEAR) > 127, ""
    return found.astype(bool), ""


def auto_foreground(image: np.ndarray) -> Foreground:
    """The estimated object, or the whole image with the reason when the estimate is not plausible."""
    mask, reason = estimate_foreground(image)
    return Foreground(mask, AUTO) if mask is not None else Foreground(None, ALL, f"auto: {reason}")


def mask_path(mask_dir: Path, source_dir: Path, image_path: Path) -> Path:
    """The mask of `image_path`: same path relative to the source folder, in `mask_dir`, as .png."""
    return mask_dir / image_path.relative_to(source_dir).with_suffix(".png")


def read_foreground_mask(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A binary mask (any non-zero value is product) that must match an image of `shape`."""
    if not path.is_file():
        raise ForegroundError(f"foreground mask {path} does not exist")
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ForegroundError(f"foreground mask {path} cannot be read as an image")
    if pixels.ndim == 3:
        pixels = pixels[:, :, : min(3, pixels.shape[2])].max(axis=2)
    if pixels.shape[:2] != shape[:2]:
        found, wanted = f"{pixels.shape[1]}x{pixels.shape[0]}", f"{shape[1]}x{shape[0]}"
        raise ForegroundError(f"foreground mask {path} is {found} but its image is {wanted}")
    mask = pixels > 0
    if not mask.any():
        raise ForegroundError(f"foreground mask {path} is all black: no product pixel to put a defect on")
    return mask
