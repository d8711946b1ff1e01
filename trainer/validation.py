"""Model selection for zero-shot: validate on whole product classes the training never saw.

GenCLIP's promise is a product it was not trained on, so `best` is chosen on held-out
classes (leave-classes-out), not on held-out images of the trained classes, which
reward memorising those. When the data cannot support that (too few classes, or
too few images in the held-out ones), the run says so at the start and keeps the
last epoch. Every validation figure comes with its image counts and a bootstrap
95 % interval, so a user sees how far to trust the choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from trainer.config import TrainerConfig
from trainer.datasets import Sample
from trainer.metrics import auroc, auroc_from_histograms

MIN_TRAINING_CLASSES = 2
"""Classes left to train on: prompts learned from one class cannot show they generalise."""
HISTOGRAM_BINS = 256

SelectionRule = Literal["held-out classes", "last epoch"]


@dataclass(frozen=True)
class ValidationPlan:
    """Which samples train, which validate, and the rule that will choose `best` (with why)."""

    train: list[Sample]
    val: list[Sample]
    held_out: tuple[str, ...]
    rule: SelectionRule
    reason: str
    good: int = 0
    defective: int = 0

    def describe(self) -> str:
        if self.rule == "last epoch":
            return f"best = last epoch: {self.reason}"
        return (
            f"best = highest validation on held-out class(es) {', '.join(self.held_out)} "
            f"({self.good} good, {self.defective} defective images; not trained on)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "reason": self.reason,
            "held_out_classes": list(self.held_out),
            "good_images": self.good,
            "defective_images": self.defective,
            "train_images": len(self.train),
        }


def plan_validation(samples: list[Sample], settings: TrainerConfig) -> ValidationPlan:
    """Split `samples` by class for validation, or decide that validation would mislead and say why."""
    classes = sorted({s.product_class for s in samples})
    wanted = settings.holdout_class_names

    def everything(reason: str) -> ValidationPlan:
        return ValidationPlan(list(samples), [], (), "last epoch", reason)

    if wanted:
        unknown = sorted(set(wanted) - set(classes))
        if unknown:
            raise ValueError(
                f"[trainer].holdout_class_names: {', '.join(unknown)} not in the data (classes: {', '.join(classes)})"
            )
        held = sorted(set(wanted))
    elif settings.holdout_classes == 0:
        return everything("validation is off ([trainer].holdout_classes = 0)")
    else:
        k = settings.holdout_classes
        if len(classes) < k + MIN_TRAINING_CLASSES:
            return everything(
                f"the data has {len(classes)} product class(es); holding {k} out for validation needs at least "
                f"{k + MIN_TRAINING_CLASSES} (so {MIN_TRAINING_CLASSES} remain to train on)"
            )
        rng = np.random.default_rng(settings.seed)
        held = sorted(str(c) for c in rng.choice(classes, size=k, replace=False))
    if len(classes) - len(held) < 1:
        return everything("every class of the data would be held out; nothing would be left to train on")
    val = [s for s in samples if s.product_class in held]
    good = sum(1 for s in val if s.label == 0)
    defective = len(val) - good
    need = settings.min_validation_images
    if good < need or defective < need:
        return everything(
            f"held-out class(es) {', '.join(held)} have {good} good and {defective} defective images; "
            f"validation needs at least {need} of each ([trainer].min_validation_images)"
        )
    train = [s for s in samples if s.product_class not in held]
    return ValidationPlan(
        train, val, tuple(held), "held-out classes", "validation on classes the prompts never saw", good, defective
    )


# --- bootstrap interval -----------------------------------------------------------------------------


@dataclass
class ImageRecord:
    """What one validation image contributes: class, label, score and (with a mask) its pixel histograms."""

    product_class: str
    label: int
    score: float
    pos_hist: np.ndarray | None = None
    neg_hist: np.ndarray | None = None


@dataclass
class ValidationRecords:
    """Per-image records collected while validating (an `evaluate` hook), for the bootstrap."""

    rows: list[ImageRecord] = field(default_factory=list)

    def add(
        self, product_class: str, label: int, score: float, anomaly_map: np.ndarray, mask: np.ndarray | None
    ) -> None:
        pos = neg = None
        if mask is not None:
            bins = np.minimum((np.clip(anomaly_map, 0.0, 1.0) * HISTOGRAM_BINS).astype(np.intp), HISTOGRAM_BINS - 1)
            defect = mask > 0.5
            pos = np.bincount(bins[defect], minlength=HISTOGRAM_BINS)
            neg = np.bincount(bins[~defect], minlength=HISTOGRAM_BINS)
        self.rows.append(ImageRecord(product_class, int(label), float(score), pos, neg))


def _headline(rows: list[ImageRecord], index_by_class: dict[str, np.ndarray]) -> tuple[float, float, float]:
    """(mean image AUROC, mean pixel AUROC, their mean) over classes for the given image indices."""
    image, pixel = [], []
    for indices in index_by_class.values():
        chosen = [rows[i] for i in indices]
        image.append(auroc([r.score for r in chosen], [r.label for r in chosen]))
        with_masks = [r for r in chosen if r.pos_hist is not None]
        if with_masks:
            pixel.append(
                auroc_from_histograms(sum(r.pos_hist for r in with_masks), sum(r.neg_hist for r in with_masks))
            )
    image_mean = float(np.nanmean(image)) if not np.all(np.isnan(image)) else float("nan")
    pixel_mean = float(np.nanmean(pixel)) if pixel and not np.all(np.isnan(pixel)) else float("nan")
    parts = [v for v in (image_mean, pixel_mean) if not np.isnan(v)]
    return image_mean, pixel_mean, float(np.mean(parts)) if parts else float("nan")


def bootstrap_interval(records: ValidationRecords, rounds: int, seed: int = 0) -> dict[str, Any]:
    """95 % percentile intervals of image AUROC, pixel AUROC and their mean (the selection score), by
    resampling images with replacement within each class and label; with the counts they rest on."""
    rows = records.rows
    members: dict[str, dict[int, list[int]]] = {}
    for i, r in enumerate(rows):
        members.setdefault(r.product_class, {}).setdefault(r.label, []).append(i)
    groups = {c: {lab: np.asarray(ix) for lab, ix in by.items()} for c, by in members.items()}
    counts = {c: {"good": len(by.get(0, ())), "defective": len(by.get(1, ()))} for c, by in sorted(groups.items())}
    result: dict[str, Any] = {"rounds": rounds, "counts": counts}
    if rounds == 0 or not rows:
        return result
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(rounds):
        resampled = {
            c: np.concatenate([rng.choice(ix, size=len(ix), replace=True) for ix in by.values()])
            for c, by in groups.items()
        }
        draws.append(_headline(rows, resampled))
    values = np.asarray(draws, dtype=np.float64)
    for column, name in enumerate(("image_auroc", "pixel_auroc", "score")):
        finite = values[:, column][np.isfinite(values[:, column])]
        if finite.size:
            low, high = np.percentile(finite, [2.5, 97.5])
            result[name] = [round(float(low), 4), round(float(high), 4)]
    return result
