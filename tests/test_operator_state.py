"""Operator changes (threshold, pause) survive a restart: <state_dir>/operator.json, restored at start."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.control import parse_command
from agent.instance_lock import state_dir_for
from agent.operator_state import (
    OPERATOR_FILE,
    OperatorState,
    OperatorStore,
    ThresholdOverride,
    applicable,
)
from agent.service import InspectionService
from tests.brokers import MosquittoServer, RedisServer
from tests.test_agent import Watcher, line_config, running, wait_for

__all__ = ["running"]  # a fixture, imported for pytest

pytestmark = pytest.mark.timeout(240)


# --- the file and its rules, without an agent ------------------------------------------------------------------
def test_state_round_trips_and_is_written_atomically(tmp_path: Path) -> None:
    path = tmp_path / "line" / OPERATOR_FILE
    store = OperatorStore(path, keep=True)
    store.save({"widget": 0.7}, ["cam-2"], {"widget": 0.62})
    assert [p.name for p in path.parent.iterdir()] == [OPERATOR_FILE]  # no temporary file left behind
    state = OperatorState.from_json(path.read_text())
    assert state.thresholds == {"widget": ThresholdOverride(value=0.7, config_value=0.62)}
    assert state.paused_cameras == ("cam-2",)
    assert json.loads(path.read_text())["schema"] == 1
    assert OperatorState.from_json(state.to_json()) == state


def test_what_no_longer_applies_is_dropped_with_the_reason() -> None:
    state = OperatorState(
        thresholds={
            "widget": ThresholdOverride(value=0.7, config_value=0.62),
            "gadget": ThresholdOverride(value=0.5, config_value=None),
            "bolt": ThresholdOverride(value=0.4, config_value=None),
        },
        paused_cameras=("cam-2", "cam-9"),
    )
    restored = applicable(state, ["widget", "bolt"], ["cam-1", "cam-2"], {"widget": 0.62, "bolt": 0.3})
    assert dict(restored.thresholds) == {"widget": 0.7}
    assert restored.paused_cameras == ("cam-2",)
    why = "\n".join(restored.not_restored)
    assert len(restored.not_restored) == 3
    assert "'gadget': the class is no longer on this line" in why
    assert "'bolt': [thresholds] changed from None to 0.3 since the command; the config wins" in why
    assert "camera 'cam-9': the camera is no longer on this line" in why


def test_switch_off_neither_reads_nor_writes(tmp_path: Path) -> None:
    path = tmp_path / OPERATOR_FILE
    OperatorStore(path, keep=False).save({"widget": 0.7}, ["cam-2"], {})
    assert not path.exists()
    OperatorStore(path, keep=True).save({"widget": 0.7}, ["cam-2"], {})
    off = OperatorStore(path, keep=False)
    assert off.restore(["widget"], ["cam-2"], {}).thresholds == {}
    assert off.info({}, []) == {"reset_at_start": True, "thresholds": {}, "paused_cameras": []}


@pytest.mark.parametrize("text", [b"{not json", b'{"schema": 1, "thresholds": {"widget": {"value": 7}}}', b"[]"])
def test_a_corrupt_file_is_set_aside(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / OPERATOR_FILE
    path.write_bytes(text)
    store = OperatorStore(path, keep=True)
    restored = store.restore(["widget"], ["cam-1"], {})
    assert restored.thresholds == {} and restored.paused_cameras == ()
    assert len(restored.not_restored) == 1 and "is corrupt" in restored.not_restored[0]
    assert not path.exists() and (tmp_path / "operator.json.bad").read_bytes() == text


# --- a real agent, restarted ---------------------------------------------------------------------------------------
def _command(service: InspectionService, name: str, body: bytes) -> None:
    answer = service.handle_command(parse_command(name, body))
    assert answer, answer


def _first_run(service: InspectionService, watcher: Watcher) -> None:
    wait_for(lambda: watcher.of("/status")[-1:] == ["online"], 60, "online")
    _command(service, "threshold", b'{"class": "widget", "value": 0.7}')
    _command(service, "pause", b'{"camera": "cam-2"}')
    service.shutdown()  # what SIGTERM does


def _results_of(watcher: Watcher, service: InspectionService, camera: str) -> list[dict[str, Any]]:
    return [r for r in watcher.of("/result") if r["run_id"] == service.run_id and r["camera"] == camera]


def test_threshold_and_pause_survive_a_restart(
    tmp_path: Path, mosquitto: MosquittoServer, redis_server: RedisServer, running: Any
) -> None:
    line = "ops-kept"
    cfg = line_config(tmp_path, mosquitto.port, redis_server.url, line)
    watcher = Watcher(mosquitto.port, line)
    _first_run(running(cfg), watcher)
    saved = json.loads((state_dir_for(None, line) / OPERATOR_FILE).read_text())
    assert saved["thresholds"] == {"widget": {"value": 0.7, "config_value": 0.62}}
    assert saved["paused_cameras"] == ["cam-2"]

    second = running(cfg)
    wait_for(lambda: len(_results_of(watcher, second, "cam-1")) >= 16, 60, "16 results from cam-1")
    for r in _results_of(watcher, second, "cam-1"):
        assert r["threshold"] == 0.7 and r["threshold_source"] == "command", r
    assert _results_of(watcher, second, "cam-2") == []  # still paused: nothing scored
    overrides = second.info()["operator_overrides"]
    assert overrides["restored_at_start"] is True and "reset_at_start" not in overrides
    assert overrides["file"] == str(state_dir_for(None, line) / OPERATOR_FILE)
    assert overrides["thresholds"] == {"widget": 0.7} and overrides["paused_cameras"] == ["cam-2"]
    assert overrides["restored"] == {"thresholds": {"widget": 0.7}, "paused_cameras": ["cam-2"]}
    assert overrides["not_restored"] == [] and overrides["save_error"] is None
    assert watcher.of("/info")[-1]["operator_overrides"] == overrides

    _command(second, "resume", b'{"camera": "cam-2"}')  # resumed: saved, and cam-2 scores again
    wait_for(lambda: len(_results_of(watcher, second, "cam-2")) >= 2, 60, "cam-2 results after resume")
    assert json.loads((state_dir_for(None, line) / OPERATOR_FILE).read_text())["paused_cameras"] == []
    second.shutdown()
    watcher.close()


def test_switch_off_resets_at_start(
    tmp_path: Path, mosquitto: MosquittoServer, redis_server: RedisServer, running: Any
) -> None:
    line = "ops-reset"
    cfg = line_config(tmp_path, mosquitto.port, redis_server.url, line, keep_operator_changes=False)
    watcher = Watcher(mosquitto.port, line)
    _first_run(running(cfg), watcher)
    assert not (state_dir_for(None, line) / OPERATOR_FILE).exists()

    second = running(cfg)
    wait_for(lambda: len(_results_of(watcher, second, "cam-2")) >= 4, 60, "results from cam-2 (not paused)")
    for r in _results_of(watcher, second, "cam-1") + _results_of(watcher, second, "cam-2"):
        assert r["threshold"] == 0.62 and r["threshold_source"] == "config", r
    overrides = second.info()["operator_overrides"]
    assert overrides == {"reset_at_start": True, "thresholds": {}, "paused_cameras": []}
    second.shutdown()
    watcher.close()


def test_corrupt_file_is_reported_and_the_line_starts(
    tmp_path: Path, mosquitto: MosquittoServer, redis_server: RedisServer, running: Any
) -> None:
    line = "ops-corrupt"
    path = state_dir_for(None, line) / OPERATOR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'{"schema": 1, "thresholds": {"widget": ')
    watcher = Watcher(mosquitto.port, line)
    service = running(line_config(tmp_path, mosquitto.port, redis_server.url, line))
    wait_for(lambda: watcher.of("/status")[-1:] == ["online"], 60, "online")
    wait_for(lambda: len(_results_of(watcher, service, "cam-2")) >= 2, 60, "results from both cameras")
    overrides = watcher.of("/info")[-1]["operator_overrides"]
    assert overrides["restored_at_start"] is True
    assert overrides["thresholds"] == {} and overrides["paused_cameras"] == []
    assert len(overrides["not_restored"]) == 1 and "is corrupt" in overrides["not_restored"][0]
    assert path.with_name("operator.json.bad").read_bytes() == b'{"schema": 1, "thresholds": {"widget": '
    assert not path.exists()
    _command(service, "pause", b'{"camera": "cam-1"}')  # the next command writes a fresh file
    assert json.loads(path.read_text())["paused_cameras"] == ["cam-1"]
    service.shutdown()
    watcher.close()
