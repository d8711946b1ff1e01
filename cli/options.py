"""Pieces every `genclip` verb shares (the trainer's and the agent's): --config, failing, opening the engine.

They live here because the agent mounts the trainer's verbs and may import the
trainer, never the other way round.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

if TYPE_CHECKING:
    from model import Engine, EngineConfig

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (default: $GENCLIP_CONFIG, ./config.toml)."),
]


def fail(message: str, code: int = 2) -> NoReturn:
    """Stop a verb with a one-line reason on stderr (2: the user must fix an option or the config)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def engine_config(model: EngineConfig, checkpoint: Path | None) -> EngineConfig:
    """The `[model]` section, with `--checkpoint` in place of its checkpoint when given."""
    if checkpoint is None:
        return model
    checkpoint = Path(os.path.expanduser(checkpoint))
    if not checkpoint.is_file():
        fail(f"--checkpoint: prompt checkpoint not found: {checkpoint}")
    return model.model_copy(update={"checkpoint": checkpoint})


def open_engine(
    model: EngineConfig, checkpoint: Path | None = None, max_batch: int = 8, prompt_dir: Path | None = None
) -> Engine:
    """The engine, or exit 2 with the reason (missing weights, incompatible checkpoint, no CUDA, ...).

    Its prompts: `--checkpoint` when given; else those the line runs: the newest usable checkpoint in
    `prompt_dir` (the config's [agent].prompt_dir), then [model].checkpoint; a refused newer one is a warning.
    """
    from model import BackboneError, CheckpointError, Engine
    from model.checkpoint_files import checkpoint_candidates

    try:
        if checkpoint is not None:
            return Engine(engine_config(model, checkpoint), max_batch=max_batch)
        engine = Engine(model.model_copy(update={"checkpoint": None}), max_batch=max_batch)
        for reason in engine.load_first_usable(checkpoint_candidates(prompt_dir, model.checkpoint)):
            typer.echo(f"warning: checkpoint refused, using an older one: {reason}", err=True)
        return engine
    except (BackboneError, CheckpointError, RuntimeError, ValueError, OSError) as exc:
        fail(f"cannot start the engine: {exc}")
