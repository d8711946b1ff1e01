"""`genclip`: the one command line for a production line's inspection agent.

Verbs: `config check|show` (here), `score` and `export` (the engine, from
`agent.score_command`), the trainer's `train`, `synth`, `calibrate`, `eval`
(from `trainer.cli`), and `bench engine|agent` (from `bench.cli`). Heavy imports
(torch) happen inside the verbs that need them, so `genclip config check` stays quick.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import tomli_w
import typer

from agent import __version__
from agent.config import ConfigError, InspectConfig, find_config, load_config, masked_dict
from trainer.verb_options import ConfigOption

app = typer.Typer(
    name="genclip",
    help="GenCLIP Inspect: zero-shot visual inspection for production lines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(help="Check or show the line's configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"genclip-inspect {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """GenCLIP Inspect: zero-shot visual inspection for production lines."""


def load_or_exit(path: Path | None) -> InspectConfig:
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


@config_app.command("check")
def config_check(
    config: ConfigOption = None,
    model: Annotated[
        bool, typer.Option("--model", help="Also load the CLIP weights and prompt checkpoint, as `run` would.")
    ] = False,
) -> None:
    """Validate the configuration: exit 0 with a summary, or 2 listing every error."""
    cfg = load_or_exit(config)
    source = find_config(config) or "defaults"
    classes = ", ".join(cfg.product_classes()) or "none"
    typer.echo(
        f"config OK ({source}): line {cfg.line.id} '{cfg.line.name}', {len(cfg.cameras)} camera(s) "
        f"[{classes}], model {cfg.model.backbone}, mqtt {cfg.mqtt.host}:{cfg.mqtt.port}, redis {cfg.redis.url}"
    )
    if model:
        check_model(cfg)


def check_model(cfg: InspectConfig) -> None:
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


def load_for_verb(path: Path | None) -> InspectConfig:
    """Every verb's first step: the validated config (or exit 2), and logging set up from it."""
    from agent.logs import configure_logging

    cfg = load_or_exit(path)
    configure_logging(cfg.line.id, cfg.logging.level, cfg.logging.format)
    return cfg


def _register_verbs() -> None:
    from agent import score_command
    from bench import cli as bench_cli
    from trainer import cli as trainer_cli

    score_command.register(app, load_for_verb)
    trainer_cli.register(app, load_for_verb)
    bench_cli.register(app, load_for_verb)


def main() -> None:
    _register_verbs()
    app()


@app.command("run")
def run(config: ConfigOption = None) -> None:
    """Run the inspection service for one line until SIGTERM/SIGINT (SIGHUP reloads the prompts)."""
    cfg = load_for_verb(config)
    from agent.logs import get_logger
    from agent.service import InspectionService, StartupError

    try:
        service = InspectionService(cfg)
    except StartupError as exc:
        get_logger("agent.service").error("cannot start", reason=str(exc))
        raise typer.Exit(1) from None
    raise typer.Exit(service.run())


if __name__ == "__main__":
    main()
