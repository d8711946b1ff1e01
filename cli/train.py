"""`genclip train`: learn prompts from labelled anomaly data (or good images + `genclip synth`).

Exit codes: 0 done, 1 the work failed, 2 bad arguments or configuration, 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cli.options import ConfigOption, fail, load_for_verb

if TYPE_CHECKING:
    from cli.settings import GenclipConfig
    from trainer.training import TrainSummary

TrainDataOption = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        help="KIND:PATH[@split], KIND one of mvtec, visa, synthetic; split train|test|all (default test). "
        "Repeatable. Default: [trainer].data.",
    ),
]
OutOption = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="Run folder: checkpoints, log.jsonl, summary.json. Default: <[trainer].out_dir>/<UTC time>.",
    ),
]
EpochsOption = Annotated[int | None, typer.Option(min=1, help="Passes over the data; default: [trainer].epochs.")]
BatchSizeOption = Annotated[
    int | None, typer.Option("--batch-size", min=1, help="Images per step; default: [trainer].batch_size.")
]
LrOption = Annotated[float | None, typer.Option(min=0.0, help="Learning rate; default: [trainer].lr.")]
SeedOption = Annotated[
    int | None, typer.Option(help="Seed of prompts, shuffling and held-out classes; default: [trainer].seed.")
]
ImageSizeOption = Annotated[
    int | None,
    typer.Option(
        "--image-size",
        help="Model input size in pixels; default: [trainer].image_size, else [model].image_size.",
    ),
]
WorkersOption = Annotated[
    int | None,
    typer.Option(min=0, help="Data loader processes (0: load in this one); default: [trainer].workers."),
]
HoldoutClassesOption = Annotated[
    int | None,
    typer.Option(
        "--holdout-classes",
        min=0,
        help="Classes held out, picked by the seed, to validate on; 0 = no validation, keep the last epoch. "
        "Default: [trainer].holdout_classes.",
    ),
]
HoldoutOption = Annotated[
    list[str] | None,
    typer.Option(
        "--holdout",
        help="Hold out this class for validation instead of ones picked by the seed (repeatable); "
        "default: [trainer].holdout_class_names.",
    ),
]
DeviceOption = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N; default: [model].device.")]
ResumeOption = Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.safetensors.")]
ForceOption = Annotated[
    bool, typer.Option("--force", help="Start over in a used --out folder (deletes its run files).")
]
PublishOption = Annotated[
    Path | None,
    typer.Option(
        "--publish",
        help="Folder the agent watches ([agent].prompt_dir); the best checkpoint goes there. "
        "Default: [trainer].publish_dir.",
    ),
]
NoPublishOption = Annotated[
    bool,
    typer.Option(
        "--no-publish",
        help="Publish nothing, even with [trainer].publish_dir set (a line's config sets it): keep the run in its "
        "folder to evaluate it first, then `genclip publish` it.",
    ),
]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")]


def train(
    data: TrainDataOption = None,
    out: OutOption = None,
    config: ConfigOption = None,
    epochs: EpochsOption = None,
    batch_size: BatchSizeOption = None,
    lr: LrOption = None,
    seed: SeedOption = None,
    image_size: ImageSizeOption = None,
    workers: WorkersOption = None,
    holdout_classes: HoldoutClassesOption = None,
    holdout: HoldoutOption = None,
    device: DeviceOption = None,
    resume: ResumeOption = False,
    force: ForceOption = False,
    publish: PublishOption = None,
    no_publish: NoPublishOption = False,
    progress: ProgressOption = True,
) -> None:
    """Learn prompts from labelled anomaly data (or good images + `genclip synth`)."""
    cfg = load_for_verb(config)
    overrides = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "image_size": image_size,
        "workers": workers,
        "holdout_classes": holdout_classes,
        "holdout_class_names": holdout,
    }
    if publish is not None and no_publish:
        fail("--publish and --no-publish contradict each other")
    if no_publish:
        cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"publish_dir": None})})
    specs = list(data or cfg.trainer.data)
    run_dir = prepare_run(specs, out, resume, force, cfg.trainer.out_dir)
    summary = run_training(cfg, specs, run_dir, overrides, device, resume, force, publish, progress)
    report_summary(summary)
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.publish_refused:
        raise typer.Exit(1)


def prepare_run(specs: list[str], out: Path | None, resume: bool, force: bool, out_dir: Path) -> Path:
    """Check the data and run-folder options; print and return the run folder (exit 2 on a contradiction)."""
    from trainer.training import check_run_folder

    if not specs:
        fail("no training data: give --data KIND:PATH[@split] (repeatable) or set [trainer].data in the config")
    if resume and out is None:
        fail("--resume needs --out: the run folder to continue")
    if resume and force:
        fail("--resume and --force contradict each other: continue the run, or start it over")
    run_dir = out if out is not None else default_run_dir(out_dir)
    try:
        check_run_folder(run_dir, resume=resume, force=force)
    except ValueError as exc:
        fail(str(exc))
    typer.echo(f"run folder: {run_dir}")
    return run_dir


def run_training(
    cfg: GenclipConfig,
    specs: list[str],
    run_dir: Path,
    overrides: dict[str, Any],
    device: str | None,
    resume: bool,
    force: bool,
    publish: Path | None,
    progress: bool,
) -> TrainSummary:
    """Train with [trainer] and the flags given over it (None: not given); exit 2 on bad data or settings."""
    from pydantic import ValidationError

    from model import BackboneError, CheckpointError
    from trainer.datasets import DatasetError
    from trainer.training import PromptTrainer

    try:
        settings = cfg.trainer.model_copy(update={k: v for k, v in overrides.items() if v is not None})
        settings = type(settings).model_validate(settings.model_dump())
        model_cfg = cfg.model if device is None else cfg.model.model_copy(update={"device": device})
        trainer = PromptTrainer(
            model_cfg,
            settings,
            specs,
            run_dir,
            publish_dir=publish or settings.publish_dir,
            resume=resume,
            force=force,
            show_progress=progress,
        )
        return trainer.run()
    except (DatasetError, BackboneError, CheckpointError, ValidationError, ValueError) as exc:
        fail(str(exc))


def report_summary(summary: TrainSummary) -> None:
    """The run's result lines: epochs, the chosen checkpoint and its validation, where it went, what was skipped."""
    images = f"{summary.train_images} train / {summary.val_images} validation images, {summary.seconds:.0f} s"
    if summary.interrupted:
        typer.echo(f"{interrupted_line(summary)}; {images}")
        typer.echo(f"continue with: genclip train --resume --out {summary.run_dir} (and the same data and options)")
    else:
        typer.echo(f"done: {summary.epochs_done} epoch(s), {images}")
    typer.echo(f"selection: {summary.selection}")
    if summary.best_metrics:
        typer.echo(f"best epoch {summary.best_epoch}: {validation_line(summary.best_metrics)}")
    elif summary.best_epoch is not None:
        last_rule = summary.validation.get("rule") == "last epoch"
        typer.echo(f"best epoch {summary.best_epoch}{' (the last)' if last_rule else ''}")
    if summary.baseline and summary.best_metrics:
        from trainer.evaluate import headline

        untrained = headline(summary.baseline["results"])
        if untrained >= summary.best_score:
            typer.echo(
                f"warning: no epoch beat the untrained prompts on the held-out classes "
                f"({summary.best_score:.3f} <= {untrained:.3f}): more or more varied training data may help",
                err=True,
            )
    typer.echo(f"checkpoints: {summary.best or summary.last}  (log: {summary.run_dir / 'log.jsonl'})")
    if summary.published:
        typer.echo(f"published: {summary.published}")
    elif summary.best is not None and not summary.interrupted and not summary.publish_refused:
        typer.echo(f"not published; to the line, once evaluated: genclip publish {summary.best}")
    if summary.publish_refused:
        typer.echo(f"error: {summary.publish_refused}", err=True)
    if summary.skipped:
        typer.echo(f"skipped {len(summary.skipped)} unreadable file(s):")
        for line in summary.skipped:
            typer.echo(f"  {line}")


