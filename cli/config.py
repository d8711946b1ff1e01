"""`genclip config check|show`: validate the line's configuration, or print it as the verbs see it."""

from __future__ import annotations

from typing import Annotated

import tomli_w
import typer

from agent.config import find_config, masked_dict
from cli.options import ConfigOption, load_or_exit
from cli.settings import GenclipConfig

config_app = typer.Typer(help="Check or show the line's configuration.", no_args_is_help=True)


@config_app.command("check")
def config_check(
    config: ConfigOption = None,
    model: Annotated[
        bool, typer.Option("--model", help="Also load the CLIP weights and prompt checkpoint, as `run` would.")
    ] = False,
) -> None:
    """Validate the configuration: exit 0 with a summary, or 2 listing every error.

    Camera sources that do not exist or cannot be opened as a video are warnings (the exit code stays 0)."""
    cfg = load_or_exit(config)
    source = find_config(config) or "defaults"
    classes = ", ".join(cfg.product_classes()) or "none"
    typer.echo(
        f"config OK ({source}): line {cfg.line.id} '{cfg.line.name}', {len(cfg.cameras)} camera(s) "
        f"[{classes}], model {cfg.model.backbone}, mqtt {cfg.mqtt.host}:{cfg.mqtt.port}, redis {cfg.redis.url}"
    )
    check_sources(cfg)
    if model:
        check_model(cfg)


def check_sources(cfg: GenclipConfig) -> None:
    """Warn (exit code unchanged) about camera sources that are missing or no video: a camera may be plugged
    in, a file or share may appear later, and the agent waits for them or retries."""
    from agent.sources.checks import source_warning

    for camera in cfg.cameras:
        warning = source_warning(camera)
        if warning is not None:
            typer.echo(f"warning: {warning}", err=True)


def check_model(cfg: GenclipConfig) -> None:
    """Load the weights and prompts the line would run with; exit 2 naming what is missing or wrong."""
    import time

    from model import BackboneError, CheckpointError, Engine
    from model.checkpoint_files import checkpoint_candidates

    began = time.monotonic()
    try:
        engine = Engine(cfg.model.model_copy(update={"checkpoint": None}), max_batch=cfg.engine.batch_size)
        refused = engine.load_first_usable(checkpoint_candidates(cfg.agent.prompt_dir, cfg.model.checkpoint))
    except (BackboneError, CheckpointError, RuntimeError, ValueError, OSError) as exc:
        typer.echo(f"model NOT OK: {exc}", err=True)
        raise typer.Exit(2) from None
    for reason in refused:
        typer.echo(f"warning: checkpoint refused, the line starts on an older one: {reason}", err=True)
    typer.echo(
        f"model OK: {cfg.model.backbone}, weights {engine.backbone.weights}, device {engine.device} "
        f"({engine.precision}), image size {cfg.model.image_size}, prompts {engine.prompt_version}, "
        f"loaded in {time.monotonic() - began:.1f} s"
    )
    if engine.backbone.weights.startswith("random"):
        typer.echo("note: random weights: scores mean nothing (tests and demos only)")


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective configuration (file + environment) as TOML, secrets masked."""
    cfg = load_or_exit(config)
    typer.echo(tomli_w.dumps(masked_dict(cfg)), nl=False)
