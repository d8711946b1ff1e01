"""trainer.metrics against scikit-learn, brute force, and a slow plainly written AUPRO."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from trainer.metrics import (
    COLUMNS,
    Evaluator,
    ImageMetrics,
    PixelMetrics,
    auroc,
    average_precision,
    f1_max,
)

# --- references ----------------------------------------------------------------------------


def brute_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """F1 of "score >= t" for every distinct score t, the best of them."""
    labels = labels.astype(bool)
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.sum(predicted & labels)
        fp = np.sum(predicted & ~labels)
        fn = np.sum(~predicted & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def slow_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Per-region overlap vs FPR, thresholds at every distinct score, area up to fpr_limit / fpr_limit."""
    regions = []
    negatives = []
    for anomaly_map, mask in zip(maps, masks, strict=True):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))  # 8-connected, as MVTec AD
        regions += [anomaly_map[labelled == k] for k in range(1, n + 1)]
        negatives.append(anomaly_map[mask == 0])
    negatives = np.concatenate(negatives)

    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        fprs.append(np.mean(negatives >= t))
        pros.append(np.mean([np.mean(region >= t) for region in regions]))

    area = 0.0
    for i in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[i - 1], fprs[i], pros[i - 1], pros[i]
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # interpolate the curve at fpr_limit and stop there
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


# --- data ----------------------------------------------------------------------------------


def smooth_maps(seed: int, n: int = 12, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Blurred noisy maps with 0-2 round defects per image, defects scoring higher."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for _ in range(n):
        mask = np.zeros((size, size), np.uint8)
        for _ in range(rng.integers(0, 3)):
            x, y = (int(v) for v in rng.integers(8, size - 8, 2))
            cv2.circle(mask, (x, y), int(rng.integers(2, 8)), 1, -1)
        scores = rng.normal(0.3, 0.1, (size, size)) + 0.35 * rng.random() * mask
        maps.append(np.clip(cv2.GaussianBlur(scores, (0, 0), 1.5), 0, 1))
        masks.append(mask.astype(bool))
    return np.array(maps), np.array(masks)


def hand_made_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """A few 32x32 sets with 1-3 regions per defective image, including corner-touching squares."""
    cases = []
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        masks = np.zeros((3, 32, 32), np.uint8)
        masks[0, 4:10, 4:12] = 1  # one region
        masks[1, 2:6, 2:6] = 1  # two squares touching at a corner: one 8-connected region
        masks[1, 6:10, 6:10] = 1
        masks[1, 20:28, 15:30] = 1
        cv2.circle(masks[2], (8, 24), 4, 1, -1)  # three regions
        masks[2, 3:6, 20:31] = 1
        masks[2, 15:17, 15:17] = 1
        base = cv2.GaussianBlur(rng.random((3, 32, 32)).transpose(1, 2, 0), (0, 0), 1.0).transpose(2, 0, 1)
        strength = rng.uniform(0.1, 0.5, (3, 1, 1))
        maps = np.clip(0.3 * base + strength * masks + 0.05 * rng.random((3, 32, 32)), 0, 1)
        good = np.clip(0.3 * rng.random((2, 32, 32)) + 0.1, 0, 1)  # defect-free images
        cases.append((np.concatenate([maps, good]), np.concatenate([masks, np.zeros((2, 32, 32), np.uint8)])))
    return cases


def chunked(maps: np.ndarray, masks: np.ndarray, parts: int = 3, bins: int = 4096) -> PixelMetrics:
    metrics = PixelMetrics(bins)
    for idx in np.array_split(np.arange(len(maps)), parts):
        metrics.update(maps[idx], masks[idx])
    return metrics


# --- image level: exact --------------------------------------------------------------------

tied_cases = st.integers(2, 40).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 6), min_size=n, max_size=n),  # few distinct values -> many ties
        st.lists(st.integers(0, 1), min_size=n, max_size=n),
    )
)


@settings(max_examples=60, deadline=None)
@given(tied_cases)
def test_image_auroc_and_ap_equal_sklearn(case: tuple[list[int], list[int]]) -> None:
    scores, labels = np.array(case[0]) / 6.0, np.array(case[1])
    assume(0 < labels.sum() < labels.size)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert f1_max(scores, labels) == pytest.approx(brute_f1_max(scores, labels), abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 300))
