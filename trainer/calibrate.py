"""Per-class thresholds from good parts: the score quantile of images known to be fine.

A line engineer has plenty of good parts and few defects, so the threshold is the
`quantile` (e.g. 99.5 %) of good images' scores: about that share of good parts
passes. The good images also decide the class word (CNF). Both go into the
class's profile (`model/profile.py`), a small JSON file in the line's profile
folder, with the prompt version and scoring settings they were measured with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.engine import Engine
from model.profile import ClassProfile, threshold_at_quantile
from trainer.datasets import IMAGE_EXTENSIONS, BadSampleError, read_bgr8

threshold_from_scores = threshold_at_quantile  # the trainer's name for it, kept for callers


@dataclass
class CalibrationRun:
    """What `calibrate` did: the class's new profile, and the images it could not read."""

    profile: ClassProfile
    skipped: list[str]

    @property
    def threshold(self) -> float:
        assert self.profile.calibration is not None
        return self.profile.calibration.threshold

    @property
    def images(self) -> int:
        assert self.profile.calibration is not None
        return self.profile.calibration.images


def good_images(folder: Path) -> list[Path]:
    """Image files under `folder`, recursively, sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"good-image folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_good_images(paths: list[Path]) -> tuple[list[np.ndarray], list[str]]:
    """The readable images, and '<path>: <reason>' for each one that is not."""
    frames, skipped = [], []
    for path in paths:
        try:
            frames.append(read_bgr8(path))
        except BadSampleError as exc:
            skipped.append(f"{path}: {exc.reason}")
    return frames, skipped


def calibrate(engine: Engine, product_class: str, paths: list[Path], quantile: float = 0.995) -> CalibrationRun:
    """Decide the class word from good images (CNF) and set the threshold at `quantile` of their scores."""
    frames, skipped = read_good_images(paths)
    if not frames:
        raise ValueError("no good images could be read")
    engine.register_class(product_class, frames, calibrate=False)
    return CalibrationRun(engine.calibrate_class(product_class, frames, quantile), skipped)
