"""Pieces every `genclip` verb shares: --config, loading the config file, failing, opening the engine."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from agent.config import ConfigError, find_config
from cli.settings import GenclipConfig, load_config

if TYPE_CHECKING:
    from model import Engine, EngineConfig

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (default: $GENCLIP_CONFIG, ./config.toml)."),
]
ProfilesOption = Annotated[
    Path | None,
    typer.Option(
        "--profiles",
        help="Folder of class profiles (<class>.json: class word and calibrated threshold, as `genclip calibrate "
        "--profiles` writes them); default [model].profile_dir.",
        show_default=False,
    ),
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


def with_profiles(model: EngineConfig, profiles: Path | None, *, must_exist: bool = True) -> EngineConfig:
    """The `[model]` section, with `--profiles` in place of its profile_dir when given (a folder to read from
    must exist: a typo must not silently mean "no calibration")."""
    if profiles is None:
        return model
    profiles = Path(os.path.expanduser(profiles))
    if must_exist and not profiles.is_dir():
        fail(f"--profiles: folder not found: {profiles}")
    return model.model_copy(update={"profile_dir": profiles})


def set_thresholds(
    engine: Engine, configured: Mapping[str, float], threshold: float | None, classes: Iterable[str]
) -> None:
    """The overrides a verb scores with: the config's [thresholds] (source "config"), and `--threshold` for each
    of `classes` over them (source "option"). Classes without one take their calibration or the default."""
    thresholds = dict(configured)
    sources: dict[str, str] = {}
    if threshold is not None:
        for name in classes:
            thresholds[name], sources[name] = threshold, "option"
    engine.classes.set_thresholds(thresholds, sources)


def threshold_origin(engine: Engine, product_class: str) -> dict[str, Any]:
    """The threshold a (set-up) class is judged with and where it came from: threshold_source ("option",
    "config", "calibration", "stale-calibration", "default"), and for a calibration that came from a profile
    file, that file ("profile"; for stale-calibration also why it does not hold, "stale_reason")."""
    from model.profile import ClassProfile, ProfileError, profile_path

    status = engine.classes.status(product_class)
    origin: dict[str, Any] = {"threshold": status.threshold, "threshold_source": status.threshold_source}
    directory = engine.config.profile_dir
    profile = engine.classes.profile(product_class)
    if status.threshold_source in ("calibration", "stale-calibration") and directory is not None and profile:
        path = profile_path(directory, status.product_class)
        try:
            saved = ClassProfile.load(path) if path.is_file() else None
        except ProfileError:
            saved = None
        if saved is not None and saved.calibration == profile.calibration:  # not one measured by this verb
            origin["profile"] = str(path)
    if status.stale_reason is not None:
        origin["stale_reason"] = status.stale_reason
    return origin


def describe_origin(origin: Mapping[str, Any]) -> str:
    """'0.6123 (calibration, profiles/bottle.json)': a threshold and where it came from, for people."""
    where = ", ".join(str(origin[k]) for k in ("threshold_source", "profile", "stale_reason") if k in origin)
    return f"{origin['threshold']:.4f} ({where})"


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


MISSING_PRETRAINED = "model.pretrained: required key is missing"


def pretrained_hint(config_file: Path | None) -> list[str]:
    """What to do when nothing names the CLIP weights ([model].pretrained has no default, on purpose)."""
    if config_file is None:
        where = [
            "hint: without a config file nothing names the CLIP weights. Give the line's config with "
            "--config PATH (or $GENCLIP_CONFIG, or run where ./config.toml is), or write one with a [model] section:"
        ]
    else:
        where = [f"hint: set pretrained in the [model] section of {config_file}:"]
    return [
        *where,
        "    [model]",
        '    backbone = "ViT-L-14-336"',
        '    pretrained = "openai"   # an open_clip tag: its weights in the HF cache, or allow_download = true',
        '    # pretrained = "/var/lib/genclip/weights/ViT-L-14-336.bin"   # or a weights file',
        "  or, for a test run whose scores mean nothing (seeded random weights):",
        "    [model]",
        '    backbone = "genclip-tiny"',
        '    pretrained = "random"   # or "random:SEED"',
        "  (the environment works too: GENCLIP_MODEL__PRETRAINED=random)",
    ]


def load_or_exit(path: Path | None) -> GenclipConfig:
    """Load the config for a verb; on error print every problem and exit 2 (before anything slow is imported)."""
    config_file = find_config(path)
    if config_file is None:
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
        if MISSING_PRETRAINED in exc.errors:
            for line in pretrained_hint(config_file):
                typer.echo(line, err=True)
        raise typer.Exit(2) from None


def load_for_verb(path: Path | None) -> GenclipConfig:
    """Every verb's first step: the validated config (or exit 2), and logging set up from it."""
    from agent.logs import configure_logging

    cfg = load_or_exit(path)
    configure_logging(cfg.line.id, cfg.logging.level, cfg.logging.format)
    return cfg
