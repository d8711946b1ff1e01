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
        epochs: Annotated[int | None, typer.Option(min=1, help="Default: [trainer].epochs.")] = None,
        batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Default: [trainer].")] = None,
        lr: Annotated[float | None, typer.Option(min=0.0, help="Learning rate; default: [trainer].lr.")] = None,
        seed: Annotated[int | None, typer.Option(help="Default: [trainer].seed.")] = None,
        image_size: Annotated[int | None, typer.Option("--image-size", help="Default: [model].image_size.")] = None,
        workers: Annotated[int | None, typer.Option(min=0, help="Data loader processes.")] = None,
        val_fraction: Annotated[float | None, typer.Option("--val-fraction", min=0.0, max=0.9)] = None,
        device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N; default: [model].device.")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from OUT/last.safetensors.")] = False,
        publish: Annotated[
            Path | None, typer.Option("--publish", help="Folder the agent watches; the best checkpoint goes there.")
        ] = None,
        progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Progress bar on stderr.")] = True,
    ) -> None:
        """Learn prompts from labelled anomaly data (or good images + `genclip synth`)."""
        from pydantic import ValidationError

        from model import BackboneError, CheckpointError
        from trainer.datasets import DatasetError
        from trainer.training import PromptTrainer

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
                "val_fraction": val_fraction,
            }.items()
            if v is not None
        }
        specs = list(data or cfg.trainer.data)
        if not specs:
            fail("no training data: give --data KIND:PATH[@split] (repeatable) or set [trainer].data in the config")
        if resume and out is None:
            fail("--resume needs --out: the run folder to continue")
        run_dir = out if out is not None else default_run_dir(cfg.trainer.out_dir)
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
                show_progress=progress,
            )
            summary = trainer.run()
        except (DatasetError, BackboneError, CheckpointError, ValidationError, ValueError) as exc:
            fail(str(exc))
        best = summary.best_metrics["results"]["mean"] if summary.best_metrics else {}
        typer.echo(
            f"{'interrupted' if summary.interrupted else 'done'}: {summary.epochs_done} epoch(s), "
            f"{summary.train_images} train / {summary.val_images} validation images, {summary.seconds:.0f} s"
        )
        if best:
            typer.echo(
                f"best epoch {summary.best_epoch}: image AUROC {best.get('image_auroc', float('nan')):.3f}, "
                f"pixel AUROC {best.get('pixel_auroc', float('nan')):.3f}"
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
    ) -> None:
        """Blend synthetic defects (with exact masks) onto good images: training data for a new product."""
        from trainer.synth import synth_command

        kind_list = [k.strip() for k in kinds.split(",") if k.strip()] if kinds else None
        source_arg: Any = source if source.startswith("texture:") else Path(source)
        code = synth_command(source_arg, out, count, seed, kind_list, class_name)
        if code:
            raise typer.Exit(code)

    @app.command("calibrate")
    def calibrate(
        product_class: Annotated[str, typer.Option("--class", help="Product class of the good images.")],
        good: Annotated[Path, typer.Option(help="Folder of images of good parts (searched recursively).")],
        checkpoint: Annotated[
            Path | None, typer.Option(help="Prompts to calibrate for; default [model].checkpoint.")
        ] = None,
        profiles: Annotated[
            Path | None, typer.Option(help="Folder for class profiles; default [model].profile_dir.")
        ] = None,
        quantile: Annotated[float, typer.Option(min=0.5, max=0.9999, help="Share of good parts to pass.")] = 0.995,
        config: ConfigOption = None,
        print_only: Annotated[bool, typer.Option("--print-only", help="Print the result; write no profile.")] = False,
    ) -> None:
        """Decide a class's word and threshold from good parts; write its profile (<profiles>/<class>.json)."""
        from model import ClassSetupError
        from model.profile import profile_path
        from trainer.calibrate import calibrate as run_calibration
        from trainer.calibrate import good_images

        cfg = load_config(config)
        folder = profiles or cfg.model.profile_dir
        if folder is None and not print_only:
            fail("no profile folder: give --profiles DIR or set [model].profile_dir (or use --print-only)")
        try:
            paths = good_images(good)
        except FileNotFoundError as exc:
            fail(str(exc))
        if not paths:
            fail(f"no images in {good}")
        engine = open_engine(cfg.model, checkpoint, cfg.engine.batch_size)
        try:
            result = run_calibration(engine, product_class, paths, quantile)
        except (ClassSetupError, ValueError) as exc:
            fail(str(exc), 1)
        for line in result.skipped:
            typer.echo(f"skipped {line}", err=True)
        c = result.profile.calibration
        assert c is not None
        written = None if print_only else result.profile.save(profile_path(folder, result.profile.product_class))
        typer.echo(
            f"# {c.images} good image(s), scores min {c.score_min:.4f} median {c.score_median:.4f} "
            f"p95 {c.score_p95:.4f} max {c.score_max:.4f}; threshold at quantile {quantile}; "
            f"class word '{result.profile.class_word}' ({result.profile.class_word_source}); "
            f"prompts {c.prompt_version}" + (f"; profile {written}" if written else "")
        )
        typer.echo(f"[thresholds]\n{json.dumps(result.profile.product_class)} = {c.threshold:.6f}")
        if result.skipped:
            raise typer.Exit(1)

    @app.command("eval")
    def evaluate_command(
        data: DataOption,
        out: Annotated[Path, typer.Option(help="Folder for report.json, report.md and sample grids.")],
        checkpoint: Annotated[
            Path | None, typer.Option(help="Prompts to evaluate; default [model].checkpoint.")
        ] = None,
        config: ConfigOption = None,
        samples: Annotated[int, typer.Option(min=0, help="Examples per class in the picture grid.")] = 6,
        batch_size: Annotated[int | None, typer.Option("--batch-size", min=1)] = None,
    ) -> None:
        """Image and pixel AUROC/AP/F1-max and AUPRO per class, like the zero-shot papers."""
        from trainer.datasets import DatasetError, open_dataset
        from trainer.evaluate import evaluate, write_evaluation

        cfg = load_config(config)
        try:
            items = [s for spec in data for s in open_dataset(spec)]
        except DatasetError as exc:
            fail(str(exc))
        engine = open_engine(cfg.model, checkpoint, cfg.engine.batch_size)
        outcome = evaluate(engine, items, batch_size=batch_size or cfg.engine.batch_size, examples_per_class=samples)
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
