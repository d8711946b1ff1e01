"""`genclip eval --shots K`: zero-shot, memory-only and fused figures side by side, K good references per class.

For each class of the evaluated samples, K references are drawn (the seed picks them) from the class's good
images of the training split, never from the evaluated images (refused if they overlap); the class's patch
memory is built from them through the engine (`ClassRegistry.build_memory`), and the same images are
scored three ways through `trainer.evaluate.evaluate`, the agent's path: zero-shot (no memory, once:
it does not depend on K), memory-only (b = 1: the few-shot map, in zero-shot units, with the global term
of the image score as configured by score_alpha) and fused (b = the given weight). Each figure is the mean
over classes, then mean and spread (population standard deviation, min, max) over the seeds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.engine import Engine
from trainer.calibrate import read_good_images
from trainer.config import SPLITS
from trainer.datasets import Sample
from trainer.evaluate import evaluate

MODES = ("zero-shot", "memory-only", "fused")
FIGURES = ("image_auroc", "image_ap", "pixel_auroc", "pixel_aupro")


class ShotsInputError(ValueError):
    """The references asked for cannot be drawn (too few good training images, overlap with the test set)."""


@dataclass(frozen=True)
class ShotRun:
    """The mean-over-classes figures of one mode at K shots with one seed (zero-shot: K = 0, seed -1)."""

    mode: str
    shots: int
    seed: int
    figures: dict[str, float]
    references: dict[str, list[str]] = field(default_factory=dict)  # class -> reference image paths
    memory_seconds: float = 0.0  # building the memories (features, statistics)


@dataclass(frozen=True)
class ShotsOutcome:
    runs: list[ShotRun]
    weight: float
    seconds: float

    def summary(self) -> list[dict[str, Any]]:
        """One row per (mode, K): each figure's mean, std, min and max over seeds."""
        rows = []
        keys = dict.fromkeys((r.mode, r.shots) for r in self.runs)
        for mode, shots in keys:
            runs = [r for r in self.runs if (r.mode, r.shots) == (mode, shots)]
            row: dict[str, Any] = {"mode": mode, "shots": shots, "seeds": len(runs)}
            for name in FIGURES:
                values = np.array([r.figures.get(name, np.nan) for r in runs], dtype=float)
                row[name] = _spread(values)
            rows.append(row)
        return rows


def _finite(value: float) -> float | None:
    return None if np.isnan(value) else value


def _spread(values: np.ndarray) -> dict[str, float | None]:
    if np.isnan(values).all():
        return {"mean": None, "std": None, "min": None, "max": None}
    return {
        "mean": float(np.nanmean(values)),
        "std": float(np.nanstd(values)),
        "min": float(np.nanmin(values)),
        "max": float(np.nanmax(values)),
    }


def training_spec(spec: str) -> str:
    """The same data set's training split: `KIND:PATH[@SPLIT]` -> `KIND:PATH@train`."""
    kind, _, rest = spec.partition(":")
    path, at, split = rest.rpartition("@")
    return f"{kind}:{path if at and split.strip().lower() in SPLITS else rest}@train"


