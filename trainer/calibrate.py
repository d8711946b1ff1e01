"""Per-class thresholds from good parts: the score quantile of images known to be fine.

A line engineer has plenty of good parts and few defects, so the threshold is the
`quantile` (e.g. 99.5 %) of good images' scores: about that share of good parts
passes. A quantile needs 1/(1-q) images to be measured (200 for 0.995); with
fewer, the engine puts the threshold above the highest score by a margin and says
so (`model.profile.threshold_from_good`). The good images also decide the class
word (CNF). Both go into the class's profile (`model/profile.py`), a small JSON
file in the line's profile folder, with the prompt version and scoring settings
they were measured with; the profile it replaces is kept in `history/`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.engine import Engine
from model.image_files import is_image_name
from model.profile import ClassProfile, threshold_at_quantile
from trainer.datasets import BadSampleError, folder_name, read_bgr8

threshold_from_scores = threshold_at_quantile  # the trainer's name for it, kept for callers


class CalibrationInputError(ValueError):
    """The good images given cannot calibrate the class (missing folder, too few images...)."""


@dataclass
class CalibrationRun:
    """What `calibrate` did: the class's new profile, and the images it did not use (with why)."""

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


def good_folder(folder: Path, product_class: str | None = None) -> Path:
    """Where the class's good images are: `folder` itself, or its MVTec `train/good` (of the class).

    So `--good /data/mvtec` with `--class metal nut` reads `/data/mvtec/metal_nut/train/good`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationInputError(f"good-image folder not found: {folder}")
    candidates = [folder / "train" / "good"]
    if product_class:
        candidates.insert(0, folder / folder_name(product_class) / "train" / "good")
    return next((c for c in candidates if c.is_dir()), folder)


def good_images(folder: Path, product_class: str | None = None, *, recursive: bool = False) -> list[Path]:
    """The image files of the class's good-part folder (see `good_folder`), sorted; subfolders only if asked."""
    where = good_folder(folder, product_class)
    found = where.rglob("*") if recursive else where.iterdir()
    return sorted(p for p in found if p.is_file() and is_image_name(p))


def read_good_images(paths: list[Path]) -> tuple[list[np.ndarray], list[str]]:
    """The readable images of the most common size, and '<path>: <reason>' for each one left out.

    One camera gives one frame size, so an image of another size is most likely not a part of
    this class (a report, a crop, another camera) and would skew the threshold.
    """
    frames, kept, skipped = [], [], []
    for path in paths:
        try:
            frames.append(read_bgr8(path))
            kept.append(path)
        except BadSampleError as exc:
            skipped.append(f"{path}: {exc.reason}")
    if not frames:
        return [], skipped
    common, _ = Counter(f.shape[:2] for f in frames).most_common(1)[0]
    usable = []
    for path, frame in zip(kept, frames, strict=True):
        if frame.shape[:2] == common:
            usable.append(frame)
        else:
            h, w = frame.shape[:2]
            skipped.append(f"{path}: {w}x{h} pixels, unlike the other {common[1]}x{common[0]} images of this class")
    return usable, skipped


def calibrate(
    engine: Engine, product_class: str, paths: list[Path], quantile: float = 0.995, *, min_images: int = 1
) -> CalibrationRun:
    """Decide the class word from good images (CNF) and set the threshold from their scores.

    Refuses fewer than `min_images` usable images: a threshold from a handful of parts is a guess.
    """
    frames, skipped = read_good_images(paths)
    if len(frames) < min_images:
        raise CalibrationInputError(
            f"class '{product_class}': {len(frames)} usable good image(s)"
            + (f" ({len(skipped)} left out)" if skipped else "")
            + f"; calibration needs at least {min_images} ([trainer].calibrate_min_images or --min-images)"
        )
    engine.classes.register(product_class, frames, calibrate=False)
    return CalibrationRun(engine.classes.calibrate(product_class, frames, quantile), skipped)


def describe_change(old: ClassProfile | None, new: ClassProfile) -> str | None:
    """What replacing `old` by `new` changes, for the line engineer; None when there was no calibration."""
    if old is None or old.calibration is None or new.calibration is None:
        return None
    a, b = old.calibration, new.calibration
    parts = [f"threshold {a.threshold:.4f} -> {b.threshold:.4f}"]
    if a.images != b.images:
        parts.append(f"images {a.images} -> {b.images}")
    if a.quantile != b.quantile:
        parts.append(f"quantile {a.quantile} -> {b.quantile}")
    if a.rule != b.rule:
        parts.append(f"rule {a.rule} -> {b.rule}")
    if a.prompt_version != b.prompt_version:
        parts.append(f"prompts {a.prompt_version} -> {b.prompt_version}")
    if old.class_word != new.class_word:
        parts.append(f"class word '{old.class_word}' -> '{new.class_word}'")
    warning = " (FEWER images than before)" if b.images < a.images else ""
    return f"replaces the calibration of {a.measured_at}: " + ", ".join(parts) + warning
