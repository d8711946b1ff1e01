"""The agent end to end: synthetic cameras -> engine -> real Mosquitto and Redis, watched from outside."""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import redis
import tomli_w
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import InspectConfig
from agent.service import InspectionService
from tests.brokers import MosquittoServer, RedisServer
from tests.factories import perturbed_checkpoint, tiny_config


class Watcher:
    """An independent MQTT 5 subscriber on the line's topics, with a persistent session."""

    def __init__(self, port: int, line: str) -> None:
        self.messages: list[tuple[str, dict[str, Any] | str]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"watch-{line}", protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe(f"genclip/{line}/#", qos=1)
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            payload: dict[str, Any] | str = json.loads(message.payload)
        except ValueError:
            payload = message.payload.decode()
        with self.lock:
            self.messages.append((message.topic, payload))

    def of(self, suffix: str) -> list[Any]:
        with self.lock:
            return [p for t, p in self.messages if t.endswith(suffix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def line_config(tmp_path: Path, mqtt_port: int, redis_url: str, line: str, **agent: Any) -> InspectConfig:
    model = tiny_config().model_dump(exclude_none=True, by_alias=True)
    return InspectConfig(
        line={"id": line},
        model=model,
        engine={"batch_size": 4, "max_wait_ms": 20},
        cameras=[
            {
                "id": f"cam-{i}",
                "source": f"synthetic:{i}",
                "product_class": "widget",
                "fps": 8,
                "queue_policy": "block",  # nothing may be dropped in these tests
                "max_age_ms": 0,
                "synthetic": {"defect_rate": 0.4, "seed": i, "ground_truth": str(tmp_path / f"truth-{i}.jsonl")},
            }
            for i in (1, 2)
        ],
        thresholds={"widget": 0.62},
        mqtt={"port": mqtt_port, "decision_window_ms": 30_000},
        redis={"url": redis_url, "maps": "all"},
        agent={"health_port": 0, "shutdown_timeout_s": 20, **agent},
    )


@pytest.fixture
def running(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    services: list[InspectionService] = []

    def start(cfg: InspectConfig) -> InspectionService:
        service = InspectionService(cfg)
        services.append(service)
        service.start()
        return service

    yield start
    for service in services:
        if not service._stop.is_set():
            service.shutdown()


def wait_for(condition: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def assert_accounted(service: InspectionService) -> dict[str, Any]:
    """After shutdown: every accepted frame was published, dropped with a reason, or expired; none in flight."""
    snap = service.ledger.snapshot()
    assert snap.accepted == snap.published + sum(snap.dropped.values()) + snap.expired + snap.in_flight
    assert snap.in_flight == 0, snap.as_dict()
    emitted = sum(source.status().frames for source in service.sources.values())
    assert snap.accepted == emitted
    return snap.as_dict()


def test_synthetic_line_end_to_end(tmp_path, mosquitto: MosquittoServer, redis_server: RedisServer, running):
    line = "e2e"
    watcher = Watcher(mosquitto.port, line)
    cfg = line_config(tmp_path, mosquitto.port, redis_server.url, line)
    service = running(cfg)
    wait_for(lambda: len(watcher.of("/result")) >= 24, 60, "24 results")
    port = service.health.port
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read())
    assert health == {"status": "ok"}
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert 'genclip_frames_processed_total{camera="cam-1"}' in metrics and "genclip_messages_total" in metrics
    service.shutdown()
    counts = assert_accounted(service)
    assert counts["dropped"] == {} and counts["expired"] == 0
    wait_for(lambda: len(watcher.of("/result")) >= counts["published"], 10, "every result")
    time.sleep(0.5)
    watcher.close()

    results = watcher.of("/result")
    decisions = watcher.of("/decision")
    rejects = watcher.of("/reject")
    assert len(results) == counts["published"]
    by_part = {(r["camera"], r["part_id"]): r for r in results}
    assert len(by_part) == len(results)  # one result per frame
    for camera in ("cam-1", "cam-2"):
        seqs = sorted(r["seq"] for r in results if r["camera"] == camera)
        assert seqs == list(range(1, len(seqs) + 1))  # no frame lost, in order
        truth = [json.loads(x) for x in (tmp_path / f"truth-{camera[-1]}.jsonl").read_text().splitlines()]
        assert {t["part_id"] for t in truth} >= {r["part_id"] for r in results if r["camera"] == camera}
    assert {(d["camera"], d["part_id"]) for d in decisions} == set(by_part)
    ng = {key for key, r in by_part.items() if r["verdict"] != "OK"}
    assert 0 < len(ng) < len(results)
    assert {(r["camera"], r["part_id"]) for r in rejects} == ng and len(rejects) == len(ng)
    for r in results:
        assert r["schema"] == 1 and r["line"] == line and r["threshold"] == 0.62
        assert r["verdict"] == ("NG" if r["score"] >= r["threshold"] else "OK")
        assert (r["verdict"] == "NG") == bool(r["defects"])
        assert r["model"]["backbone"] == "genclip-tiny" and r["latency_ms"] >= 0
    assert watcher.of("/status")[-1] == "stopped"
    assert watcher.of("/info")[0]["cameras"][0]["id"] == "cam-1"

    db = redis.Redis.from_url(redis_server.url)
    entries = db.xrange(f"genclip:{line}:results")
    assert len(entries) == len(results)
    payloads = [json.loads(fields[b"payload"]) for _, fields in entries]
    assert {(p["camera"], p["seq"]) for p in payloads} == {(r["camera"], r["seq"]) for r in results}
    first = entries[0][1]
    assert first[b"verdict"].decode() in ("OK", "NG") and float(first[b"score"]) >= 0
    png = db.get(payloads[0]["map_key"])
    assert png is not None and png.startswith(b"\x89PNG") and db.ttl(payloads[0]["map_key"]) > 0


def test_hot_reload_without_restart_or_lost_frame(tmp_path, mosquitto, redis_server, running):
    line = "reload"
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    watcher = Watcher(mosquitto.port, line)
    service = running(line_config(tmp_path, mosquitto.port, redis_server.url, line, prompt_dir=str(prompts)))
    engine = service.worker.engine
    assert engine.prompt_version == "untrained"
    wait_for(lambda: len(watcher.of("/result")) >= 8, 60, "results before the reload")

    (prompts / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    wait_for(lambda: service.last_reload_error is not None, 20, "the corrupt checkpoint refused")
    assert engine.prompt_version == "untrained" and "broken.safetensors" in service.last_reload_error
    wait_for(lambda: watcher.of("/info")[-1]["model"]["last_reload_error"], 10, "the error in the retained info")

    staging = tmp_path / "p.safetensors"
    perturbed_checkpoint(staging, engine.backbone, tiny_config(), seed=3)
    staging.rename(prompts / "v2.safetensors")  # published atomically, as `genclip train --publish` does
    wait_for(lambda: engine.prompt_version.startswith("v2@"), 20, "the new prompts")
    n = len(watcher.of("/result"))
    wait_for(lambda: len(watcher.of("/result")) >= n + 8, 60, "results after the reload")
    service.shutdown()
    counts = assert_accounted(service)
    assert counts["dropped"] == {}
    time.sleep(0.5)
    watcher.close()
    results = watcher.of("/result")
    versions = [r["model"]["prompt_version"] for r in sorted(results, key=lambda r: r["published_at"])]
    assert versions[0] == "untrained" and versions[-1].startswith("v2@")
    assert len(results) == counts["published"]
    for camera in ("cam-1", "cam-2"):
        seqs = sorted(r["seq"] for r in results if r["camera"] == camera)
        assert seqs == list(range(1, len(seqs) + 1))


def test_a_checkpoint_published_while_the_engine_loads_is_picked_up(tmp_path, mosquitto, redis_server):
    """Loading a big model takes minutes; the watcher starts after it. What was published meanwhile is loaded."""
    from model.backbone import load_backbone

    line = "catch-up"
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    backbone = load_backbone("genclip-tiny", "random")
    perturbed_checkpoint(prompts / "v1.safetensors", backbone, tiny_config(), seed=1)
    os.utime(prompts / "v1.safetensors", (time.time() - 60, time.time() - 60))
    service = InspectionService(line_config(tmp_path, mosquitto.port, redis_server.url, line, prompt_dir=str(prompts)))
    build = service._build_engine

    def build_then_publish() -> Any:
        engine = build()  # chose and loaded v1
        staging = tmp_path / "v2.part"
        perturbed_checkpoint(staging, backbone, tiny_config(), seed=2)
        staging.rename(prompts / "v2.safetensors")  # published while the engine warms up
        return engine

    service.worker._build = build_then_publish
    try:
        service.start()  # on v1; the watcher starts after the rename, so it never sees v2 arrive
        loaded = service.worker.engine
        wait_for(lambda: loaded.prompt_version.startswith("v2@"), 30, "the checkpoint published meanwhile")
    finally:
        service.shutdown()


def test_a_refused_checkpoint_in_the_prompt_folder_does_not_keep_the_line_down(tmp_path, mosquitto, redis_server):
    """A checkpoint refused while the line ran stays in the folder; a restart (reboot, upgrade, watchdog) must
    come up on the newest usable one, and `config check --model` must say what the line will run."""
    from typer.testing import CliRunner

    from agent.service import StartupError
    from cli.main import app
    from model.backbone import load_backbone

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    perturbed_checkpoint(prompts / "v1.safetensors", load_backbone("genclip-tiny", "random"), tiny_config(), seed=1)
    os.utime(prompts / "v1.safetensors", (time.time() - 60, time.time() - 60))
    (prompts / "v2.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    cfg = line_config(tmp_path, mosquitto.port, redis_server.url, "fallback", prompt_dir=str(prompts))
    service = InspectionService(cfg)
    try:
        service.start()
        assert service.worker.engine.prompt_version.startswith("v1@")
        assert "v2.safetensors" in service.last_reload_error
        assert service.info()["model"]["last_reload_error"] == service.last_reload_error
    finally:
        service.shutdown()

    path = tmp_path / "line.toml"
    path.write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    checked = CliRunner().invoke(app, ["config", "check", "--model", "--config", str(path)])
    assert checked.exit_code == 0, checked.output
    assert "warning: checkpoint refused, the line starts on an older one" in checked.output
    assert "prompts v1@" in checked.output

    (prompts / "v1.safetensors").unlink()  # nothing usable left: untrained prompts would score nonsense
    service = InspectionService(cfg)
    try:
        with pytest.raises(StartupError, match=r"no usable prompt checkpoint: .*v2\.safetensors"):
            service.start()
    finally:
        service.shutdown()


def test_broker_outage_rejects_delivered_or_counted(tmp_path, fresh_mosquitto, redis_server, running):
    line = "outage"
    watcher = Watcher(fresh_mosquitto.port, line)
    cfg = line_config(tmp_path, fresh_mosquitto.port, redis_server.url, line)
    cfg.mqtt.reconnect_min_s = 0.2
    cfg.mqtt.reconnect_max_s = 1.0
    service = running(cfg)
    wait_for(lambda: len(watcher.of("/reject")) >= 2, 60, "rejects before the outage")
    fresh_mosquitto.stop()
    wait_for(lambda: not service.mqtt.health()[0], 10, "the agent to notice")
    assert any(r.startswith("mqtt:") for r in service.health_reasons())
    outage_started = service.ledger.snapshot().published
    wait_for(lambda: service.ledger.snapshot().published >= outage_started + 8, 60, "frames during the outage")
    fresh_mosquitto.start()
    wait_for(lambda: service.mqtt.health()[0], 30, "the agent to reconnect by itself")
    service.shutdown()
    assert_accounted(service)
    time.sleep(1.0)
    watcher.close()
    stats = service.mqtt.stats.snapshot()
    ng = sum(v for k, v in service.metrics_results_by_verdict().items() if k != "OK")
    reject = stats["reject"]
    assert reject["sent"] + reject["expired"] + reject["dropped"] == ng
    assert reject["dropped"] == 0
    received = {(r["camera"], r["seq"]) for r in watcher.of("/reject")}
    assert len(received) == reject["sent"]  # what the agent sent during and after the outage arrived


def test_commands_answered_with_correlation(tmp_path, mosquitto, redis_server, running):
    line = "cmd"
    service = running(line_config(tmp_path, mosquitto.port, redis_server.url, line))
    responses: list[tuple[bytes | None, dict[str, Any]]] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="operator", protocol=mqtt.MQTTv5)

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        responses.append((correlation, json.loads(message.payload)))

    client.on_message = on_message
    client.connect("127.0.0.1", mosquitto.port)
    client.subscribe(f"genclip/{line}/cmd/response", qos=1)
    client.loop_start()
    time.sleep(0.3)
    sent = [
        ("threshold", {"class": "widget", "value": 0.7}),
        ("threshold", {"class": "nobody", "value": 0.7}),
        ("threshold", {"class": "widget", "value": "high"}),
        ("pause", {"camera": "cam-2"}),
        ("resume", {}),
        ("snapshot", {}),
        ("reload", {}),
        ("explode", {}),
        ("pause", "{not json"),
        ("pause", {"camera": "x" * 5000}),
        ("threshold", {"class": " widget ", "value": 0.66}),  # the same class, spelt loosely
        ("threshold", {"class": "widget", "value": 0.71}),  # ... and the last word wins
        ("pause", {"camera": "nobody"}),
    ]
    for i, (name, body) in enumerate(sent):
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = f"req-{i}".encode()
        payload = body if isinstance(body, str) else json.dumps(body)
        client.publish(f"genclip/{line}/cmd/{name}", payload, qos=1, properties=props)
    wait_for(lambda: len(responses) >= len(sent), 30, "a response to every command")
    client.loop_stop()
    client.disconnect()
    answers = {c.decode(): r for c, r in responses}
    ok = {k: v["ok"] for k, v in answers.items()}
    assert ok == {
        "req-0": True,
        "req-1": False,
        "req-2": False,
        "req-3": True,
        "req-4": True,
        "req-5": True,
        "req-6": False,  # no checkpoint configured: a clear error, nothing changes
        "req-7": False,
        "req-8": False,
        "req-9": False,
        "req-10": True,
        "req-11": True,
        "req-12": False,
    }
    assert service.worker.engine.classes.threshold("widget") == (0.71, "command")
    assert answers["req-12"]["error"] == "unknown camera 'nobody' on this line (cameras: cam-1, cam-2)"
    assert answers["req-3"]["cameras"] == ["cam-2"] and service.batcher.paused() == []
    assert "unknown command" in answers["req-7"]["error"]
    assert "no checkpoint" in answers["req-6"]["error"]
    service.shutdown()
    snap = assert_accounted(service)
    assert set(snap["dropped"]) <= {"paused"}


def test_genclip_run_serves_until_sigterm(tmp_path, mosquitto, redis_server):
    """The real command line: starts, answers /healthz, survives SIGHUP, stops on SIGTERM with exit 0 (also
    with a SIGHUP right behind it)."""
    import signal
    import subprocess
    import sys

    import tomli_w

    from tests.brokers import free_port

    line = "cli"
    port = free_port()
    cfg = line_config(tmp_path, mosquitto.port, redis_server.url, line, health_port=port)
    data = cfg.model_dump(mode="json", exclude_none=True, by_alias=True)
    data["mqtt"].pop("password", None)
    data["redis"].pop("password", None)
    config = tmp_path / "line.toml"
    config.write_text(tomli_w.dumps(data))
    watcher = Watcher(mosquitto.port, line)
    genclip = Path(sys.executable).with_name("genclip")
    log = (tmp_path / "agent.log").open("w")
    proc = subprocess.Popen([str(genclip), "run", "--config", str(config)], stderr=log)
    try:
        wait_for(lambda: len(watcher.of("/result")) >= 3, 90, "results from the running service")
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
        assert health.status == 200
        proc.send_signal(signal.SIGHUP)  # no checkpoint configured: refused and logged, the service goes on
        n = len(watcher.of("/result"))
        wait_for(lambda: "reload on SIGHUP refused" in (tmp_path / "agent.log").read_text(), 30, "the reload answer")
        wait_for(lambda: len(watcher.of("/result")) >= n + 3, 30, "results after SIGHUP")
        proc.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGHUP)  # right behind it: the stop must not be lost
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    stderr = (tmp_path / "agent.log").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    wait_for(lambda: watcher.of("/status") and watcher.of("/status")[-1] == "stopped", 10, "status stopped")
    watcher.close()
    assert "reload on SIGHUP refused" in stderr and '"stopped"' in stderr


def test_commands_during_warm_up_are_answered_engine_still_loading(tmp_path, mosquitto, redis_server, monkeypatch):
    """The engine exists before its classes are set up and warmed (minutes on a GPU): no command may act then."""
    from agent.control import parse_command
    from model import Engine

    warm, release = threading.Event(), threading.Event()
    real_warmup = Engine.warmup

    def slow_warmup(engine: Engine) -> float:
        warm.set()
        release.wait(30)
        return real_warmup(engine)

    monkeypatch.setattr(Engine, "warmup", slow_warmup)
    service = InspectionService(line_config(tmp_path, mosquitto.port, redis_server.url, "warming"))
    starting = threading.Thread(target=service.start)
    starting.start()
    try:
        assert warm.wait(60) and service.worker.engine is not None
        for name, body in (("threshold", b'{"class": "widget", "value": 0.7}'), ("pause", b"{}"), ("reload", b"{}")):
            with pytest.raises(ValueError, match="the engine is still loading"):
                service.handle_command(parse_command(name, body))
    finally:
        release.set()
        starting.join(60)
        service.shutdown()


def test_a_class_that_cannot_be_set_up_stops_only_its_cameras(tmp_path, mosquitto, redis_server, running):
    import cv2
    import numpy as np

    line = "classes"
    references = tmp_path / "refs"
    references.mkdir()
    for i in range(2):  # fewer than [model].min_reference_images (8)
        cv2.imwrite(str(references / f"{i}.png"), np.full((64, 64, 3), 128, np.uint8))
    cfg = line_config(tmp_path, mosquitto.port, redis_server.url, line)
    cfg.cameras[1].product_class = "gadget"
    cfg.references = {"widget": references}
    watcher = Watcher(mosquitto.port, line)
    service = running(cfg)
    assert "widget" in service.class_errors and "cam-1" not in service.sources
    reasons = service.health_reasons()
    assert any(r.startswith("class widget:") and "at least 8" in r for r in reasons), reasons
    wait_for(lambda: len(watcher.of("/result")) >= 4, 60, "results of the other camera")
    assert {r["camera"] for r in watcher.of("/result")} == {"cam-2"}
    info = service.info()
    assert "error" in info["classes"]["widget"] and info["cameras"][0]["state"] == "off"
    assert info["cameras"][0]["detail"] == ""
    service.shutdown()
    assert_accounted(service)
    watcher.close()
