"""Pictures for the page: a frame scaled to the stream's width with its heat map blended in and the defect
boxes labelled "type score", a bare frame, a heat map, and their JPEG bytes. Drawing only; no I/O.

The heat map is the one `genclip score --out` draws (agent/overlay.py: JET, 0 blue, 1 red), blended at the
viewer's opacity (0: the frame alone). Boxes are in frame pixels in the result and scaled with the frame.
"""

from __future__ import annotations

import cv2
import numpy as np

from agent.overlay import BOX_COLOUR, heat_map, put_label, to_bgr8
from model.outcomes import Prediction

MIN_OPACITY_STEP = 10  # opacity is asked for in percent, rounded to this step (one encoding per step in use)


def opacity_step(percent: float) -> int:
    """An opacity in percent (any number) as one of 0, 10, ..., 100."""
    clipped = min(100.0, max(0.0, percent))
    return int(round(clipped / MIN_OPACITY_STEP) * MIN_OPACITY_STEP)


def scaled(image: np.ndarray, width: int) -> np.ndarray:
    """An 8-bit BGR copy of the frame, no wider than `width` (aspect kept)."""
    bgr = to_bgr8(image)
    height, frame_width = bgr.shape[:2]
    if frame_width <= width:
        return bgr
    new_height = max(1, round(height * width / frame_width))
    return cv2.resize(bgr, (width, new_height), interpolation=cv2.INTER_AREA)


def defect_text(defect_type: str, score: float) -> str:
    """'hole 0.87': the region's type and its peak score."""
    return defect_type if not np.isfinite(score) else f"{defect_type} {score:.2f}"


def overlay(image: np.ndarray, prediction: Prediction | None, width: int, opacity: int) -> np.ndarray:
    """The frame at most `width` wide, the heat map blended at `opacity` percent, defect boxes labelled."""
    base = scaled(image, width)
    if prediction is None:
        return base
    height, out_width = base.shape[:2]
    if opacity > 0:
        weight = opacity / 100.0
        base = cv2.addWeighted(base, 1.0 - weight, heat_map(prediction.anomaly_map, (height, out_width)), weight, 0)
    factor = out_width / image.shape[1]
    for defect in prediction.defects:
        x, y, w, h = (round(v * factor) for v in defect.bbox)
        cv2.rectangle(base, (x, y), (x + max(1, w) - 1, y + max(1, h) - 1), BOX_COLOUR, 2, cv2.LINE_AA)
        put_label(base, defect_text(defect.type, defect.score), (x, max(0, y - 18)), BOX_COLOUR)
    return base


def heat(prediction: Prediction, width: int, image_shape: tuple[int, ...]) -> np.ndarray:
    """The heat map alone, at the size `overlay` gives the frame (to lay over it with an opacity)."""
    height, frame_width = image_shape[:2]
    out_width = min(width, frame_width)
    out_height = max(1, round(height * out_width / frame_width))
    return heat_map(prediction.anomaly_map, (out_height, out_width))


def jpeg(image: np.ndarray, quality: int) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return data.tobytes()
