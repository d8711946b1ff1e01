"""`genclip run`: the inspection service for one line."""

from __future__ import annotations

import typer

from cli.options import ConfigOption, load_for_verb


def run(config: ConfigOption = None) -> None:
    """Run the inspection service for one line until SIGTERM/SIGINT (SIGHUP reloads prompts and class profiles)."""
    cfg = load_for_verb(config)
    from agent.logs import get_logger
    from agent.service import InspectionService, StartupError

    try:
        service = InspectionService(cfg)
    except StartupError as exc:
        get_logger("agent.service").error("cannot start", reason=str(exc))
        raise typer.Exit(1) from None
    raise typer.Exit(service.run())