def write_shots(out_dir: Path, outcome: ShotsOutcome, meta: dict[str, Any]) -> list[Path]:
    """shots.json (every run and the summary) and shots.md (the table)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = [{**asdict(r), "figures": {k: _finite(v) for k, v in r.figures.items()}} for r in outcome.runs]
    data = {"meta": meta, "weight": outcome.weight, "seconds": round(outcome.seconds, 2), "summary": outcome.summary()}
    json_path = out_dir / "shots.json"
    json_path.write_text(json.dumps({**data, "runs": runs}, indent=2, allow_nan=False, default=str) + "\n")
    md_path = out_dir / "shots.md"
    md_path.write_text(f"# Few-shot memory vs zero-shot (b = {outcome.weight})\n\n{format_table(outcome)}\n")
    return [json_path, md_path]


def draw_references(good: Sequence[Sample], shots: int, seed: int) -> list[Sample]:
    """`shots` of the good training images, picked by `seed` (sorted by path first: same seed, same picks)."""
    ordered = sorted(good, key=lambda s: str(s.image_path))
    if len(ordered) < shots:
        raise ShotsInputError(f"{shots} shots asked, but only {len(ordered)} good training image(s)")
    picks = np.random.default_rng(seed).choice(len(ordered), size=shots, replace=False)
    return [ordered[i] for i in sorted(picks)]


def _mean_figures(results: dict[str, Any]) -> dict[str, float]:
    mean = results["mean"]
    return {name: float(mean[name]) if mean.get(name) is not None else float("nan") for name in FIGURES}


def evaluate_shots(
    engine: Engine,
    samples: list[Sample],
    training: list[Sample],
    *,
    shots: Sequence[int] = (1, 2, 4, 8),
    seeds: Sequence[int] = (0, 1, 2),
    weight: float = 0.5,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
) -> ShotsOutcome:
    """Zero-shot once, then memory-only and fused for every K and seed (module docstring)."""
    started = time.perf_counter()
    classes = list(dict.fromkeys(s.product_class for s in samples))
    tested = {str(s.image_path.resolve()) for s in samples}
    good = {name: [s for s in training if s.product_class == name and s.label == 0] for name in classes}
    for name in classes:
        if not good[name]:
            raise ShotsInputError(f"class '{name}': no good images in the training split to draw references from")
        if overlap := tested & {str(s.image_path.resolve()) for s in good[name]}:
            raise ShotsInputError(f"class '{name}': {len(overlap)} reference candidate(s) are evaluated images too")
        if engine.classes.profile(name) is None:
            engine.classes.register(name)
    say = progress or (lambda _text: None)
    for name in classes:
        engine.classes.use_memory(name, None)
    runs = [ShotRun("zero-shot", 0, -1, _mean_figures(evaluate(engine, samples, batch_size=batch_size).results))]
    say(f"zero-shot: {runs[0].figures}")
    try:
        for k in shots:
            for seed in seeds:
                built = time.perf_counter()
                memories, references = {}, {}
                for name in classes:
                    picked = draw_references(good[name], k, seed)
                    frames, skipped = read_good_images([s.image_path for s in picked])
                    if skipped:
                        raise ShotsInputError(f"class '{name}': references unusable: {'; '.join(skipped)}")
                    memories[name] = engine.classes.build_memory(name, frames)
                    references[name] = [str(s.image_path) for s in picked]
                memory_s = time.perf_counter() - built
                for mode, b in (("memory-only", 1.0), ("fused", weight)):
                    for name in classes:
                        engine.classes.use_memory(name, memories[name], b)
                    figures = _mean_figures(evaluate(engine, samples, batch_size=batch_size).results)
                    runs.append(ShotRun(mode, k, seed, figures, references, memory_s))
                    say(f"K={k} seed={seed} {mode}: {figures}")
    finally:
        for name in classes:
            engine.classes.use_memory(name, None)
    return ShotsOutcome(runs, weight, time.perf_counter() - started)


def format_table(outcome: ShotsOutcome) -> str:
    """The side-by-side table `genclip eval --shots` prints: mean +- std (min-max) over seeds."""
    lines = [
        f"| mode | K | seeds | {' | '.join(FIGURES)} |",
        "|---|---|---|" + "---|" * len(FIGURES),
    ]
    for row in outcome.summary():
        cells = []
        for name in FIGURES:
            s = row[name]
            cells.append(
                "-" if s["mean"] is None else f"{s['mean']:.3f} +- {s['std']:.3f} ({s['min']:.3f}-{s['max']:.3f})"
            )
        shots = "-" if row["mode"] == "zero-shot" else str(row["shots"])
        lines.append(f"| {row['mode']} | {shots} | {row['seeds']} | {' | '.join(cells)} |")
    return "\n".join(lines)
