"""Defect regions: connected parts of the thresholded map, each with a defect type.

Runs on the CPU on the model-resolution map (a few hundred pixels a side), and only
does the type averaging for images that have regions; boxes and areas are then
scaled to frame pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

MAX_REGIONS = 32


@dataclass(frozen=True)
class Defect:
    """One defect region, in frame pixels."""

    type: str
    type_probability: float
    score: float  # highest anomaly-map value inside the region
    area: int  # pixels of the frame
    bbox: tuple[int, int, int, int]  # x, y, width, height in the frame

    def as_dict(self) -> dict:
        return asdict(self)


def region_threshold(threshold: float, global_score: float, alpha: float, map_max: float, is_ng: bool) -> float:
    """The map level that makes regions agree with the verdict.

    score = alpha * global + (1 - alpha) * max(map) >= threshold  <=>  max(map) >= (threshold - alpha * global)
    / (1 - alpha). Regions are where the map reaches that level, so an NG frame has at least one (the peak)
    and an OK frame none. With alpha = 1 the map plays no part in the verdict: an NG frame then shows its
    peak region alone.
    """
    level = (threshold - alpha * global_score) / (1.0 - alpha) if alpha < 1.0 else map_max
    if is_ng:
        return float(min(level, map_max))  # rounding must never leave an NG frame without a region
    return float(max(level, np.nextafter(np.float32(map_max), np.float32(np.inf))))


def find_defects(
    anomaly_map: np.ndarray,
    threshold: float,
    frame_size: tuple[int, int],
    type_probabilities: np.ndarray | None,
    type_names: list[str],
    min_area: int = 16,
    keep_peak: bool = False,
) -> list[Defect]:
    """Regions of `anomaly_map` [S, S] >= threshold; type_probabilities [g, g, K] on the patch grid.

    Regions smaller than `min_area` are left out, except, with `keep_peak`, the one holding the map's
    maximum when no other is left (an NG verdict always shows where).
    """
    mask = (anomaly_map >= threshold).astype(np.uint8)
    if not mask.any():
        return []
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    keep = [r for r in range(1, count) if stats[r, cv2.CC_STAT_AREA] >= min_area]
    if not keep and keep_peak:
        at = np.unravel_index(int(np.argmax(anomaly_map)), anomaly_map.shape)
        keep = [int(labels[at])] if labels[at] > 0 else []
    if not keep:
        return []
    size = anomaly_map.shape[0]
    probs = None
    if type_probabilities is not None and type_names:
        probs = cv2.resize(type_probabilities.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        probs = probs.reshape(size, size, len(type_names))
    height, width = frame_size
    sx, sy = width / anomaly_map.shape[1], height / anomaly_map.shape[0]
    defects = []
    for r in keep:
        x, y, w, h, area = (int(v) for v in stats[r, :5])
        inside = labels[y : y + h, x : x + w] == r  # work on the region's box, not the whole map
        peak = float(anomaly_map[y : y + h, x : x + w][inside].max())
        if probs is not None:
            mean = probs[y : y + h, x : x + w][inside].mean(axis=0)
            k = int(mean.argmax())
            kind, kind_p = type_names[k], float(mean[k])
        else:
            kind, kind_p = "anomaly", float("nan")
        defects.append(
            Defect(
                type=kind,
                type_probability=kind_p,
                score=peak,
                area=round(area * sx * sy),
                bbox=(int(x * sx), int(y * sy), max(1, round(w * sx)), max(1, round(h * sy))),
            )
        )
    defects.sort(key=lambda d: d.score, reverse=True)
    return defects[:MAX_REGIONS]
