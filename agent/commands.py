"""What each command from the line does: a table of handlers, one per command name.

`InspectionService.handle_command` refuses every command until the engine is warm, then
`dispatch` looks the command's name up in `COMMANDS` and calls its handler with the
command's own arguments (the models in agent/control.py, validated before anything here
runs). A handler returns the fields of the answer (`{"command": ..., "ok": true, ...}`) or
raises `ValueError` with the reason the commander is told.

Adding a command: its arguments model and row in `control.ARGS` (what the wire accepts),
then one handler function and one row in `COMMANDS` below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from agent.control import (
    ARGS,
    Answer,
    CameraArgs,
    Command,
    CommandArgs,
    ConfirmGoodArgs,
    ReloadArgs,
    SnapshotArgs,
    ThresholdArgs,
)
from agent.logs import get_logger
from model.config import normalise_class_name

if TYPE_CHECKING:
    from agent.service import InspectionService
    from model.engine import Engine
    from model.memory import PatchMemory

log = get_logger(__name__)

ENGINE_LOADING = "the engine is still loading; try again once the line reports online"
MEMORY_TASK_S = 300.0  # growing a memory (features, statistics, recalibration) may take this long

A = TypeVar("A", bound=CommandArgs)


class Route(Protocol):
    """A row of the table: the arguments a command takes and what runs it."""

    @property
    def args(self) -> type[CommandArgs]: ...

    def __call__(self, line: InspectionService, args: CommandArgs) -> Answer: ...


@dataclass(frozen=True, slots=True)
class CommandRoute(Generic[A]):
    """One command's handler, which gets the command's own arguments type."""

    args: type[A]
    run: Callable[[InspectionService, A], Answer]

    def __call__(self, line: InspectionService, args: CommandArgs) -> Answer:
        if not isinstance(args, self.args):
            raise TypeError(f"{type(args).__name__} given where {self.args.__name__} is expected")
        return self.run(line, args)


def route(args: type[A], run: Callable[[InspectionService, A], Answer]) -> Route:
    """A row of `COMMANDS`: `run` gets `args`, the command's own arguments type (checked by mypy)."""
    return CommandRoute(args, run)


def reload(line: InspectionService, args: ReloadArgs) -> Answer:
    """Load the newest prompt checkpoint, then re-read the class profiles ([model].profile_dir)."""
    from agent.line_reload import reload_all  # it imports this module (ENGINE_LOADING)

    return reload_all(line)


def set_threshold(line: InspectionService, args: ThresholdArgs) -> Answer:
    """One class's threshold; it wins over [thresholds] and calibration, and is kept across a restart
    ([agent].keep_operator_changes) until the class's [thresholds] value in config changes."""
    engine = line.worker.engine
    if engine is None:
        raise ValueError(ENGINE_LOADING)
    name = match_name("product class", normalise_class_name(args.product_class), engine.classes.names())
    line.thresholds = {k: v for k, v in line.thresholds.items() if normalise_class_name(k) != name}
    line.thresholds[name] = args.value
    line.commanded.add(name)
    engine.classes.set_thresholds(line.thresholds, {k: "command" for k in line.commanded})
    log.info("threshold set by command", product_class=name, value=args.value)
    save_operator_changes(line)
    line.publish_info()
    return {"product_class": name, "threshold": args.value}


def pause(line: InspectionService, args: CameraArgs) -> Answer:
    """Stop scoring one camera's frames (or every camera's)."""
    return _set_paused(line, args.camera, paused=True)


def resume(line: InspectionService, args: CameraArgs) -> Answer:
    """Score one camera's frames again (or every camera's)."""
    return _set_paused(line, args.camera, paused=False)


def snapshot(line: InspectionService, args: SnapshotArgs) -> Answer:
    """Publish the retained info again, and answer with it."""
    return {"info": line.publish_info()}


