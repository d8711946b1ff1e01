"""Part ids across restarts, one agent per line, class profiles on reload: real agents, Mosquitto and Redis.

- `genclip run` stopped with SIGTERM and killed with SIGKILL, started again each time: the camera's
  counter starts at 1 again, yet no part id and no map key repeats on the Redis stream or on MQTT.
- a second `genclip run` on the same config exits 1 within seconds, naming the running one's pid, and
  the line's status topic sees nothing of it.
- a profile written by `genclip calibrate` while the agent runs is taken by the `reload` command: the
  next results carry its threshold with threshold_source "calibration".
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
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
from typer.testing import CliRunner

from agent.config import InspectConfig
from agent.service import InspectionService
from cli.main import app
from model.profile import ClassProfile, profile_path
from synthetic.textures import write_good_images
from tests.brokers import MosquittoServer, RedisServer
from tests.faults_support import Subscriber, duplicates, fault_config, retained, synthetic_camera, wait_for

pytestmark = pytest.mark.fault
GENCLIP = Path(sys.executable).with_name("genclip")


def line_data(mosquitto: MosquittoServer, redis_server: RedisServer, line: str, **redis_keys: Any) -> dict[str, Any]:
    cfg = fault_config(mosquitto.port, redis_server.url, line, [synthetic_camera("cam-1", seed=3, fps=4)])
    data = cfg.model_dump(mode="json", exclude_none=True, by_alias=True)
    data["mqtt"].pop("password", None)
    data["redis"].pop("password", None)
    data["redis"].update(redis_keys)
    return data


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(tomli_w.dumps(data))
    return path


def start_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([str(GENCLIP), "run", "--config", str(config)], stdout=out, stderr=out)


def stop(proc: subprocess.Popen[bytes], how: signal.Signals) -> int:
    proc.send_signal(how)
    return proc.wait(60)


def test_restarts_with_sigterm_and_sigkill_repeat_no_part_id_and_no_map_key(
    tmp_path: Path, mosquitto: MosquittoServer, redis_server: RedisServer
) -> None:
    line = "restart-ids"
    config = write_config(tmp_path / "line.toml", line_data(mosquitto, redis_server, line, maps="all"))
    topics = [f"genclip/{line}/+/result", f"genclip/{line}/+/reject", f"genclip/{line}/+/decision"]
    plc = Subscriber(mosquitto.port, topics, "plc-restart-ids", persistent=False)
    wait_for(plc.connected.is_set, 10, "the subscriber")
    log = tmp_path / "agent.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for run, ending in enumerate((signal.SIGTERM, signal.SIGKILL, signal.SIGTERM)):
            before = len(plc.of("/result"))
            procs.append(start_agent(config, log))
            wait_for(lambda n=before: len(plc.of("/result")) >= n + 6, 120, f"results of run {run + 1}")
            code = stop(procs[-1], ending)
            assert code == (0 if ending == signal.SIGTERM else -signal.SIGKILL), log.read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    time.sleep(0.5)
    plc.close()

    entries = redis.Redis.from_url(redis_server.url).xrange(f"genclip:{line}:results")
    stream = [json.loads(fields[b"payload"]) for _, fields in entries]
    runs = list(dict.fromkeys(r["run_id"] for r in stream))
    assert len(runs) == 3, runs  # a new run id at every start
    for r in stream:
        assert r["part_id"] == f"cam-1-{r['run_id']}-{r['seq']}", r
    seqs = [r["seq"] for r in stream]
    assert duplicates([str(s) for s in seqs]), "the counter starts at 1 again at every start"
    assert duplicates([r["part_id"] for r in stream]) == {}
    keys = [r["map_key"] for r in stream if r["map_key"] is not None]
    assert len(keys) == len(stream) and duplicates(keys) == {}
    assert all(k == f"genclip:{line}:map:cam-1:{r['run_id']}:{r['seq']}" for k, r in zip(keys, stream, strict=True))
    for kind in ("/result", "/reject", "/decision"):
        messages = plc.of(kind)
        assert messages and duplicates([m["part_id"] for m in messages]) == {}, kind
        assert all(m["run_id"] in runs and m["part_id"].endswith(f"-{m['seq']}") for m in messages), kind
    print(f"restarts: {len(stream)} results over runs {runs}, no part id or map key repeated")


def test_a_second_agent_for_the_line_refuses_to_start_and_the_status_never_flaps(
    tmp_path: Path, mosquitto: MosquittoServer, redis_server: RedisServer
) -> None:
    line = "double-start"
    config = write_config(tmp_path / "line.toml", line_data(mosquitto, redis_server, line))
    status_topic = f"genclip/{line}/status"
    watcher = Subscriber(mosquitto.port, [status_topic, f"genclip/{line}/+/result"], "watch-double", persistent=False)
    wait_for(watcher.connected.is_set, 10, "the watcher")
    first = start_agent(config, tmp_path / "first.log")
    try:
        wait_for(
            lambda: watcher.of("/status")[-1:] == ["online"] and watcher.of("/result"),
            120,
            "the first agent",
        )
        statuses = list(watcher.of("/status"))
        began = time.monotonic()
        second = subprocess.run(
            [str(GENCLIP), "run", "--config", str(config)], capture_output=True, timeout=60, check=False
        )
        took = time.monotonic() - began
        output = (second.stdout + second.stderr).decode()
        assert second.returncode == 1, output
        assert f"pid {first.pid}" in output and "agent.lock" in output, output
        assert took < 30, took
        results = len(watcher.of("/result"))
        time.sleep(1.0)  # a Last Will or an `online` from the second would have arrived by now
        assert watcher.of("/status") == statuses == ["starting", "online"]
        assert retained(mosquitto.port, status_topic) == "online"
        wait_for(lambda: len(watcher.of("/result")) > results, 30, "the first agent still inspecting")
        assert first.poll() is None
        assert stop(first, signal.SIGTERM) == 0
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
    wait_for(lambda: watcher.of("/status")[-1:] == ["stopped"], 10, "stopped")
    watcher.close()
    print(f"double start: the second agent refused in {took:.1f} s; status {watcher.of('/status')}")


@pytest.fixture
def service_box() -> Iterator[list[InspectionService]]:
    services: list[InspectionService] = []
    yield services
    for service in services:
        if not service._stop.is_set():
            service.shutdown()


def command(port: int, line: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
    """Send one command with correlation data; its answer."""
    answers: list[dict[str, Any]] = []
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"operator-{name}", protocol=mqtt.MQTTv5)
    client.on_message = lambda _c, _u, message: answers.append(json.loads(message.payload))
    client.on_connect = lambda c, *_: c.subscribe(f"genclip/{line}/cmd/response", qos=1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        time.sleep(0.3)
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = b"req-1"
        client.publish(f"genclip/{line}/cmd/{name}", json.dumps(body), qos=1, properties=props)
        wait_for(lambda: answers, 120, f"the answer to {name}")
    finally:
        client.loop_stop()
        client.disconnect()
    return answers[0]


def test_reload_takes_a_profile_calibrated_while_the_agent_runs(
    tmp_path: Path, mosquitto: MosquittoServer, redis_server: RedisServer, service_box: list[InspectionService]
) -> None:
    line = "profiles"
    profiles = tmp_path / "profiles"
    data = line_data(mosquitto, redis_server, line)
    data["thresholds"] = {}  # a configured threshold would win over any calibration
    data["model"]["profile_dir"] = str(profiles)
    config = write_config(tmp_path / "line.toml", data)
    service = InspectionService(InspectConfig(**data))
    service_box.append(service)
    watcher = Subscriber(mosquitto.port, [f"genclip/{line}/+/result", f"genclip/{line}/info"], "watch-profiles")
    service.start()
    wait_for(lambda: len(watcher.of("/result")) >= 2, 60, "results before the calibration")
    assert {r["threshold_source"] for r in watcher.of("/result")} == {"default"}
    default = watcher.of("/result")[-1]["threshold"]

    good = tmp_path / "good"
    write_good_images("tiles", good, 20, seed=5, size=96)
    args = ["calibrate", "--class", "widget", "--good", str(good), "--profiles", str(profiles), "-c", str(config)]
    calibrated = CliRunner().invoke(app, args)
    assert calibrated.exit_code == 0, calibrated.output
    profile = ClassProfile.load(profile_path(profiles, "widget"))
    assert profile.calibration is not None
    threshold = profile.calibration.threshold
    assert threshold != pytest.approx(default, abs=1e-6)
    assert service.worker.engine is not None
    assert service.worker.engine.classes.threshold("widget").source == "default"  # not taken before the reload

    answer = command(mosquitto.port, line, "reload", {})
    assert answer["ok"] is True, answer
    assert answer["profiles"] == [
        {
            "product_class": "widget",
            "threshold": {"before": default, "after": threshold},
            "threshold_source": {"before": "default", "after": "calibration"},
        }
    ]
    seen = len(watcher.of("/result"))
    wait_for(lambda: len(watcher.of("/result")) >= seen + 3, 60, "results after the reload")
    latest = watcher.of("/result")[-1]
    assert latest["threshold"] == pytest.approx(threshold, abs=1e-6)
    assert latest["threshold_source"] == "calibration"
    assert watcher.of("/info")[-1]["profile_reload"]["changes"] == answer["profiles"]
    assert command(mosquitto.port, line, "reload", {})["profiles"] == []  # nothing new on disk: nothing changes
    service.shutdown()
    watcher.close()