def interrupted_line(summary: TrainSummary) -> str:
    """'interrupted after epoch 1 of 3 (log.jsonl: epochs 0-1, epoch 0 = the untrained prompts)': epochs are
    counted as log.jsonl numbers them, and the epoch that was cut short is not counted."""
    done, first = summary.epochs_done, 0 if summary.baseline else 1
    if done == 0:
        logged = "; log.jsonl: epoch 0 (the untrained prompts)" if summary.baseline else ""
        return f"interrupted in epoch 1 of {summary.epochs}: no epoch finished{logged}"
    untrained = ", epoch 0 = the untrained prompts" if first == 0 else ""
    return (
        f"interrupted after epoch {done} of {summary.epochs} (log.jsonl: epochs {first}-{done}{untrained}; "
        f"epoch {done + 1} was cut short)"
    )


def default_run_dir(out_dir: Path, now: datetime | None = None) -> Path:
    """`<out_dir>/<UTC YYYYmmdd-HHMMSS>`: a new folder per run, so scheduled runs never overwrite each other
    (`-2`, `-3`, ... is appended when that second's folder exists already)."""
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y%m%d-%H%M%S")
    run_dir, n = out_dir / stamp, 1
    while run_dir.exists():
        n += 1
        run_dir = out_dir / f"{stamp}-{n}"
    return run_dir


def validation_line(metrics: dict[str, Any]) -> str:
    """'image AUROC 0.712 [0.61, 0.80], pixel AUROC ... on N images (g good, d defective)'."""
    mean = metrics["results"]["mean"]
    interval = metrics.get("interval") or {}
    parts = []
    for key, title in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC")):
        value = mean.get(key)
        if value is None or value != value:
            continue
        low_high = interval.get(key)
        parts.append(f"{title} {value:.3f}" + (f" [95 % {low_high[0]:.3f}, {low_high[1]:.3f}]" if low_high else ""))
    counts = interval.get("counts") or {}
    good = sum(c["good"] for c in counts.values())
    bad = sum(c["defective"] for c in counts.values())
    return ", ".join(parts) + f" on {metrics.get('images', good + bad)} held-out images ({good} good, {bad} defective)"
