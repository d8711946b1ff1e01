"""Per-class thresholds from good parts: the score quantile of images known to be fine.

A line engineer has plenty of good parts and few defects, so the threshold is the
`quantile` (e.g. 99.5 %) of good images' scores: about that share of good parts
passes. It is stored in the checkpoint's header, where the agent reads it when
the config sets none.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from model.checkpoint import read_metadata, update_metadata
from model.engine import Engine
from trainer.datasets import IMAGE_EXTENSIONS, BadSampleError, read_bgr8


@dataclass
class Calibration:
    product_class: str
    threshold: float
    quantile: float
    images: int
    skipped: list[str]
    score_min: float
    score_median: float
    score_max: float


def good_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"good-image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def threshold_from_scores(scores: np.ndarray, quantile: float) -> float:
    """The score at `quantile` of good parts (the 'higher' value, so at most 1 - quantile of them reach it)."""
    if len(scores) == 0:
        raise ValueError("no good images were scored")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), quantile, method="higher"))


def calibrate(
    engine: Engine, product_class: str, paths: list[Path], quantile: float = 0.995, batch_size: int = 8
) -> Calibration:
    """Score good images of one class and return the threshold at `quantile`."""
    scores: list[float] = []
    skipped: list[str] = []
    for start in range(0, len(paths), batch_size):
        frames = []
        for path in paths[start : start + batch_size]:
            try:
                frames.append(read_bgr8(path))
            except BadSampleError as exc:
                skipped.append(f"{path}: {exc.reason}")
        if frames:
            scores.extend(p.score for p in engine.predict(frames, [product_class] * len(frames)))
    values = np.asarray(scores)
    return Calibration(
        product_class=product_class,
        threshold=threshold_from_scores(values, quantile),
        quantile=quantile,
        images=len(values),
        skipped=skipped,
        score_min=float(values.min()),
        score_median=float(np.median(values)),
        score_max=float(values.max()),
    )


def store_threshold(checkpoint: Path, result: Calibration) -> dict:
    """Write the class's threshold (and how it was found) into the checkpoint header, atomically."""
    meta = read_metadata(checkpoint)
    thresholds = dict(meta.get("thresholds") or {})
    thresholds[result.product_class] = result.threshold
    calibration = dict(meta.get("calibration") or {})
    calibration[result.product_class] = {
        "quantile": result.quantile,
        "images": result.images,
        "score_median": result.score_median,
        "score_max": result.score_max,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return update_metadata(checkpoint, {"thresholds": thresholds, "calibration": calibration})
