"""Evaluation like the zero-shot papers, through the same Engine the agent runs.

Used for validation during training (with the epoch's checkpoint hot-swapped in)
and by `genclip eval`; scores therefore include everything the line sees:
class-name filtering, both branches, fusion, blur.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import DataLoader

from model.engine import Engine
from model.outcomes import FrameError, Prediction
from trainer.datasets import InspectionDataset, Sample, SkippedSample, collate_inspection
from trainer.metrics import Evaluator
from trainer.report import GridExample, write_report, write_sample_grid

GridRow = GridExample
ImageHook = Callable[[str, int, float, np.ndarray, "np.ndarray | None"], None]


@dataclass
class EvalOutcome:
    """Metrics per class and mean, what was skipped, and examples per class for the picture."""

    results: dict[str, Any]
    images: int
    skipped: list[SkippedSample]
    seconds: float
    examples: dict[str, list[GridRow]] = field(default_factory=dict)
    scores: dict[str, list[tuple[float, int]]] = field(default_factory=dict)


def evaluate(
    engine: Engine,
    samples: list[Sample],
    *,
    batch_size: int = 8,
    workers: int = 0,
    grid_good: int = 0,
    grid_per_kind: int = 0,
    progress: Callable[[int, int], None] | None = None,
    on_image: ImageHook | None = None,
) -> EvalOutcome:
    """Score every sample with `engine` and compute image and pixel metrics per product class.

    `on_image(class, label, score, anomaly_map, mask or None)` sees every scored image (the
    trainer's bootstrap keeps what it needs from them)."""
    started = time.perf_counter()
    for name in dict.fromkeys(s.product_class for s in samples):
        if engine.classes.profile(name) is None:
            engine.classes.register(name)  # the plain class name, as for a class without reference images
    dataset = InspectionDataset(samples, engine.config.image_size, engine.config.defect_types)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_inspection
    )
    evaluator = Evaluator()
    skipped: list[SkippedSample] = []
    examples: dict[str, list[GridRow]] = {}
    scores: dict[str, list[tuple[float, int]]] = {}
    shown = grid_choice(samples, grid_good, grid_per_kind)
    done = 0
    for batch in loader:
        skipped.extend(batch["skipped"])
        done += len(batch["path"]) + len(batch["skipped"])
        if len(batch["path"]):
            skipped.extend(_score_batch(engine, batch, evaluator, examples, scores, shown, on_image))
        if progress:
            progress(done, len(dataset))
    results = evaluator.compute()
    return EvalOutcome(
        results=results,
        images=sum(c["images"] for c in results["counts"].values()),
        skipped=skipped,
        seconds=time.perf_counter() - started,
        examples={name: sorted(rows, key=lambda r: (r.kind != "good", r.kind)) for name, rows in examples.items()},
        scores=scores,
    )


def _score_batch(
    engine: Engine,
    batch: dict[str, Any],
    evaluator: Evaluator,
    examples: dict[str, list[GridRow]],
    scores: dict[str, list[tuple[float, int]]],
    shown: dict[str, str],
    on_image: ImageHook | None = None,
) -> list[SkippedSample]:
    """Score one batch into the evaluator; returns the frames the engine could not score."""
    frames = [np.ascontiguousarray(img.permute(1, 2, 0).numpy()) for img in batch["image"]]
    outcomes = engine.predict(frames, batch["class_name"])
    failed = [SkippedSample(batch["path"][p.index], p.reason) for p in outcomes if isinstance(p, FrameError)]
    predictions = {i: p for i, p in enumerate(outcomes) if isinstance(p, Prediction)}
    masks = batch["mask"][:, 0].numpy()
    labels = batch["label"].numpy()
    by_class: dict[str, list[int]] = {}
    for i, name in enumerate(batch["class_name"]):
        if i in predictions:
            by_class.setdefault(name, []).append(i)
    for name, indices in by_class.items():
        known = [i for i in indices if masks[i].min() >= 0]
        unknown = [i for i in indices if masks[i].min() < 0]
        for group, with_masks in ((known, True), (unknown, False)):
            if not group:
                continue
            group_scores = np.array([predictions[i].score for i in group])
            maps = np.stack([predictions[i].anomaly_map for i in group]) if with_masks else None
            evaluator.update(name, group_scores, labels[group], maps, masks[group] if with_masks else None)
        scores.setdefault(name, []).extend((predictions[i].score, int(labels[i])) for i in indices)
        if on_image is not None:
            for i in indices:
                mask = masks[i] if masks[i].min() >= 0 else None
                on_image(name, int(labels[i]), predictions[i].score, predictions[i].anomaly_map, mask)
        threshold = engine.classes.threshold(name)[0]
        for i in indices:
            kind = shown.get(str(batch["path"][i]))
            if kind is not None:
                mask = masks[i] if masks[i].min() >= 0 else None
                examples.setdefault(name, []).append(
                    GridExample(
                        frames[i],
                        mask,
                        predictions[i].anomaly_map,
                        kind,
                        predictions[i].score,
                        threshold,
                        int(labels[i]),
                    )
                )
    return failed


def grid_choice(samples: list[Sample], good: int, per_kind: int) -> dict[str, str]:
    """Which images the class pictures show: `good` good parts and `per_kind` of each defect kind per
    class, spread evenly over each group in path order (not the first few); image path -> kind."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for sample in samples:
        kind = "good" if sample.label == 0 else (sample.defect_type or "defect")
        groups.setdefault((sample.product_class, kind), []).append(sample)
    chosen: dict[str, str] = {}
    for (_, kind), members in groups.items():
        want = good if kind == "good" else per_kind
        if want <= 0:
            continue
        members.sort(key=lambda s: str(s.image_path))
        picks = np.unique(np.linspace(0, len(members) - 1, min(want, len(members))).round().astype(int))
        chosen.update({str(members[i].image_path): kind for i in picks})
    return chosen


def write_evaluation(out_dir: Path, outcome: EvalOutcome, meta: dict[str, Any]) -> list[Path]:
    """report.json, report.md and one sample grid PNG per class."""
    meta = {
        **meta,
        "images": outcome.images,
        "skipped": [f"{s.path}: {s.reason}" for s in outcome.skipped],
        "seconds": round(outcome.seconds, 2),
    }
    written = list(write_report(out_dir, outcome.results, meta))
    for name, rows in outcome.examples.items():
        if rows:
            path = Path(out_dir) / f"samples_{name.replace(' ', '_')}.png"
            written.append(write_sample_grid(path, rows, f"{name}: image | ground truth | anomaly map"))
    return written


def headline(results: dict[str, Any]) -> float:
    """One number to pick the best epoch: mean of image AUROC and pixel AUROC (image alone without masks)."""
    mean = results["mean"]
    values = [v for v in (mean.get("image_auroc"), mean.get("pixel_auroc")) if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")
