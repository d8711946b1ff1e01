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


def open_engine(model: EngineConfig, checkpoint: Path | None = None, max_batch: int = 8) -> Engine:
    """The engine, or exit 2 with the reason (missing weights, incompatible checkpoint, no CUDA, ...)."""
    from model import BackboneError, CheckpointError, Engine

    try:
        return Engine(engine_config(model, checkpoint), max_batch=max_batch)
    except (BackboneError, CheckpointError, RuntimeError, ValueError, OSError) as exc:
        fail(f"cannot start the engine: {exc}")