def test_image_metrics_accumulator_matches_sklearn_on_continuous_scores(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    assume(0 < labels.sum() < n)
    scores = rng.random(n) + 0.3 * labels
    metrics = ImageMetrics()
    for idx in np.array_split(np.arange(n), 4):
        metrics.update(scores[idx], labels[idx])
    result = metrics.compute()
    assert result["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert result["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
    assert result["image_f1_max"] == pytest.approx(brute_f1_max(scores, labels), abs=1e-12)
    assert metrics.nan_reasons() == {}


def test_image_metrics_single_class_is_nan_with_reason() -> None:
    good = ImageMetrics()
    good.update([0.1, 0.4, 0.2], [0, 0, 0])
    assert all(math.isnan(v) for v in good.compute().values())
    assert set(good.nan_reasons()) == {"image_auroc", "image_ap", "image_f1_max"}
    assert "no defective" in good.nan_reasons()["image_auroc"]

    bad = ImageMetrics()
    bad.update([0.1, 0.4], [True, True])
    result = bad.compute()
    assert math.isnan(result["image_auroc"])
    assert result["image_ap"] == 1.0 and result["image_f1_max"] == 1.0
    assert set(bad.nan_reasons()) == {"image_auroc"}

    assert set(ImageMetrics().nan_reasons()) == {"image_auroc", "image_ap", "image_f1_max"}


def test_plain_functions_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="labels"):
        auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, math.nan], [0, 1])
    with pytest.raises(ValueError, match="labels for"):
        auroc([0.1, 0.2], [0, 1, 1])
    assert math.isnan(auroc([], []))


# --- pixel level: binned -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_pixel_auroc_ap_f1_match_exact_on_all_pixels(seed: int) -> None:
    maps, masks = smooth_maps(seed)
    result = chunked(maps, masks, parts=3).compute()
    scores, labels = maps.ravel(), masks.ravel()
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=2e-3)
    assert result["pixel_ap"] == pytest.approx(average_precision_score(labels, scores), abs=2e-3)
    assert result["pixel_f1_max"] == pytest.approx(f1_max(scores, labels), abs=2e-3)


def test_pixel_f1_max_of_plain_function_matches_brute_force() -> None:
    maps, masks = hand_made_cases()[0]
    scores = np.round(maps.ravel(), 2)  # few distinct values keep the brute force quick
    labels = masks.ravel()
    assert f1_max(scores, labels) == pytest.approx(brute_f1_max(scores, labels), abs=1e-12)


@pytest.mark.parametrize("case", range(4))
def test_pixel_aupro_matches_slow_reference(case: int) -> None:
    maps, masks = hand_made_cases()[case]
    metrics = chunked(maps, masks, parts=2)
    assert metrics.regions == 1 + 2 + 3
    assert metrics.compute()["pixel_aupro"] == pytest.approx(slow_aupro(maps, masks), abs=1e-2)


def test_pixel_aupro_known_values() -> None:
    masks = np.zeros((2, 32, 32), bool)
    masks[0, 5:10, 5:10] = True
    masks[1, 20:30, 2:4] = True
    perfect = masks.astype(float) * 0.9 + 0.05
    assert chunked(perfect, masks, parts=2).compute()["pixel_aupro"] == pytest.approx(1.0)
    # One constant score: the curve jumps from (0, 0) to (1, 1); area to 0.3 is 0.045, / 0.3 = 0.15.
    flat = np.full(masks.shape, 0.5)
    assert slow_aupro(flat, masks) == pytest.approx(0.15)
    assert chunked(flat, masks, parts=2).compute()["pixel_aupro"] == pytest.approx(0.15)


def test_chunking_does_not_change_the_histograms() -> None:
    maps, masks = smooth_maps(7, n=6)
    whole, parts = chunked(maps, masks, parts=1), chunked(maps, masks, parts=6)
    np.testing.assert_array_equal(whole.pos_hist, parts.pos_hist)
    np.testing.assert_array_equal(whole.neg_hist, parts.neg_hist)
    np.testing.assert_allclose(whole.overlap_hist, parts.overlap_hist, rtol=1e-12)
    assert whole.compute() == pytest.approx(parts.compute(), abs=1e-12)


def test_memory_does_not_grow_with_updates() -> None:
    def arrays(m: PixelMetrics) -> dict[str, tuple[tuple[int, ...], int]]:
        return {k: (v.shape, v.nbytes) for k, v in vars(m).items() if isinstance(v, np.ndarray)}

    rng = np.random.default_rng(0)
    metrics = PixelMetrics(bins=1024)
    before = arrays(metrics)
    for _ in range(100):
        masks = rng.random((2, 16, 16)) > 0.8
        metrics.update(rng.random((2, 16, 16)), masks)
    assert arrays(metrics) == before
    assert sum(nbytes for _, nbytes in before.values()) == 3 * 1024 * 8
    assert not any(isinstance(v, (list, dict)) for v in vars(metrics).values())
    assert metrics.images == 200


