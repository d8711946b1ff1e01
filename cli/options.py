"""Pieces every `genclip` verb shares: --config, loading the config file, failing, opening the engine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from agent.config import ConfigError, find_config
from cli.settings import GenclipConfig, load_config

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


def load_or_exit(path: Path | None) -> GenclipConfig:
    """Load the config for a verb; on error print every problem and exit 2."""
    if find_config(path) is None:
        typer.echo(
            "note: no config file (--config, $GENCLIP_CONFIG, ./config.toml, /etc/genclip/config.toml): "
            "using built-in defaults and GENCLIP_* environment variables",
            err=True,
        )
    try:
        return load_config(path)
    except ConfigError as exc:
        typer.echo(f"config error in {exc.source}:", err=True)
        for line in exc.errors:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(2) from None


def load_for_verb(path: Path | None) -> GenclipConfig:
    """Every verb's first step: the validated config (or exit 2), and logging set up from it."""
    from agent.logs import configure_logging

    cfg = load_or_exit(path)
    configure_logging(cfg.line.id, cfg.logging.level, cfg.logging.format)
    return cfg
