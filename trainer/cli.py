"""The trainer's verbs: `train`, `synth`, `calibrate`, `eval`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer, load_config: Callable[[Path | None], Any]) -> None:
    """Add the trainer verbs to the root CLI; `load_config` turns --config into the validated tree."""
