"""Anomaly-detection metrics as the zero-shot papers report them (AnomalyCLIP, AdaCLIP).

Image level (AUROC, AP, F1-max) is computed exactly: there is one score per image, so the
scores are simply kept. Pixel level (AUROC, AP, F1-max, AUPRO) is accumulated in fixed-bin
histograms over [0, 1], so a data set of any size is evaluated in O(bins) memory instead of
holding every pixel. Anomaly maps must therefore be in [0, 1]; values outside are clipped into
the first or last bin. Pixels whose scores share a bin count as tied, which moves the pixel
metrics by well under 1e-3 with the default 4096 bins.

Conventions follow the references: a prediction is "score >= threshold"; AUROC is the
trapezoid under the ROC curve (ties give diagonal steps); AP is scikit-learn's step-wise
average precision; F1-max is the best F1 over all thresholds; AUPRO is the MVTec AD
evaluation code's per-region overlap integrated over FPR in [0, 0.3] and divided by 0.3,
with regions as 8-connected components of each ground-truth mask.

A metric that is undefined on the data (e.g. AUROC without any defect) is NaN, and each
accumulator's `nan_reasons()` says why.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

IMAGE_COLUMNS: tuple[str, ...] = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_COLUMNS: tuple[str, ...] = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")
COLUMNS: tuple[str, ...] = IMAGE_COLUMNS + PIXEL_COLUMNS
"""The papers' column order for one result row."""

AUPRO_FPR_LIMIT = 0.3
NAN = math.nan

_NO_POSITIVES = "no defective samples: every label/mask is good"
_NO_NEGATIVES = "no good samples: every label/mask is defective"
_NO_PIXEL_GT = "no masks were given: image-level-only data"
_NO_IMAGES = "no images were given"


# --- curves from cumulative counts -------------------------------------------------------
# Every metric below works on (tps, fps): true and false positive counts when predicting
# "score >= t" for each candidate threshold t, in descending order of t. Exact scores and
# histogram bins both reduce to this form, so one implementation serves both.


def _auroc_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    n_pos, n_neg = (int(tps[-1]), int(fps[-1])) if tps.size else (0, 0)
    if n_pos == 0 or n_neg == 0:
        return NAN
    tpr = np.concatenate(([0.0], tps / n_pos))
    fpr = np.concatenate(([0.0], fps / n_neg))
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2.0)


def _ap_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    n_pos = int(tps[-1]) if tps.size else 0
    if n_pos == 0:
        return NAN
    predicted = tps + fps
    precision = np.divide(tps, predicted, out=np.zeros(tps.shape), where=predicted > 0)
    recall_gain = np.diff(tps, prepend=0) / n_pos
    return float(np.sum(recall_gain * precision))


def _f1_max_from_counts(tps: np.ndarray, fps: np.ndarray) -> float:
    n_pos = int(tps[-1]) if tps.size else 0
    if n_pos == 0:
        return NAN
    # F1 = 2 tp / (2 tp + fp + fn) and tp + fn = n_pos.
    return float(np.max(2.0 * tps / (tps + fps + n_pos)))


def _counts_from_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tps, fps) at every distinct score, so tied scores enter the curve together."""
    if scores.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    last_of_tie = np.concatenate((np.flatnonzero(np.diff(sorted_scores)), [scores.size - 1]))
    tps = np.cumsum(labels[order], dtype=np.int64)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps


def _counts_from_histograms(pos_hist: np.ndarray, neg_hist: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(tps, fps) at every bin's lower edge, highest bin first."""
    return np.cumsum(pos_hist[::-1]), np.cumsum(neg_hist[::-1])


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [x[0], x_max], x non-decreasing, y interpolated at x_max.

    Same rule as `trapezoid(..., x_max)` in the MVTec AD evaluation code.
    """
    k = int(np.searchsorted(x, x_max, side="right"))  # x[:k] <= x_max
    xs, ys = x[:k], y[:k]
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)
    if k < x.size and xs[-1] < x_max:
        y_at = ys[-1] + (y[k] - ys[-1]) * (x_max - xs[-1]) / (x[k] - xs[-1])
        area += float(0.5 * (y_at + ys[-1]) * (x_max - xs[-1]))
    return area


def _reasons_for(columns: tuple[str, ...], n_pos: int, n_neg: int, need_neg: set[str]) -> dict[str, str]:
    if n_pos == 0 and n_neg == 0:
        return dict.fromkeys(columns, _NO_IMAGES)
    if n_pos == 0:
        return dict.fromkeys(columns, _NO_POSITIVES)
    if n_neg == 0:
        return {c: _NO_NEGATIVES for c in columns if c in need_neg}
    return {}


# --- plain functions -----------------------------------------------------------------------


def _as_scores(scores: npt.ArrayLike) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return s


def _as_labels(labels: npt.ArrayLike, size: int) -> np.ndarray:
    y = np.asarray(labels).ravel()
    if y.size != size:
        raise ValueError(f"{y.size} labels for {size} scores")
    if y.dtype != np.bool_ and not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0/1 or bool")
    return y.astype(bool)


def auroc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Area under the ROC curve (ties handled as sklearn's roc_auc_score); NaN without both classes."""
    s = _as_scores(scores)
    return _auroc_from_counts(*_counts_from_scores(s, _as_labels(labels, s.size)))