def test_scores_outside_unit_interval_are_clipped() -> None:
    masks = np.array([[[True, False], [False, False]]])
    inside = chunked(np.array([[[1.0, 0.0], [0.2, 0.0]]]), masks, parts=1)
    outside = chunked(np.array([[[7.0, -3.0], [0.2, -0.1]]]), masks, parts=1)
    np.testing.assert_array_equal(inside.pos_hist, outside.pos_hist)
    np.testing.assert_array_equal(inside.neg_hist, outside.neg_hist)


def test_pixel_update_validates_input() -> None:
    metrics = PixelMetrics()
    with pytest.raises(ValueError, match="must both be"):
        metrics.update(np.zeros((2, 8, 8)), np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match="NaN"):
        metrics.update(np.full((8, 8), math.nan), np.zeros((8, 8)))
    metrics.update(np.zeros((8, 8)), np.full((8, 8), 255, np.uint8))  # [H,W] and 0/255 masks accepted
    assert metrics.positives == 64 and metrics.regions == 1


def test_all_good_pixels_are_nan_with_reason() -> None:
    metrics = PixelMetrics()
    metrics.update(np.random.default_rng(0).random((3, 16, 16)), np.zeros((3, 16, 16), bool))
    assert all(math.isnan(v) for v in metrics.compute().values())
    reasons = metrics.nan_reasons()
    assert set(reasons) == {"pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"}
    assert all("no defective" in why for why in reasons.values())


def test_all_defective_pixels_leave_only_ap_and_f1() -> None:
    metrics = PixelMetrics()
    metrics.update(np.random.default_rng(0).random((1, 8, 8)), np.ones((1, 8, 8), bool))
    result = metrics.compute()
    assert math.isnan(result["pixel_auroc"]) and math.isnan(result["pixel_aupro"])
    assert result["pixel_ap"] == 1.0 and result["pixel_f1_max"] == 1.0
    assert set(metrics.nan_reasons()) == {"pixel_auroc", "pixel_aupro"}


def test_no_pixel_data_is_nan_with_reason() -> None:
    metrics = PixelMetrics()
    assert all(math.isnan(v) for v in metrics.compute().values())
    assert all("no masks" in why for why in metrics.nan_reasons().values())


# --- per class -----------------------------------------------------------------------------


def test_evaluator_rows_mean_and_notes() -> None:
    maps, masks = smooth_maps(3, n=8)
    labels = masks.reshape(len(masks), -1).any(axis=1)
    assert 0 < labels.sum() < len(labels)
    scores = maps.reshape(len(maps), -1).max(axis=1)

    evaluator = Evaluator()
    evaluator.update("screw", scores[:4], labels[:4], maps[:4], masks[:4])
    evaluator.update("screw", scores[4:], labels[4:], maps[4:], masks[4:])
    evaluator.update("bottle", [0.1, 0.8, 0.3, 0.9], [0, 1, 0, 1])  # image-level only
    results = evaluator.compute()

    assert results["columns"] == list(COLUMNS)
    assert list(results["classes"]) == ["bottle", "screw"]
    screw, bottle, mean = results["classes"]["screw"], results["classes"]["bottle"], results["mean"]
    assert list(screw) == list(COLUMNS)
    assert screw["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=2e-3)
    assert screw["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert bottle["image_auroc"] == 1.0
    assert all(math.isnan(bottle[c]) for c in COLUMNS if c.startswith("pixel_"))
    # Image columns average both classes; pixel columns only the class that has masks.
    assert mean["image_auroc"] == pytest.approx((screw["image_auroc"] + 1.0) / 2)
    for column in ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro"):
        assert mean[column] == pytest.approx(screw[column])
    assert len(results["notes"]) == 1
    assert "bottle" in results["notes"][0] and "no masks" in results["notes"][0]
    assert "excluded from the mean" in results["notes"][0]
    assert results["counts"]["screw"] == {"images": 8, "defective": int(labels.sum()), "with_masks": 8}


def test_evaluator_rejects_masks_without_maps() -> None:
    with pytest.raises(ValueError, match="without anomaly maps"):
        Evaluator().update("x", [0.5], [1], None, np.ones((1, 4, 4)))
