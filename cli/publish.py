"""`genclip publish`: put a trained checkpoint where the line's agent loads it, once the line would take it.

`genclip train --publish` publishes a run's best checkpoint as soon as training ends; this verb publishes
one that was trained, evaluated and calibrated first (or trained on another machine). It builds the
engine of the line's `[model]` and runs the agent's own check on the checkpoint
(`Engine.prepare_prompts`: backbone, weights, image size, layers, prompt shapes), so what it publishes
is what the line loads; then it copies the file atomically (temporary file, fsync, rename, mode 0644)
into the folder: an agent watching it never reads half a file.

Exit codes: 0 published, 1 the line would refuse the checkpoint (nothing published), 2 bad arguments
or configuration.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated

import typer

from cli.options import ConfigOption, fail, load_for_verb

RUN_FILE_STEMS = ("best", "last")
"""Checkpoints named after their role in a run folder: they are published under the run folder's name."""

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def publish(
    checkpoint: Annotated[Path, typer.Argument(help="The checkpoint to publish (.safetensors from `genclip train`).")],
    to: Annotated[
        Path | None,
        typer.Option(
            "--to",
            help="Folder the line's agent watches; default: [trainer].publish_dir, else [agent].prompt_dir.",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="File name in that folder, without .safetensors (the prompt version's name); default: the run "
            "folder's name for best/last.safetensors (as train --publish names it), else the file's own.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
) -> None:
    """Publish a trained checkpoint to the line (its [agent].prompt_dir), after checking the line would load it."""
    from model import BackboneError, CheckpointError, Engine
    from trainer.training import publish as copy_into

    cfg = load_for_verb(config)
    source = Path(os.path.expanduser(checkpoint))
    if not source.is_file():
        fail(f"checkpoint not found: {source}")
    folder = to or cfg.trainer.publish_dir or cfg.agent.prompt_dir
    if folder is None:
        fail("nowhere to publish: give --to DIR, or set [agent].prompt_dir (the folder the line's agent watches)")
    stem = name or published_name(source)
    if not NAME.fullmatch(stem):
        fail(f"--name {stem!r}: letters, digits, '.', '_' and '-' only (it names the prompt version)")
    try:
        line = Engine(cfg.model.model_copy(update={"checkpoint": None}), max_batch=1)
    except (BackboneError, CheckpointError, RuntimeError, ValueError, OSError) as exc:
        fail(f"cannot start the line's engine to check the checkpoint against: {exc}")
    try:
        prepared = line.prepare_prompts(source)  # what the agent runs on a published file
    except CheckpointError as exc:
        fail(f"not published: the line (the config's [model]) would refuse it: {exc}", 1)
    target = copy_into(source, Path(os.path.expanduser(folder)), stem)
    typer.echo(f"published: {target} (prompt version {target.stem}@{prepared.digest[:12]})")
    watched = cfg.agent.prompt_dir
    if watched is None or Path(os.path.expanduser(watched)).resolve() != target.parent.resolve():
        typer.echo(
            f"warning: the line's agent does not watch {target.parent} ([agent].prompt_dir is {watched}); "
            "it will not load this checkpoint",
            err=True,
        )
    else:
        typer.echo(
            "the running agent loads it within [agent].reload_debounce_s, recalibrates the classes that have "
            "[references], and publishes its info (prompt_version, each class's threshold and threshold_source)"
        )


def published_name(checkpoint: Path) -> str:
    """`runs/brake-disc-1/best.safetensors` -> `brake-disc-1`; any other file keeps its own name."""
    if checkpoint.stem in RUN_FILE_STEMS and checkpoint.resolve().parent.name:
        return checkpoint.resolve().parent.name
    return checkpoint.stem
