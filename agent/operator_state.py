"""Operator changes (threshold and pause commands) kept across a restart: `<state dir>/operator.json`.

Contract:
- With `[agent].keep_operator_changes` on (the default), every `threshold`, `pause` and `resume` command
  that changed something rewrites the file atomically (a temporary file in the same folder, then
  `os.replace`): a crash mid-write leaves the old file or the new one, never half of one.
- At start, `OperatorStore.restore` reads it back. A commanded threshold is restored (source "command")
  when its class is still on the line and the class's `[thresholds]` value in config is the one it was
  when the command was given; when the engineer changed (or added, or removed) that value since, the
  config wins and the override is dropped. A paused camera is paused again when it is still on the
  line. Whatever no longer applies is logged and listed in info (`not_restored`), never a crash.
- An unreadable or corrupt file: a warning, the line starts with no overrides, and the bad file is kept
  as `operator.json.bad` for a person to look at (the next command writes a fresh `operator.json`).
- With the switch off, the file is neither read nor written: every start resets the overrides (info
  says `reset_at_start: true`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.logs import get_logger
from agent.results import JsonObject
from model.config import normalise_class_name

log = get_logger(__name__)

OPERATOR_FILE = "operator.json"
BAD_SUFFIX = ".bad"


class ThresholdOverride(BaseModel):
    """One class's commanded threshold, and the `[thresholds]` value in config when it was commanded."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    value: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    config_value: float | None = None


class OperatorState(BaseModel):
    """What `operator.json` holds: commanded thresholds per class and the paused cameras."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = Field(1, alias="schema")
    thresholds: dict[str, ThresholdOverride] = Field(default_factory=dict)
    paused_cameras: tuple[str, ...] = ()

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> OperatorState:
        """Parse the file's text; ValueError (pydantic's ValidationError) when it is not one."""
        state = cls.model_validate_json(text)
        if state.schema_version != 1:
            raise ValueError(f"unknown schema {state.schema_version}")
        return state


@dataclass(frozen=True, slots=True)
class Restored:
    """What a start took back from the file: the overrides that apply, and why the others did not."""

    thresholds: Mapping[str, float] = field(default_factory=dict)
    paused_cameras: tuple[str, ...] = ()
    not_restored: tuple[str, ...] = ()


def config_value(config_thresholds: Mapping[str, float], name: str) -> float | None:
    """A class's `[thresholds]` value (class names compared normalised), or None."""
    values = [v for k, v in config_thresholds.items() if normalise_class_name(k) == name]
    return values[0] if values else None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and os.replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def applicable(
    state: OperatorState, classes: Iterable[str], cameras: Iterable[str], config_thresholds: Mapping[str, float]
) -> Restored:
    """The part of `state` that still applies to this line's config (module docstring), and why not the rest."""
    on_line = {normalise_class_name(c) for c in classes}
    camera_ids = set(cameras)
    thresholds: dict[str, float] = {}
    dropped: list[str] = []
    for raw, override in sorted(state.thresholds.items()):
        name = normalise_class_name(raw)
        now = config_value(config_thresholds, name)
        if name not in on_line:
            dropped.append(f"threshold {override.value} for class {name!r}: the class is no longer on this line")
        elif now != override.config_value:
            dropped.append(
                f"threshold {override.value} for class {name!r}: [thresholds] changed from "
                f"{override.config_value} to {now} since the command; the config wins"
            )
        else:
            thresholds[name] = override.value
    paused = tuple(c for c in state.paused_cameras if c in camera_ids)
    dropped += [
        f"pause of camera {c!r}: the camera is no longer on this line"
        for c in state.paused_cameras
        if c not in camera_ids
    ]
    return Restored(thresholds, paused, tuple(dropped))


class OperatorStore:
    """The line's `operator.json`: `restore` once at start, `save` after every operator command."""

    def __init__(self, path: Path, keep: bool) -> None:
        self.path = path
        self.keep = keep
        self.restored = Restored()
        self.save_error: str | None = None

    def restore(
        self, classes: Iterable[str], cameras: Iterable[str], config_thresholds: Mapping[str, float]
    ) -> Restored:
        """Read the file back (nothing when the switch is off or there is no file); never raises."""
        if not self.keep:
            return self.restored
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return self.restored
        except OSError as exc:
            self.restored = Restored(not_restored=(f"{self.path} unreadable: {exc.strerror or exc}",))
            log.warning("operator changes not restored", file=str(self.path), error=str(exc))
            return self.restored
        try:
            state = OperatorState.from_json(text)
        except (ValidationError, ValueError) as exc:
            self.restored = Restored(not_restored=(self._set_aside(exc),))
            return self.restored
        self.restored = applicable(state, classes, cameras, config_thresholds)
        log.info(
            "operator changes restored",
            file=str(self.path),
            thresholds=dict(self.restored.thresholds),
            paused_cameras=list(self.restored.paused_cameras),
        )
        for why in self.restored.not_restored:
            log.warning("operator change not restored", why=why)
        return self.restored

    def _set_aside(self, exc: Exception) -> str:
        """A corrupt file is kept as operator.json.bad; the reason reported in info."""
        bad = self.path.with_name(self.path.name + BAD_SUFFIX)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        try:
            os.replace(self.path, bad)
            kept = f"kept as {bad}"
        except OSError as err:
            kept = f"could not be moved to {bad}: {err.strerror or err}"
        log.warning("operator changes file is corrupt; starting with no overrides", file=str(self.path), error=first)
        return f"{self.path} is corrupt ({first}); {kept}; started with no overrides"

    def save(
        self, thresholds: Mapping[str, float], paused: Iterable[str], config_thresholds: Mapping[str, float]
    ) -> None:
        """Write the overrides in force now (switch off: nothing); a failure is logged and shown in info."""
        if not self.keep:
            return
        state = OperatorState(
            thresholds={
                name: ThresholdOverride(value=value, config_value=config_value(config_thresholds, name))
                for name, value in thresholds.items()
            },
            paused_cameras=tuple(sorted(paused)),
        )
        try:
            write_atomic(self.path, state.to_json())
            self.save_error = None
        except OSError as exc:
            self.save_error = f"{self.path}: {exc.strerror or exc}"
            log.error("operator changes not saved; they last until a restart", error=self.save_error)

    def info(self, thresholds: Mapping[str, float], paused: Iterable[str]) -> JsonObject:
        """Info's `operator_overrides`: the overrides in force now, and what this start restored."""
        now: JsonObject = {"thresholds": dict(thresholds), "paused_cameras": sorted(paused)}
        if not self.keep:
            return {"reset_at_start": True, **now}
        return {
            "restored_at_start": True,
            "file": str(self.path),
            **now,
            "restored": {
                "thresholds": dict(self.restored.thresholds),
                "paused_cameras": list(self.restored.paused_cameras),
            },
            "not_restored": list(self.restored.not_restored),
            "save_error": self.save_error,
        }