def confirm_good(line: InspectionService, args: ConfirmGoodArgs) -> Answer:
    """Add parts confirmed good (among the last [agent].confirm_good_parts scored) to their class's patch
    memory, bounded by [model].memory_max_images; the memory is saved beside the class profile, so a restart
    keeps it. Off unless [agent].confirm_good."""
    if not line.config.agent.confirm_good:
        raise ValueError("confirm-good is off on this line ([agent].confirm_good = false)")
    if line.worker.engine is None:
        raise ValueError(ENGINE_LOADING)
    found, missing = line.recent_parts.find(args.parts)
    if not found:
        raise ValueError(
            f"no part of {', '.join(repr(p) for p in missing)} is among the last {line.recent_parts.capacity} "
            "parts scored ([agent].confirm_good_parts)"
        )
    grown: dict[str, object] = {}
    for name, parts in found.items():
        images, ids = [p.image for p in parts], [p.part_id for p in parts]

        def grow(engine: Engine, name: str = name, images: list = images, ids: list = ids) -> PatchMemory:
            return engine.classes.grow_memory(name, images, ids)

        memory = line.worker.submit(grow).result(MEMORY_TASK_S)
        grown[name] = {"images": memory.images, "confirmed": memory.confirmed, "patches": memory.patches}
        log.info("parts confirmed good added to the patch memory", product_class=name, parts=ids)
    line.publish_info()
    return {"classes": grown, "unknown_parts": missing}


def _set_paused(line: InspectionService, camera: str | None, *, paused: bool) -> Answer:
    if camera is not None:
        camera = match_name("camera", camera, list(line.sources), none="none running")
    cameras = line.batcher.set_paused(camera, paused)
    log.info(f"cameras {'paused' if paused else 'resumed'}", cameras=cameras)
    save_operator_changes(line)
    line.publish_info()
    return {"cameras": cameras}


def match_name(what: str, given: str, names: Sequence[str], *, none: str = "none") -> str:
    """The one of `names` that `given` names: itself, else the only one equal to it ignoring case. Else a
    ValueError that lists the line's names (`unknown camera 'cam-9' on this line (cameras: cam-1, cam-2)`),
    or the ones it matches when it matches several (`Washer` and `washer`)."""
    if given in names:
        return given
    matches = [name for name in names if name.casefold() == given.casefold()]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ValueError(f"{what} {given!r} matches more than one on this line: {', '.join(matches)} (give it exactly)")
    known = ", ".join(names) or none
    plural = "classes" if what.endswith("class") else f"{what}s"
    raise ValueError(f"unknown {what} {given!r} on this line ({plural}: {known})")


def save_operator_changes(line: InspectionService) -> None:
    """Keep the thresholds and pauses in force now in the line's operator.json (agent/operator_state.py)."""
    commanded = {name: line.thresholds[name] for name in line.commanded if name in line.thresholds}
    line.operator.save(commanded, line.batcher.paused(), line.config.thresholds)


def restore_operator_changes(line: InspectionService) -> None:
    """At start, before the classes are set up and the cameras start: what operator.json still applies."""
    cfg = line.config
    restored = line.operator.restore(cfg.product_classes(), [c.id for c in cfg.cameras], cfg.thresholds)
    for name, value in restored.thresholds.items():
        line.thresholds = {k: v for k, v in line.thresholds.items() if normalise_class_name(k) != name}
        line.thresholds[name] = value
        line.commanded.add(name)
    for camera in restored.paused_cameras:
        line.batcher.set_paused(camera, True)


COMMANDS: Mapping[str, Route] = {
    "reload": route(ReloadArgs, reload),
    "threshold": route(ThresholdArgs, set_threshold),
    "pause": route(CameraArgs, pause),
    "resume": route(CameraArgs, resume),
    "snapshot": route(SnapshotArgs, snapshot),
    "confirm-good": route(ConfirmGoodArgs, confirm_good),
}
if {name: route.args for name, route in COMMANDS.items()} != ARGS:  # a command the wire accepts and nothing runs
    raise ImportError("agent.commands.COMMANDS and agent.control.ARGS name different commands or arguments")


def dispatch(line: InspectionService, command: Command) -> Answer:
    """Run a validated command on the line; the answer's fields, or ValueError with the reason."""
    route = COMMANDS.get(command.name)
    if route is None:
        raise ValueError(f"unknown command {command.name!r}")
    return route(line, command.args)