def auroc_from_histograms(pos_hist: npt.ArrayLike, neg_hist: npt.ArrayLike) -> float:
    """Pixel AUROC from per-bin counts of defective and good pixels (NaN without both)."""
    return _auroc_from_counts(*_counts_from_histograms(np.asarray(pos_hist), np.asarray(neg_hist)))


def average_precision(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Step-wise AP as sklearn's average_precision_score; NaN without positives."""
    s = _as_scores(scores)
    return _ap_from_counts(*_counts_from_scores(s, _as_labels(labels, s.size)))


def f1_max(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Best F1 over all thresholds "score >= t"; NaN without positives."""
    s = _as_scores(scores)
    return _f1_max_from_counts(*_counts_from_scores(s, _as_labels(labels, s.size)))


# --- accumulators --------------------------------------------------------------------------


class ImageMetrics:
    """Image-level metrics, exact: one score per image is few enough to keep."""

    def __init__(self) -> None:
        self._scores: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []

    def update(self, scores: npt.ArrayLike, labels: npt.ArrayLike) -> None:
        """Add a batch of image scores and their 0/1 labels (1 = defective)."""
        s = _as_scores(scores)
        self._scores.append(s)
        self._labels.append(_as_labels(labels, s.size))

    @property
    def scores(self) -> np.ndarray:
        return np.concatenate(self._scores) if self._scores else np.zeros(0)

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate(self._labels) if self._labels else np.zeros(0, bool)

    @property
    def count(self) -> int:
        return sum(s.size for s in self._scores)

    @property
    def defective(self) -> int:
        return int(sum(y.sum() for y in self._labels))

    def compute(self) -> dict[str, float]:
        tps, fps = _counts_from_scores(self.scores, self.labels)
        return {
            "image_auroc": _auroc_from_counts(tps, fps),
            "image_ap": _ap_from_counts(tps, fps),
            "image_f1_max": _f1_max_from_counts(tps, fps),
        }

    def nan_reasons(self) -> dict[str, str]:
        """Why each NaN metric of `compute()` is undefined; empty when all are defined."""
        n_pos = self.defective
        return _reasons_for(IMAGE_COLUMNS, n_pos, self.count - n_pos, {"image_auroc"})


class PixelMetrics:
    """Pixel-level metrics from fixed-bin histograms: memory O(bins), whatever the data size.

    Anomaly maps are expected in [0, 1] (values outside are clipped). Per bin it keeps the
    counts of defective and good pixels (for AUROC, AP, F1-max, and the FPR of AUPRO) and,
    for AUPRO, the sum over ground-truth regions of (region pixels in the bin) / (region
    size). Summed from the top bin down, the latter is the sum over regions of each region's
    overlap at that threshold; divided by the number of regions it is the PRO curve.
    """

    def __init__(self, bins: int = 4096) -> None:
        if bins < 2:
            raise ValueError("bins must be >= 2")
        self.bins = bins
        self.pos_hist = np.zeros(bins, np.int64)
        self.neg_hist = np.zeros(bins, np.int64)
        self.overlap_hist = np.zeros(bins, np.float64)
        self.regions = 0
        self.images = 0

    def update(self, anomaly_maps: npt.ArrayLike, masks: npt.ArrayLike) -> None:
        """Add a batch: anomaly maps [N,H,W] (or [H,W]) in [0, 1] and masks of the same shape.

        Masks may be bool, 0/1 or 0/255; a pixel is defective where the mask is > 0.5.
        """
        maps = np.asarray(anomaly_maps, dtype=np.float64)
        gt = np.asarray(masks)
        if maps.ndim == 2:
            maps = maps[None]
        if gt.ndim == 2:
            gt = gt[None]
        if maps.ndim != 3 or maps.shape != gt.shape:
            raise ValueError(f"anomaly maps {maps.shape} and masks {gt.shape} must both be [N,H,W]")
        if not np.isfinite(maps).all():
            raise ValueError("anomaly maps contain NaN or inf")
        defect = gt if gt.dtype == np.bool_ else gt > 0.5
        bin_index = np.minimum((np.clip(maps, 0.0, 1.0) * self.bins).astype(np.intp), self.bins - 1)

        self.pos_hist += np.bincount(bin_index[defect], minlength=self.bins)
        self.neg_hist += np.bincount(bin_index[~defect], minlength=self.bins)
        weights = self._region_weights(defect)
        self.overlap_hist += np.bincount(bin_index[defect], weights=weights[defect], minlength=self.bins)
        self.images += maps.shape[0]

    def _region_weights(self, defect: np.ndarray) -> np.ndarray:
        """1 / (size of its 8-connected region) for each defective pixel, 0 elsewhere."""
        weights = np.zeros(defect.shape, np.float64)
        for i in np.flatnonzero(defect.reshape(defect.shape[0], -1).any(axis=1)):
            n_labels, labels = cv2.connectedComponents(defect[i].astype(np.uint8), connectivity=8)
            inverse_size = 1.0 / np.maximum(np.bincount(labels.ravel(), minlength=n_labels), 1)
            inverse_size[0] = 0.0  # background
            weights[i] = inverse_size[labels]
            self.regions += n_labels - 1
        return weights

    @property
    def positives(self) -> int:
        return int(self.pos_hist.sum())

    @property
    def negatives(self) -> int:
        return int(self.neg_hist.sum())

    def compute(self) -> dict[str, float]:
        tps, fps = _counts_from_histograms(self.pos_hist, self.neg_hist)
        return {
            "pixel_auroc": _auroc_from_counts(tps, fps),
            "pixel_ap": _ap_from_counts(tps, fps),
            "pixel_f1_max": _f1_max_from_counts(tps, fps),
            "pixel_aupro": self._aupro(),
        }

    def _aupro(self) -> float:
        n_neg = self.negatives
        if self.regions == 0 or n_neg == 0:
            return NAN
        fpr = np.concatenate(([0.0], np.cumsum(self.neg_hist[::-1]) / n_neg))
        pro = np.concatenate(([0.0], np.cumsum(self.overlap_hist[::-1]) / self.regions))
        np.minimum(pro, 1.0, out=pro)  # float rounding only
        return float(_area_up_to(fpr, pro, AUPRO_FPR_LIMIT) / AUPRO_FPR_LIMIT)

    def nan_reasons(self) -> dict[str, str]:
        """Why each NaN metric of `compute()` is undefined; empty when all are defined."""
        if self.images == 0:
            return dict.fromkeys(PIXEL_COLUMNS, _NO_PIXEL_GT)
        return _reasons_for(PIXEL_COLUMNS, self.positives, self.negatives, {"pixel_auroc", "pixel_aupro"})


# --- per-class evaluation ------------------------------------------------------------------


class Evaluator:
    """One ImageMetrics + PixelMetrics per product class; rows per class plus their mean.

    `compute()` returns {"columns", "classes": {name: row}, "mean": row, "counts", "notes"},
    the `results` that `trainer.report.write_report` writes. A NaN cell is left out of the
    mean of its column, and a note says which and why.
    """

    def __init__(self, bins: int = 4096) -> None:
        self.bins = bins
        self._image: dict[str, ImageMetrics] = {}
        self._pixel: dict[str, PixelMetrics] = {}

    def update(
        self,
        product_class: str,
        image_scores: npt.ArrayLike,
        image_labels: npt.ArrayLike,
        anomaly_maps: npt.ArrayLike | None = None,
        masks: npt.ArrayLike | None = None,
    ) -> None:
        """Add a batch of one class. Without `masks` the batch counts for image metrics only.

        Good images of a data set with masks need all-zero masks, not None.
        """
        if product_class not in self._image:
            self._image[product_class] = ImageMetrics()
            self._pixel[product_class] = PixelMetrics(self.bins)
        self._image[product_class].update(image_scores, image_labels)
        if masks is not None:
            if anomaly_maps is None:
                raise ValueError("masks were given without anomaly maps")
            self._pixel[product_class].update(anomaly_maps, masks)

    @property
    def classes(self) -> list[str]:
        return sorted(self._image)

    def compute(self) -> dict[str, Any]:
        rows: dict[str, dict[str, float]] = {}
        reasons: dict[str, dict[str, str]] = {}
        counts: dict[str, dict[str, int]] = {}
        for name in self.classes:
            image, pixel = self._image[name], self._pixel[name]
            rows[name] = {**image.compute(), **pixel.compute()}
            reasons[name] = {**image.nan_reasons(), **pixel.nan_reasons()}
            counts[name] = {"images": image.count, "defective": image.defective, "with_masks": pixel.images}
        mean, notes = mean_row(rows, reasons)
        return {"columns": list(COLUMNS), "classes": rows, "mean": mean, "counts": counts, "notes": notes}


def mean_row(
    rows: dict[str, dict[str, float]], reasons: dict[str, dict[str, str]] | None = None
) -> tuple[dict[str, float], list[str]]:
    """Column means over classes, skipping NaN cells; notes name each skipped cell and why."""
    reasons = reasons or {}
    mean: dict[str, float] = {}
    for column in COLUMNS:
        values = [row[column] for row in rows.values() if not math.isnan(row.get(column, NAN))]
        mean[column] = float(np.mean(values)) if values else NAN
    notes = []
    for name, row in rows.items():
        by_reason: dict[str, list[str]] = {}
        for column in COLUMNS:
            if math.isnan(row.get(column, NAN)):
                why = reasons.get(name, {}).get(column, "undefined")
                by_reason.setdefault(why, []).append(column)
        for why, columns in by_reason.items():
            notes.append(f"{name}: {', '.join(columns)} undefined ({why}); excluded from the mean")
    return mean, notes
