"""The whole `config.toml` as the command line reads it: the agent's sections and `[trainer]`.

`agent.config.InspectConfig` holds every section the service runs on and keeps `[trainer]`'s
place in the file without reading it (the agent does not import the trainer); `GenclipConfig`
puts the trainer's schema there, so every verb, `genclip run` included, validates the whole
file: unknown keys are errors, `GENCLIP_<SECTION>__<KEY>` overrides, the same error texts.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from agent.config import InspectConfig, load_as
from trainer.config import TrainerConfig


class GenclipConfig(InspectConfig):
    """Every section of a line's config file; the service accepts it as its `InspectConfig`."""

    trainer: TrainerConfig = Field(default_factory=lambda: TrainerConfig.model_validate({}))


def load_config(path: Path | None = None) -> GenclipConfig:
    """Read, merge with the environment, validate the whole file. Raises ConfigError listing every problem."""
    return load_as(GenclipConfig, path)
