"""What the engine gives per frame: a `Prediction`, or a `FrameError` naming why the frame was not scored.

Both are plain values on the host (numpy, no tensors): they may cross threads and outlive the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.regions import Defect


@dataclass
class Prediction:
    """The engine's verdict on one frame. `anomaly_map` is at model resolution and owned by this object."""

    product_class: str
    score: float
    threshold: float
    threshold_source: str  # "config", "option", "command", "calibration", "stale-calibration" or "default"
    is_anomalous: bool
    anomaly_map: np.ndarray  # float32 [S, S], values in [0, 1]
    frame_size: tuple[int, int]  # height, width of the frame it was computed from
    defects: list[Defect]
    prompt_version: str
    global_score: float
    map_max: float
    map_threshold: float  # regions are where the map reaches this (see docs/engine.md)
    class_word: str
    class_word_source: str
    ok: bool = field(default=True, init=False)

    def frame_map(self) -> np.ndarray:
        """The anomaly map resized to the frame (bilinear), computed on demand."""
        import cv2

        height, width = self.frame_size
        if (height, width) == self.anomaly_map.shape:
            return self.anomaly_map.copy()
        return cv2.resize(self.anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)


@dataclass
class FrameError:
    """A frame the engine could not score, and why; the other frames of its batch are unaffected."""

    index: int
    product_class: str
    reason: str
    ok: bool = field(default=False, init=False)


Outcome = Prediction | FrameError
