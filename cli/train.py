"""The trainer's verbs: `train`, `synth`, `calibrate`, `eval`.

Exit codes: 0 done, 1 the work failed (or, for calibrate/eval, some images could not
be read), 2 bad arguments or configuration, 130 interrupted with Ctrl-C.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from trainer.verb_options import ConfigOption, fail, open_engine

DataOption = Annotated[
    list[str],
    typer.Option(
        "--data",
        help="KIND:PATH[@split], KIND one of mvtec, visa, synthetic; split train|test|all (default test). Repeatable.",
    ),
]


TrainDataOption = Annotated[
    list[str] | None,
    typer.Option(
        "--data",
        help="KIND:PATH[@split], KIND one of mvtec, visa, synthetic; split train|test|all (default test). "
        "Repeatable. Default: [trainer].data.",
    ),
]


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


def register(app: typer.Typer, load_config: Callable[[Path | None], Any]) -> None:
    """Add the trainer verbs to the root CLI; `load_config` turns --config into the validated tree
    (and sets logging up, as the root does for every verb)."""

    @app.command("train")
    def train(
        data: TrainDataOption = None,
        out: Annotated[
            Path | None,
            typer.Option(
                "--out",
                help="Run folder: checkpoints, log.jsonl, summary.json. Default: <[trainer].out_dir>/<UTC time>.",
            ),
        ] = None,
        config: ConfigOption = None,
        epochs: Annotated[
            int | None, typer.Option(min=1, help="Passes over the data; default: [trainer].epochs.")
        ] = None,
        batch_size: Annotated[
            int | None, typer.Option("--batch-size", min=1, help="Images per step; default: [trainer].batch_size.")
        ] = None,
        lr: Annotated[float | None, typer.Option(min=0.0, help="Learning rate; default: [trainer].lr.")] = None,
        seed: Annotated[
            int | None, typer.Option(help="Seed of prompts, shuffling and held-out classes; default: [trainer].seed.")
        ] = None,
        image_size: Annotated[
            int | None,
            typer.Option(
                "--image-size",
                help="Model input size in pixels; default: [trainer].image_size, else [model].image_size.",
            ),
        ] = None,
        workers: Annotated[
            int | None,
            typer.Option(min=0, help="Data loader processes (0: load in this one); default: [trainer].workers."),
        ] = None,
        holdout_classes: Annotated[
            int | None,
            typer.Option(
                "--holdout-classes",
                min=0,
                help="Classes held out, picked by the seed, to validate on; 0 = no validation, keep the last epoch. "
                "Default: [trainer].holdout_classes.",
            ),
        ] = None,
        holdout: Annotated[
            list[str] | None,
            typer.Option(
                "--holdout",
                help="Hold out this class for validation instead of ones picked by the seed (repeatable); "
                "default: [trainer].holdout_class_names.",
            ),
        ] = None,
        device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N; default: [model].device.")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.safetensors.")] = False,
        force: Annotated[
            bool, typer.Option("--force", help="Start over in a used --out folder (deletes its run files).")
        ] = False,
        publish: Annotated[
            Path | None,
            typer.Option(
                "--publish",
                help="Folder the agent watches ([agent].prompt_dir); the best checkpoint goes there. "
                "Default: [trainer].publish_dir.",
            ),
        ] = None,
        progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")] = True,
    ) -> None:
        """Learn prompts from labelled anomaly data (or good images + `genclip synth`)."""
        from pydantic import ValidationError

        from model import BackboneError, CheckpointError
        from trainer.datasets import DatasetError
        from trainer.training import PromptTrainer, check_run_folder

        cfg = load_config(config)
        overrides = {
            k: v
            for k, v in {
                "epochs": epochs,
                "batch_size": batch_size,
                "lr": lr,
                "seed": seed,
                "image_size": image_size,
                "workers": workers,
                "holdout_classes": holdout_classes,
                "holdout_class_names": holdout,
            }.items()
            if v is not None
        }
        specs = list(data or cfg.trainer.data)
        if not specs:
            fail("no training data: give --data KIND:PATH[@split] (repeatable) or set [trainer].data in the config")
        if resume and out is None:
            fail("--resume needs --out: the run folder to continue")
        if resume and force:
            fail("--resume and --force contradict each other: continue the run, or start it over")
        run_dir = out if out is not None else default_run_dir(cfg.trainer.out_dir)
        try:
            check_run_folder(run_dir, resume=resume, force=force)
        except ValueError as exc:
            fail(str(exc))
        typer.echo(f"run folder: {run_dir}")
        try:
            settings = cfg.trainer.model_copy(update=overrides)
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
            summary = trainer.run()
        except (DatasetError, BackboneError, CheckpointError, ValidationError, ValueError) as exc:
            fail(str(exc))
        typer.echo(
            f"{'interrupted' if summary.interrupted else 'done'}: {summary.epochs_done} epoch(s), "
            f"{summary.train_images} train / {summary.val_images} validation images, {summary.seconds:.0f} s"
        )
        typer.echo(f"selection: {summary.selection}")
        if summary.best_metrics:
            typer.echo(f"best epoch {summary.best_epoch}: {validation_line(summary.best_metrics)}")
        elif summary.best_epoch is not None:
            typer.echo(f"best epoch {summary.best_epoch} (the last)")
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
        if summary.skipped:
            typer.echo(f"skipped {len(summary.skipped)} unreadable file(s):")
            for line in summary.skipped:
                typer.echo(f"  {line}")
        if summary.interrupted:
            raise typer.Exit(130)

    @app.command("synth")
    def synth(
        source: Annotated[str, typer.Option(help="Folder of good images, or texture:FAMILY (woven, grain, ...).")],
        out: Annotated[Path, typer.Option(help="Output root; an MVTec-style <class>/ folder is written in it.")],
        count: Annotated[int, typer.Option(min=1, help="Test images to make: 30 % good, the rest with defects.")] = 100,
        seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 0,
        kinds: Annotated[
            str | None, typer.Option(help="Comma-separated defect kinds; default all (scratch, crack, hole, ...).")
        ] = None,
        class_name: Annotated[str | None, typer.Option("--class", help="Class name; default the folder name.")] = None,
        foreground: Annotated[
            str,
            typer.Option(
                help="Where defects go: auto (the object, told from a plain background; the whole image when "
                "none is found, as for textures), all (anywhere: fabric, wood, tiles), or a folder of masks "
                "(non-zero = product; each image's relative path, as .png)."
            ),
        ] = "auto",
    ) -> None:
        """Blend synthetic defects (with exact masks) onto good images: training data for a new product."""
        from trainer.synth import synth_command

        kind_list = [k.strip() for k in kinds.split(",") if k.strip()] if kinds else None
        source_arg: Any = source if source.startswith("texture:") else Path(source)
        code = synth_command(source_arg, out, count, seed, kind_list, class_name, foreground)
        if code:
            raise typer.Exit(code)

    @app.command("calibrate")
    def calibrate(
        product_class: Annotated[str, typer.Option("--class", help="Product class of the good images.")],
        good: Annotated[
            Path,
            typer.Option(
                help="Folder of images of good parts of this class only (an MVTec root or class folder: its "
                "train/good). Subfolders only with --recursive."
            ),
        ],
        checkpoint: Annotated[
            Path | None,
            typer.Option(
                help="Prompts to calibrate for; default: those the line runs "
                "([agent].prompt_dir, else [model].checkpoint)."
            ),
        ] = None,
        profiles: Annotated[
            Path | None, typer.Option(help="Folder for class profiles; default [model].profile_dir.")
        ] = None,
        quantile: Annotated[
            float | None,
            typer.Option(
                min=0.5, max=0.9999, help="Share of good parts to pass; default [model].calibration_quantile."
            ),
        ] = None,
        min_images: Annotated[
            int | None,
            typer.Option(
                "--min-images",
                min=1,
                help="Fewest good images to calibrate on; default: [trainer].calibrate_min_images.",
            ),
        ] = None,
        recursive: Annotated[bool, typer.Option("--recursive", help="Also read images in subfolders.")] = False,
        config: ConfigOption = None,
        print_only: Annotated[bool, typer.Option("--print-only", help="Print the result; write no profile.")] = False,
    ) -> None:
        """Decide a class's word and threshold from good parts; write its profile (<profiles>/<class>.json).

        An earlier profile of the class is kept in <profiles>/history/<class>/ and the change is printed.
        """
        from model import ClassSetupError
        from model.profile import ClassProfile, ProfileError, profile_path
        from trainer.calibrate import CalibrationInputError, describe_change, good_folder, good_images
        from trainer.calibrate import calibrate as run_calibration

        cfg = load_config(config)
        folder = profiles or cfg.model.profile_dir
        if folder is None and not print_only:
            fail("no profile folder: give --profiles DIR or set [model].profile_dir (or use --print-only)")
        q = quantile if quantile is not None else cfg.model.calibration_quantile
        needed = min_images if min_images is not None else cfg.trainer.calibrate_min_images
        try:
            source = good_folder(good, product_class)
            paths = good_images(good, product_class, recursive=recursive)
        except CalibrationInputError as exc:
            fail(str(exc))
        if len(paths) < needed:
            fail(
                f"class '{product_class}': {len(paths)} image file(s) in {source}"
                + ("" if recursive else " (subfolders not searched; --recursive)")
                + f"; calibration needs at least {needed} good images ([trainer].calibrate_min_images, --min-images)"
            )
        engine = open_engine(cfg.model, checkpoint, cfg.engine.batch_size, prompt_dir=cfg.agent.prompt_dir)
        try:
            result = run_calibration(engine, product_class, paths, q, min_images=needed)
        except (ClassSetupError, ValueError) as exc:
            fail(str(exc), 1)
        for line in result.skipped:
            typer.echo(f"skipped {line}", err=True)
        c = result.profile.calibration
        assert c is not None
        typer.echo(f"# {product_class} from {source}: {c.describe()}")
        typer.echo(
            f"# class word '{result.profile.class_word}' ({result.profile.class_word_source}); "
            f"prompts {c.prompt_version}"
        )
        if not print_only:
            target = profile_path(folder, result.profile.product_class)
            try:
                previous = ClassProfile.load(target) if target.is_file() else None
            except ProfileError:
                previous = None
            change = describe_change(previous, result.profile)
            result.profile.save(target)
            typer.echo(
                f"# profile {target}" + (f"; {change} (old one kept in {target.parent / 'history'})" if change else "")
            )
        typer.echo(f"[thresholds]\n{json.dumps(result.profile.product_class)} = {c.threshold:.6f}")
        if result.skipped:
            raise typer.Exit(1)

    @app.command("eval")
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
    ) -> None:
        """Image and pixel AUROC/AP/F1-max and AUPRO per class, like the zero-shot papers."""
        from trainer.datasets import DatasetError, open_dataset
        from trainer.evaluate import evaluate, write_evaluation

        cfg = load_config(config)
        try:
            items = [s for spec in data for s in open_dataset(spec)]
        except DatasetError as exc:
            fail(str(exc))
        engine = open_engine(cfg.model, checkpoint, cfg.engine.batch_size, prompt_dir=cfg.agent.prompt_dir)
        outcome = evaluate(
            engine,
            items,
            batch_size=batch_size or cfg.engine.batch_size,
            grid_good=grid_good,
            grid_per_kind=grid_per_kind,
        )
        meta = {"checkpoint": str(checkpoint or cfg.model.checkpoint or "untrained"), "data": data}
        written = write_evaluation(out, outcome, meta)
        mean = outcome.results["mean"]
        typer.echo(
            f"{outcome.images} image(s): image AUROC {mean['image_auroc']:.3f} AP {mean['image_ap']:.3f}, "
            f"pixel AUROC {mean['pixel_auroc']:.3f} AUPRO {mean['pixel_aupro']:.3f}"
        )
        for path in written:
            typer.echo(f"wrote {path}")
        for skipped in outcome.skipped:
            typer.echo(f"skipped {skipped.path}: {skipped.reason}", err=True)
        if outcome.skipped:
            raise typer.Exit(1)
