"""`genclip score` and `genclip export`: the engine from the command line (filled in by the engine issue)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer, load_config: Callable[[Path | None], Any]) -> None:
    """Add the engine verbs to the root CLI."""
