"""Commands from the line (`<prefix>/<line>/cmd/<name>`): parsed and validated before anything acts on them.

Anyone on the plant network who can publish to the broker can send these, so
every payload is bounded, must be a JSON object with exactly the documented
fields, and anything else becomes a `CommandError` the sender is told about.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_MAX_BYTES = 4096
Answer = dict[str, object]  # what a command's handler gives back: the answer's fields, JSON for the wire


class CommandError(Exception):
    """The command cannot be run; the message is sent back to whoever asked."""


class CommandArgs(BaseModel):
    """The arguments of one command: exactly the documented fields, strictly typed, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ReloadArgs(CommandArgs):
    """Reload the prompt checkpoint (the newest one published); the configuration needs a restart."""


class ThresholdArgs(CommandArgs):
    """Set one product class's image-score threshold."""

    model_config = ConfigDict(populate_by_name=False)

    product_class: str = Field(alias="class", min_length=1, max_length=200)
    value: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)


class CameraArgs(CommandArgs):
    """Pause or resume one camera, or all of them when `camera` is absent."""

    camera: str | None = Field(None, min_length=1, max_length=200)


class ConfirmGoodArgs(CommandArgs):
    """Parts an operator confirms good (by part id): added to their class's patch memory ([agent].confirm_good)."""

    parts: list[str] = Field(min_length=1, max_length=64)

    @field_validator("parts")
    @classmethod
    def _part_ids(cls, value: list[str]) -> list[str]:
        if any(not 1 <= len(part) <= 200 for part in value):
            raise ValueError("part ids are 1 to 200 characters")
        return value


class SnapshotArgs(CommandArgs):
    """Re-publish the line's retained info (model, prompt version, cameras, classes, thresholds)."""


# What the wire accepts: each command's name and its arguments. agent/commands.py holds what each one does.
ARGS: dict[str, type[CommandArgs]] = {
    "reload": ReloadArgs,
    "threshold": ThresholdArgs,
    "pause": CameraArgs,
    "resume": CameraArgs,
    "snapshot": SnapshotArgs,
    "confirm-good": ConfirmGoodArgs,
}


@dataclass(frozen=True, slots=True)
class Command:
    """A validated command; `correlation` is the request's MQTT 5 CorrelationData, echoed in the response."""

    name: str
    args: CommandArgs
    correlation: bytes | None = None


def parse_command(
    name: str, payload: bytes, *, correlation: bytes | None = None, max_bytes: int = DEFAULT_MAX_BYTES
) -> Command:
    """Validate a command name and its JSON payload (empty means {}); raises CommandError and nothing else."""
    model = ARGS.get(name)
    if model is None:
        raise CommandError(f"unknown command {name[:64]!r}; known: {', '.join(ARGS)}")
    if len(payload) > max_bytes:
        raise CommandError(f"payload of {len(payload)} bytes exceeds the limit of {max_bytes}")
    data = _json_object(payload)
    try:
        args = model.model_validate(data)
    except ValidationError as exc:
        raise CommandError(_describe(exc)) from None
    return Command(name=name, args=args, correlation=correlation)


def _json_object(payload: bytes) -> dict[str, object]:
    if not payload.strip():
        return {}
    try:
        data = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CommandError(f"payload is not valid JSON: {str(exc)[:120]}") from None
    if not isinstance(data, dict):
        raise CommandError(f"payload must be a JSON object, not {type(data).__name__}")
    return data


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "payload"
        message = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)
