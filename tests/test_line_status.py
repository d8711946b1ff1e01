"""The retained status tells the truth: starting until warm, online, degraded with reasons; heartbeat; /livez."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.control import parse_command
from agent.line_state import STARTING_REASON, LineState, StatusMonitor, line_state
from agent.service import InspectionService
from tests.brokers import MosquittoServer, RedisServer
from tests.test_agent import Watcher, line_config, running, wait_for

__all__ = ["running"]  # a fixture, imported for pytest

pytestmark = pytest.mark.timeout(240)


def test_line_state_rule() -> None:
    assert line_state(False, ["camera cam-1: failed (x)"]) == LineState("starting", (STARTING_REASON,))
    assert line_state(True, []) == LineState("online")
    assert line_state(True, ["redis: broker unreachable"]) == LineState("degraded", ("redis: broker unreachable",))


class FakeSink:
    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.beats: list[tuple[int, str]] = []

    def set_status(self, state: str) -> None:
        self.statuses.append(state)

    def heartbeat(self, count: int, state: str, reasons: tuple[str, ...]) -> None:
        self.beats.append((count, state))


def test_monitor_reports_changes_once_and_counts_beats() -> None:
    states = iter([LineState("starting", ("s",))] * 3 + [LineState("degraded", ("a",)), LineState("degraded", ("b",))])
    current = [LineState("starting", ("s",))]

    def evaluate() -> LineState:
        current[0] = next(states, LineState("online"))
        return current[0]

    sink, infos = FakeSink(), []
    monitor = StatusMonitor(evaluate, sink, lambda: infos.append(current[0]), heartbeat_s=0.02)
    monitor.start()
    try:
        deadline = time.monotonic() + 10
        while len(sink.beats) < 10 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        monitor.stop()
    assert sink.statuses == ["starting", "degraded", "online"]  # the word, once per change
    assert infos == [LineState("degraded", ("a",)), LineState("degraded", ("b",)), LineState("online")]
    counts = [c for c, _ in sink.beats]
    assert counts == list(range(1, len(counts) + 1)) and len(counts) >= 10
    after = len(sink.beats)
    time.sleep(0.1)
    assert len(sink.beats) == after, "heartbeats after stop()"


def test_monitor_without_heartbeat_sends_none() -> None:
    sink = FakeSink()
    monitor = StatusMonitor(lambda: LineState("online"), sink, lambda: None, heartbeat_s=0)
    monitor.start()
    monitor.refresh()
    monitor.stop()
    assert sink.statuses == ["online"] and sink.beats == []


def http_get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


class Recorder:
    """Records status and heartbeat messages with their MQTT properties."""

    def __init__(self, port: int, line: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rec-{line}", protocol=mqtt.MQTTv5)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append(m)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe([(f"genclip/{line}/status", 1), (f"genclip/{line}/heartbeat", 1)])
        self.client.loop_start()
        assert subscribed.wait(10)

    def on(self, suffix: str) -> list[mqtt.MQTTMessage]:
        return [m for m in list(self.messages) if m.topic.endswith(suffix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_starting_until_warm_then_online_then_stopped(
    tmp_path: Path, mosquitto: MosquittoServer, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model import Engine

    warm, release = threading.Event(), threading.Event()
    real_warmup = Engine.warmup

    def slow_warmup(engine: Engine) -> float:
        warm.set()
        release.wait(60)
        return real_warmup(engine)

    monkeypatch.setattr(Engine, "warmup", slow_warmup)
    line = "status-warm"
    watcher = Watcher(mosquitto.port, line)
    service = InspectionService(line_config(tmp_path, mosquitto.port, redis_server.url, line))
    starting = threading.Thread(target=service.start)
    starting.start()
    try:
        assert warm.wait(120)
        base = f"http://127.0.0.1:{service.health.port}"
        wait_for(lambda: watcher.of("/status") == ["starting"], 20, "starting announced")
        late = Recorder(mosquitto.port, line)  # subscribes later: the retained copy is `starting`
        wait_for(lambda: len(late.on("/heartbeat")) >= 2, 20, "heartbeats while starting")
        assert [m.payload for m in late.on("/status")] == [b"starting"] and late.on("/status")[0].retain
        code, body = http_get(base + "/healthz")
        assert code == 503 and body["reasons"][0] == STARTING_REASON, body
        assert http_get(base + "/livez") == (200, {"status": "alive"})
        beats = [json.loads(m.payload) for m in late.on("/heartbeat")]
        assert {b["status"] for b in beats} == {"starting"} and beats[0]["line"] == line
        for m in late.on("/heartbeat"):
            assert m.qos == 0 and not m.retain and m.properties.MessageExpiryInterval == 2
        assert watcher.of("/info") == []  # info comes with online, once everything is set up
    finally:
        release.set()
        starting.join(120)
    try:
        wait_for(lambda: watcher.of("/status") == ["starting", "online"], 30, "online after warm-up")
        wait_for(lambda: http_get(base + "/healthz")[0] == 200, 30, "/healthz 200 once cameras run")
        info = watcher.of("/info")[-1]
        assert info["status"] == {"state": "online", "reasons": []}
        assert info["operator_overrides"] == {  # [agent].keep_operator_changes on, no operator.json yet
            "restored_at_start": True,
            "file": str(service.operator.path),
            "thresholds": {},
            "paused_cameras": [],
            "restored": {"thresholds": {}, "paused_cameras": []},
            "not_restored": [],
            "save_error": None,
        }
        counts = [json.loads(m.payload)["count"] for m in late.on("/heartbeat")]
        assert counts == sorted(counts) and len(set(counts)) == len(counts)
        wait_for(lambda: json.loads(late.on("/heartbeat")[-1].payload)["status"] == "online", 10, "beat online")
    finally:
        service.shutdown()
    wait_for(lambda: watcher.of("/status") == ["starting", "online", "stopped"], 20, "stopped last")
    beats = len(late.on("/heartbeat"))
    time.sleep(1.5)
    assert len(late.on("/heartbeat")) == beats, "heartbeat after stop"
    late.close()
    watcher.close()


def test_degraded_while_redis_is_down_and_overrides_in_info(
    tmp_path: Path, mosquitto: MosquittoServer, fresh_redis: RedisServer, running: Any
) -> None:
    line = "status-degraded"
    watcher = Watcher(mosquitto.port, line)
    cfg = line_config(tmp_path, mosquitto.port, fresh_redis.url, line, keep_operator_changes=False)
    service = running(cfg)  # the switch off: info says the overrides are reset at start
    wait_for(lambda: watcher.of("/status")[-1:] == ["online"], 30, "online")
    service.handle_command(parse_command("threshold", b'{"class": "widget", "value": 0.7}'))
    service.handle_command(parse_command("pause", b'{"camera": "cam-2"}'))
    overrides = service.info()["operator_overrides"]
    assert overrides == {"reset_at_start": True, "thresholds": {"widget": 0.7}, "paused_cameras": ["cam-2"]}

    fresh_redis.stop()
    wait_for(lambda: watcher.of("/status")[-1:] == ["degraded"], 30, "degraded")
    info = watcher.of("/info")[-1]
    assert info["status"]["state"] == "degraded"
    assert any(r.startswith("redis:") for r in info["status"]["reasons"]), info["status"]
    fresh_redis.restart()
    wait_for(lambda: watcher.of("/status")[-1:] == ["online"], 60, "online again")
    assert watcher.of("/status") == ["starting", "online", "degraded", "online"]
    assert watcher.of("/info")[-1]["status"] == {"state": "online", "reasons": []}
    service.shutdown()
    watcher.close()


def test_livez_is_the_watchdog_rule() -> None:
    from agent.health import HealthServer
    from agent.metrics import AgentMetrics

    hung: list[str] = []
    server = HealthServer("127.0.0.1", 0, AgentMetrics(), lambda: [STARTING_REASON], liveness=lambda: list(hung))
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert http_get(base + "/livez") == (200, {"status": "alive"})
        assert http_get(base + "/healthz") == (503, {"status": "unhealthy", "reasons": [STARTING_REASON]})
        hung.append("engine worker stalled: one batch has run for 31 s")
        assert http_get(base + "/livez") == (503, {"status": "hung", "reasons": hung})
        assert http_get(base + "/")[1]["endpoints"] == ["/healthz", "/livez", "/metrics"]
    finally:
        server.stop()
