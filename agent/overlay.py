"""Overlay images: a prediction drawn over its frame, for people to look at.

Used by `genclip score --out` and, later, by the agent when it publishes overlays.
The overlay has the frame's own size: the anomaly map as a JET heat map blended
over an 8-bit BGR copy of the frame, a box and "type p=0.83" label per defect,
and a header strip with the verdict, score and threshold. Drawing only; no I/O.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from model import Prediction

HEAT_WEIGHT = 0.45  # share of the heat map in the blend; the rest is the frame
BOX_COLOUR = (255, 255, 255)  # white stands out on every JET colour
OK_COLOUR = (80, 220, 80)
NG_COLOUR = (60, 60, 255)
TEXT_BACKGROUND = (0, 0, 0)
FONT = cv2.FONT_HERSHEY_SIMPLEX


def to_bgr8(frame: np.ndarray) -> np.ndarray:
    """An 8-bit BGR copy of a uint8/uint16 gray, BGR or BGRA frame, scaled as the engine scales it.

    16-bit frames are divided by 257 (full 16-bit range -> 0..255), the same
    normalisation the engine uses, so the picture shows what the model saw.
    """
    if frame.dtype == np.uint16:
        frame = cv2.convertScaleAbs(frame, alpha=255.0 / 65535.0)
    elif frame.dtype != np.uint8:
        raise ValueError(f"expected uint8 or uint16 pixels, got {frame.dtype}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR)
    if frame.ndim == 3 and frame.shape[2] == 4:
        return np.ascontiguousarray(frame[:, :, :3])
    if frame.ndim == 3 and frame.shape[2] == 3:
        return frame.copy()
    raise ValueError(f"expected HxW gray or HxWx3 BGR, got shape {frame.shape}")


def heat_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A [0, 1] anomaly map as a JET colour image of `size` (height, width); 0 is blue, 1 is red."""
    height, width = size
    values: np.ndarray = np.nan_to_num(anomaly_map.astype(np.float32), nan=0.0)
    if values.shape != (height, width):
        values = cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)
    grey = np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.applyColorMap(grey, cv2.COLORMAP_JET)


def defect_label(defect_type: str, probability: float) -> str:
    """'scratch p=0.83', or just the type when the engine gave no type probability."""
    if probability is None or math.isnan(probability):
        return defect_type
    return f"{defect_type} p={probability:.2f}"


def _text_style(height: int, width: int) -> tuple[float, int]:
    """Font scale and thickness that stay legible from thumbnails to 4K frames."""
    scale = max(0.35, min(height, width) / 700.0)
    return scale, max(1, round(scale * 1.6))


def put_label(image: np.ndarray, text: str, origin: tuple[int, int], colour: tuple[int, int, int]) -> None:
    """Text on a filled black box whose top-left corner is `origin`, kept inside the image."""
    height, width = image.shape[:2]
    scale, thickness = _text_style(height, width)
    (tw, th), baseline = cv2.getTextSize(text, FONT, scale, thickness)
    pad = max(2, thickness)
    x = min(max(0, origin[0]), max(0, width - tw - 2 * pad))
    y = min(max(0, origin[1]), max(0, height - th - baseline - 2 * pad))
    cv2.rectangle(image, (x, y), (x + tw + 2 * pad, y + th + baseline + 2 * pad), TEXT_BACKGROUND, cv2.FILLED)
    cv2.putText(image, text, (x + pad, y + pad + th), FONT, scale, colour, thickness, cv2.LINE_AA)


def header_text(prediction: Prediction) -> str:
    """'NG score 0.734 / thr 0.500' - the verdict first, it is what an operator looks for."""
    verdict = "NG" if prediction.is_anomalous else "OK"
    return f"{verdict} score {prediction.score:.3f} / thr {prediction.threshold:.3f}"


def draw_overlay(frame: np.ndarray, prediction: Prediction, heat_weight: float = HEAT_WEIGHT) -> np.ndarray:
    """The frame (8-bit BGR) with the prediction's heat map, defect boxes and verdict drawn on it."""
    base = to_bgr8(frame)
    height, width = base.shape[:2]
    image = cv2.addWeighted(base, 1.0 - heat_weight, heat_map(prediction.anomaly_map, (height, width)), heat_weight, 0)
    _, thickness = _text_style(height, width)
    label_height = _label_height(image)
    for defect in prediction.defects:
        x, y, w, h = defect.bbox
        cv2.rectangle(image, (x, y), (x + w - 1, y + h - 1), BOX_COLOUR, thickness, cv2.LINE_AA)
        # above the box, else inside its top; never under the header strip
        label_y = max(label_height, y - label_height if y >= 2 * label_height else y)
        put_label(image, defect_label(defect.type, defect.type_probability), (x, label_y), BOX_COLOUR)
    put_label(image, header_text(prediction), (0, 0), NG_COLOUR if prediction.is_anomalous else OK_COLOUR)
    return image


def _label_height(image: np.ndarray) -> int:
    """Height in pixels of a one-line label box on this image, to place a label just above its box."""
    scale, thickness = _text_style(*image.shape[:2])
    (_, th), baseline = cv2.getTextSize("Ag", FONT, scale, thickness)
    return th + baseline + 2 * max(2, thickness)
