"""The table of command handlers: every command the wire accepts has one, and each gets its own arguments."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from agent.commands import COMMANDS, dispatch
from agent.control import ARGS, CameraArgs, Command, ReloadArgs, parse_command


class Batcher:
    def __init__(self) -> None:
        self.calls: list[tuple[str | None, bool]] = []
        self.now_paused: set[str] = set()

    def set_paused(self, camera: str | None, paused: bool) -> list[str]:
        self.calls.append((camera, paused))
        changed = {camera} if camera else {"cam-1", "cam-2"}
        self.now_paused = self.now_paused | changed if paused else self.now_paused - changed
        return [camera] if camera else ["cam-1", "cam-2"]

    def paused(self) -> list[str]:
        return sorted(self.now_paused)


class Operator:
    """Records what the handlers ask to keep in operator.json."""

    def __init__(self) -> None:
        self.saved: list[tuple[dict[str, float], list[str]]] = []

    def save(self, thresholds: dict[str, float], paused: list[str], config_thresholds: dict[str, float]) -> None:
        self.saved.append((dict(thresholds), list(paused)))


def line(**overrides: Any) -> Any:
    published: list[dict] = []

    def publish_info() -> dict:
        published.append({"schema": 1})
        return published[-1]

    fake = SimpleNamespace(
        sources={"cam-1": object(), "cam-2": object()},
        batcher=Batcher(),
        publish_info=publish_info,
        published=published,
        reload=lambda: "v2@abc",
        config=SimpleNamespace(  # neither a profile folder nor a watched checkpoint: reload is the prompts' only
            agent=SimpleNamespace(prompt_dir=None),
            model=SimpleNamespace(checkpoint=None, profile_dir=None),
            thresholds={},
        ),
        worker=SimpleNamespace(engine=None),
        thresholds={},
        commanded=set(),
        operator=Operator(),
    )
    for key, value in overrides.items():
        setattr(fake, key, value)
    return fake


def test_every_command_the_wire_accepts_has_a_handler_taking_its_arguments():
    assert set(COMMANDS) == set(ARGS)
    for name, route in COMMANDS.items():
        assert route.args is ARGS[name], name


def test_handlers_answer_with_their_fields():
    fake = line()
    assert dispatch(fake, parse_command("reload", b"")) == {"prompt_version": "v2@abc", "profiles": []}
    assert dispatch(fake, parse_command("pause", b'{"camera": "cam-2"}')) == {"cameras": ["cam-2"]}
    assert dispatch(fake, parse_command("resume", b"")) == {"cameras": ["cam-1", "cam-2"]}
    assert fake.batcher.calls == [("cam-2", True), (None, False)]
    assert fake.operator.saved == [({}, ["cam-2"]), ({}, [])]  # each change kept in operator.json
    assert dispatch(fake, parse_command("snapshot", b"")) == {"info": {"schema": 1}}
    assert len(fake.published) == 3  # pause, resume and snapshot publish the info


def test_unknown_camera_and_unknown_command_are_refused_with_the_reason():
    fake = line()
    with pytest.raises(ValueError, match=r"unknown camera 'cam-9' on this line \(cameras: cam-1, cam-2\)"):
        dispatch(fake, parse_command("pause", b'{"camera": "cam-9"}'))
    with pytest.raises(ValueError, match="none running"):
        dispatch(line(sources={}), parse_command("resume", b'{"camera": "cam-1"}'))
    assert fake.batcher.calls == [] and fake.published == []
    with pytest.raises(ValueError, match="unknown command 'explode'"):
        dispatch(fake, Command("explode", ReloadArgs()))


def test_a_handler_never_gets_another_commands_arguments():
    with pytest.raises(TypeError, match="CameraArgs"):
        COMMANDS["pause"](line(), ReloadArgs())
    assert COMMANDS["pause"](line(), CameraArgs(camera="cam-1")) == {"cameras": ["cam-1"]}


class Classes:
    """The engine's class registry, as far as the threshold command uses it."""

    def __init__(self, *names: str) -> None:
        self.registered = set(names)
        self.set: list[dict[str, float]] = []

    def names(self) -> list[str]:
        return sorted(self.registered)

    def set_thresholds(self, thresholds: dict[str, float], sources: dict[str, str] | None = None) -> None:
        self.set.append(dict(thresholds))


def with_classes(*names: str, **overrides: Any) -> Any:
    return line(worker=SimpleNamespace(engine=SimpleNamespace(classes=Classes(*names))), **overrides)


def threshold(fake: Any, name: str, value: float = 0.7) -> Any:
    return dispatch(fake, parse_command("threshold", f'{{"class": "{name}", "value": {value}}}'.encode()))


def test_threshold_class_matches_ignoring_case_and_an_unknown_one_lists_the_lines_classes():
    fake = with_classes("washer", "widget")
    assert threshold(fake, "WASHER") == {"product_class": "washer", "threshold": 0.7}
    assert fake.thresholds == {"washer": 0.7} and fake.worker.engine.classes.set == [{"washer": 0.7}]
    with pytest.raises(ValueError, match=r"^unknown product class 'bolt' on this line \(classes: washer, widget\)$"):
        threshold(fake, "bolt")
    with pytest.raises(ValueError, match=r"\(classes: none\)"):
        threshold(with_classes(), "washer")


def test_a_name_that_matches_several_classes_or_cameras_only_by_case_is_refused_listing_them():
    fake = with_classes("Washer", "washer", "widget")
    with pytest.raises(ValueError, match=r"^product class 'WASHER' matches more than one on this line: Washer, "
                       r"washer \(give it exactly\)$"):  # fmt: skip
        threshold(fake, "WASHER")
    assert threshold(fake, "Washer") == {"product_class": "Washer", "threshold": 0.7}  # an exact match wins
    assert fake.batcher.calls == [] and fake.thresholds == {"Washer": 0.7}
    cams = line(sources={"cam-1": object(), "CAM-1": object(), "cam-2": object()})
    with pytest.raises(ValueError, match=r"^camera 'Cam-1' matches more than one on this line: cam-1, CAM-1"):
        dispatch(cams, parse_command("pause", b'{"camera": "Cam-1"}'))
    assert dispatch(cams, parse_command("pause", b'{"camera": "CAM-2"}')) == {"cameras": ["cam-2"]}
    assert dispatch(cams, parse_command("resume", b'{"camera": "CAM-1"}')) == {"cameras": ["CAM-1"]}
    assert cams.batcher.calls == [("cam-2", True), ("CAM-1", False)]
