"""`genclip eval`: image and pixel metrics per class on labelled data, with a report and sample grids.

The metrics do not depend on a threshold; the sample grids' verdicts do. Each class is set up as `genclip
score` sets it up (its profile in --profiles, else [model].profile_dir), with the same threshold rules
(--threshold, [thresholds], its calibration, [model].default_threshold); the threshold of each class and
where it came from are printed and kept in report.json (meta.thresholds).

Exit codes: 0 done, 1 some images could not be read, 2 bad arguments or configuration.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.options import (
    ConfigOption,
    ProfilesOption,
    describe_origin,
    fail,
    load_for_verb,
    open_engine,
    set_thresholds,
    threshold_origin,
    with_profiles,
)

if TYPE_CHECKING:
    from model.engine import Engine
    from trainer.datasets import Sample

DataOption = Annotated[
    list[str],
    typer.Option(
        "--data",
        help="KIND:PATH[@split], KIND one of mvtec, visa, synthetic; split train|test|all (default test). Repeatable.",
    ),
]


def evaluate_command(
    data: DataOption,
    out: Annotated[Path, typer.Option(help="Folder for report.json, report.md and sample grids.")],
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Prompts to evaluate; default: those the line runs ([agent].prompt_dir, else [model].checkpoint)."
        ),
    ] = None,
    config: ConfigOption = None,
    grid_good: Annotated[
        int, typer.Option("--grid-good", min=0, help="Good parts per class in its picture (spread evenly).")
    ] = 2,
    grid_per_kind: Annotated[
        int, typer.Option("--grid-per-kind", min=0, help="Images of each defect kind per class in its picture.")
    ] = 1,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", min=1, help="Images per batch; default: [engine].batch_size.")
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            min=0.0,
            max=1.0,
            help="Image-score threshold for every class evaluated, over [thresholds] and calibrations "
            "(the verdicts in the sample grids; the metrics need none).",
        ),
    ] = None,
    profiles: ProfilesOption = None,
    shots: Annotated[
        list[int] | None,
        typer.Option(
            "--shots",
            min=1,
            help="Also K good references per class (repeatable: --shots 1 --shots 2 --shots 4 --shots 8): zero-shot, "
            "memory-only and fused figures side by side (shots.md, shots.json). References come from the "
            "data's training split, never the evaluated images.",
        ),
    ] = None,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="With --shots: seeds drawing the references.")] = 3,
    memory_weight: Annotated[
        float | None,
        typer.Option(
            "--memory-weight",
            min=0.0,
            max=1.0,
            help="With --shots: b of the fused figures; default [model] (0.5 if 0).",
        ),
    ] = None,
) -> None:
    """Image and pixel AUROC/AP/F1-max and AUPRO per class, like the zero-shot papers."""
    from trainer.datasets import DatasetError, open_dataset
    from trainer.evaluate import evaluate, write_evaluation

    cfg = load_for_verb(config)
    try:
        items = [s for spec in data for s in open_dataset(spec)]
    except DatasetError as exc:
        fail(str(exc))
    from model import ClassSetupError

    model = with_profiles(cfg.model, profiles)
    engine = open_engine(model, checkpoint, cfg.engine.batch_size, prompt_dir=cfg.agent.prompt_dir)
    names = list(dict.fromkeys(item.product_class for item in items))
    set_thresholds(engine, cfg.thresholds, threshold, names)
    thresholds = {}
    for name in names:
        try:
            engine.classes.setup(name, save=False)  # the class's profile, when it has one
        except ClassSetupError as exc:
            fail(str(exc))
        thresholds[name] = threshold_origin(engine, name)
        typer.echo(f"threshold {name}: {describe_origin(thresholds[name])}")
    if shots:
        run_shots(
            engine, items, data, out, sorted(set(shots)), seeds, memory_weight, batch_size or cfg.engine.batch_size
        )
        return
    outcome = evaluate(
        engine,
        items,
        batch_size=batch_size or cfg.engine.batch_size,
        grid_good=grid_good,
        grid_per_kind=grid_per_kind,
    )
    prompts = engine.snapshot.prompts  # what was evaluated: --checkpoint, else the line's (prompt_dir, checkpoint)
    meta = {
        "checkpoint": prompts.path or "untrained",
        "prompt_version": prompts.version,
        "data": data,
        "thresholds": thresholds,
    }
    written = write_evaluation(out, outcome, meta)
    mean = outcome.results["mean"]
    typer.echo(
        f"prompts {prompts.version}: {outcome.images} image(s): image AUROC {mean['image_auroc']:.3f} "
        f"AP {mean['image_ap']:.3f}, pixel AUROC {mean['pixel_auroc']:.3f} AUPRO {mean['pixel_aupro']:.3f}"
    )
    for path in written:
        typer.echo(f"wrote {path}")
    for skipped in outcome.skipped:
        typer.echo(f"skipped {skipped.path}: {skipped.reason}", err=True)
    if outcome.skipped:
        raise typer.Exit(1)


def run_shots(
    engine: Engine,
    items: list[Sample],
    data: list[str],
    out: Path,
    shots: list[int],
    seeds: int,
    weight: float | None,
    batch_size: int,
) -> None:
    """`--shots`: references from each data set's training split; the table printed, shots.json/md written."""
    from trainer.datasets import DatasetError, open_dataset
    from trainer.shots import ShotsInputError, evaluate_shots, format_table, training_spec, write_shots

    try:
        training = [s for spec in data for s in open_dataset(training_spec(spec))]
    except DatasetError as exc:
        fail(f"--shots needs good training images beside the evaluated ones: {exc}")
    b = weight if weight is not None else (engine.config.memory_weight or 0.5)
    try:
        outcome = evaluate_shots(
            engine,
            items,
            training,
            shots=shots,
            seeds=list(range(seeds)),
            weight=b,
            batch_size=batch_size,
            progress=lambda text: typer.echo(text, err=True),
        )
    except ShotsInputError as exc:
        fail(str(exc))
    typer.echo(format_table(outcome))
    meta = {"data": data, "shots": shots, "seeds": seeds, "prompt_version": engine.prompt_version}
    for path in write_shots(out, outcome, meta):
        typer.echo(f"wrote {path}")
