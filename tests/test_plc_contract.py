"""The PLC contract (docs/integration.md) held by a real agent against the PLC stand-in (synthetic/plc.py).

- A synthetic camera triggered over MQTT at 20 parts/s: every trigger gets exactly one decision with its
  part id and trigger counter, in trigger order, before its deadline; withheld frames are missed triggers,
  answered ERROR and counted; the stand-in lets no defective, uninspected or silent part through.
- The same line while the MQTT broker is killed and started again: no reject or decision arrives after its
  deadline; what could not be answered in time is rejected by silence.
- `genclip run` stopped with SIGTERM and killed with SIGKILL mid-run, started again each time: no part id
  repeats; the parts in flight at SIGTERM are answered before `stopped`; after SIGKILL the stand-in rejects
  them by silence and the next start lists them in the retained `lost` message.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from agent.service import InspectionService
from synthetic.plc import Plc, PlcConfig, PlcReport, Rule
from tests.brokers import MosquittoServer, RedisServer
from tests.faults_support import (
    Subscriber,
    assert_identity,
    come_back,
    crash,
    duplicates,
    fault_config,
    metric,
    retained,
    synthetic_camera,
    wait_for,
)

pytestmark = pytest.mark.fault
GENCLIP = Path(sys.executable).with_name("genclip")
RATE = 20.0  # parts per second
GONE = ("stopped", "offline")


def triggered(camera: str, seed: int, truth: Path, **synthetic: Any) -> dict[str, Any]:
    """A triggered synthetic camera, 96x72 (cheap to render and score), its truth in a JSONL file."""
    keys = {"width": 96, "height": 72, "ground_truth": str(truth), **synthetic}
    return synthetic_camera(camera, seed, acquisition="triggered", queue_size=64, synthetic=keys)


def read_truth(path: Path) -> dict[str, bool]:
    """Part id -> defective, from a synthetic camera's truth file."""
    return {r["part_id"]: r["defective"] for r in map(json.loads, path.read_text().splitlines())}


def plc_for(port: int, line: str, window_ms: int) -> Plc:
    """The stand-in with its reject station where the agent's deadline is: `decision_window_ms` after the trigger."""
    plc = Plc(PlcConfig(port=port, line=line, reject_delay_s=window_ms / 1000.0, client_id=f"plc-{line}"))
    plc.start()
    return plc


def assert_nothing_unsafe_passed(report: PlcReport, truth: dict[str, bool]) -> None:
    """The PLC rule lets no part through that was defective and flagged, uninspected, or silent."""
    assert report.uninspected_passed == 0, report.summary_lines()
    passed = [r for r in report.records if r.rule == Rule.OK]
    assert all(r.verdict == "OK" for r in passed)
    assert report.confusion is not None and report.confusion.without_truth == 0, report.summary_lines()


def test_twenty_parts_a_second_each_trigger_one_decision_in_order_before_its_deadline(
    tmp_path: Path, mosquitto: MosquittoServer, redis_server: RedisServer
) -> None:
    line, window_ms, parts = "plc-20", 3000, 240
    truth = tmp_path / "cam-1-truth.jsonl"
    cameras = [triggered("cam-1", 1, truth, withhold_every=17)]
    cfg = fault_config(mosquitto.port, redis_server.url, line, cameras, mqtt={"decision_window_ms": window_ms})
    watcher = Subscriber(mosquitto.port, [f"genclip/{line}/cam-1/decision"], f"watch-{line}", persistent=False)
    service = InspectionService(cfg)
    plc = plc_for(mosquitto.port, line, window_ms)
    try:
        service.start()
        conveyor = plc.conveyor("cam-1", RATE, parts, id_prefix="P-")
        conveyor.run()
        assert plc.wait_settled(window_ms / 1000.0 + 10)
    finally:
        plc.stop()
        service.shutdown()
    time.sleep(0.3)
    watcher.close()
    report = plc.report(read_truth(truth))
    print("\n" + "\n".join(report.summary_lines()))
    decisions = watcher.of("/decision")
    assert [(d["part_id"], d["trigger"]) for d in decisions] == [(f"P-{n:06d}", n) for n in range(1, parts + 1)]
    withheld = {f"P-{n:06d}" for n in range(17, parts + 1, 17)}
    errors = {d["part_id"] for d in decisions if d["verdict"] == "ERROR"}
    assert errors == withheld, sorted(errors ^ withheld)  # a missed trigger, and nothing else failed
    assert report.parts == parts and report.rejected_silence == 0 and report.late == 0
    assert report.rejected_error == len(withheld) and report.duplicates == 0 and report.unknown == 0
    assert_nothing_unsafe_passed(report, read_truth(truth))
    assert metric(service, "genclip_triggers_total", camera="cam-1") == parts
    assert metric(service, "genclip_triggers_missed_total", camera="cam-1") == len(withheld)
    assert decisions[-1]["trigger"] == parts
    assert_identity(service)


def test_flooded_paused_and_stale_triggered_parts_every_trigger_decided_none_unsafe_passed(
    tmp_path: Path, mosquitto: MosquittoServer, redis_server: RedisServer
) -> None:
    """A slow engine (0.3 s a batch), a queue of 2, frames stale after 400 ms, the camera paused for a while:
    every accepted trigger still gets one decision (inspected, or ERROR with the reason) and the PLC rule
    lets no uninspected or silent part through."""
    line, window_ms, parts = "plc-flood", 4000, 120
    truth = tmp_path / "cam-1-truth.jsonl"
    camera = {**triggered("cam-1", 5, truth), "queue_size": 2, "max_age_ms": 400}
    cfg = fault_config(mosquitto.port, redis_server.url, line, [camera], mqtt={"decision_window_ms": window_ms})
    watcher = Subscriber(mosquitto.port, [f"genclip/{line}/cam-1/decision"], f"watch-{line}", persistent=False)
    service = InspectionService(cfg)
    plc = plc_for(mosquitto.port, line, window_ms)
    try:
        service.start()
        assert service.worker.engine is not None
        service.worker.engine.fault_hook = lambda n: time.sleep(0.3)
        conveyor = plc.conveyor("cam-1", RATE, parts, id_prefix="F-").start()
        time.sleep(2.0)
        service.batcher.set_paused("cam-1", True)
        time.sleep(1.0)
        service.batcher.set_paused("cam-1", False)
        conveyor.join(30)
        assert plc.wait_settled(window_ms / 1000.0 + 15)
    finally:
        plc.stop()
        service.shutdown()
    time.sleep(0.3)
    watcher.close()
    report = plc.report(read_truth(truth))
    print("\n" + "\n".join(report.summary_lines()))
    decisions = watcher.of("/decision")
    assert Counter(d["part_id"] for d in decisions) == Counter(f"F-{n:06d}" for n in range(1, parts + 1))
    reasons = Counter(d["error"].removeprefix("not inspected: ") for d in decisions if d["verdict"] == "ERROR")
    print(f"ERROR answers by reason: {dict(reasons)}")
    assert {"queue_full", "paused"} <= set(reasons), reasons
    assert report.parts == parts and report.late == 0 and report.rejected_silence == 0
    assert report.rejected_error == sum(reasons.values())
    assert_nothing_unsafe_passed(report, read_truth(truth))
    assert_identity(service)


def test_broker_killed_under_a_triggered_line_no_decision_arrives_after_its_deadline(
    tmp_path: Path, fresh_mosquitto: MosquittoServer, redis_server: RedisServer
) -> None:
    broker, line, window_ms = fresh_mosquitto, "plc-kill", 1500
    truth = tmp_path / "cam-1-truth.jsonl"
    cfg = fault_config(
        broker.port, redis_server.url, line, [triggered("cam-1", 2, truth)], mqtt={"decision_window_ms": window_ms}
    )
    watcher = Subscriber(broker.port, [f"genclip/{line}/+/+"], f"watch-{line}", persistent=False)
    service = InspectionService(cfg)
    plc = plc_for(broker.port, line, window_ms)
    try:
        service.start()
        conveyor = plc.conveyor("cam-1", 10.0, 150, id_prefix="K-").start()
        for _ in range(4):
            time.sleep(2.0)
            crash(broker)
            time.sleep(0.4)
            come_back(broker)
            wait_for(lambda: service.mqtt.health()[0], 15, "the agent to reconnect")
        conveyor.join(60)
        assert plc.wait_settled(window_ms / 1000.0 + 15)
    finally:
        plc.stop()
        service.shutdown()
    watcher.close()
    report = plc.report(read_truth(truth))
    print("\n" + "\n".join(report.summary_lines()))
    wall = time.time() - time.monotonic()  # arrival times are monotonic, deadlines wall clock
    signals = [(t, p, arrived) for t, p, arrived in watcher.messages if t.endswith(("/reject", "/decision"))]
    assert signals
    for topic, payload, arrived in signals:
        assert arrived + wall <= parse_deadline(payload["deadline"]) + 0.002, (topic, payload, arrived + wall)
    assert report.late == 0, report.summary_lines()
    assert report.rejected_silence > 0  # triggers lost with the broker (it never handed them over): silence
    assert_nothing_unsafe_passed(report, read_truth(truth))
    assert_identity(service)


def parse_deadline(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- a real process, stopped and killed ---------------------------------------------------------------------
def run_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([str(GENCLIP), "run", "--config", str(config)], stdout=out, stderr=out)


def test_sigterm_answers_parts_in_flight_and_sigkill_leaves_them_to_silence_and_lost(
    tmp_path: Path, mosquitto: MosquittoServer, redis_server: RedisServer
) -> None:
    line, window_ms = "plc-restart", 4000
    truth = tmp_path / "cam-1-truth.jsonl"
    cameras = [triggered("cam-1", 3, truth), synthetic_camera("cam-2", 4, fps=3)]
    cfg = fault_config(mosquitto.port, redis_server.url, line, cameras, mqtt={"decision_window_ms": window_ms})
    data = cfg.model_dump(mode="json", exclude_none=True, by_alias=True)
    data["agent"]["state_dir"] = str(tmp_path / "state")
    config = tmp_path / "line.toml"
    config.write_text(tomli_w.dumps(data))
    log = tmp_path / "agent.log"
    watcher = Subscriber(mosquitto.port, [f"genclip/{line}/+/+"], f"watch-{line}", persistent=False)
    plc = plc_for(mosquitto.port, line, window_ms)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ids = iter(f"R-{n:06d}" for n in range(1, 10_000))
        for ending in (signal.SIGTERM, signal.SIGKILL, signal.SIGTERM):
            procs.append(run_agent(config, log))
            wait_for(lambda: retained(mosquitto.port, f"genclip/{line}/status") == "online", 120, "online")
            for _ in range(30):  # 3 s at 10 parts/s, then a burst of 12 the agent is still busy with at the end
                plc.trigger("cam-1", next(ids))
                time.sleep(0.1)
            for _ in range(12):
                plc.trigger("cam-1", next(ids))
            time.sleep(0.15)  # the burst has reached the agent (accepted, journaled)
            procs[-1].send_signal(ending)
            assert procs[-1].wait(60) == (0 if ending == signal.SIGTERM else -signal.SIGKILL), log.read_text()[-3000:]
            # `stopped`, or the Last Will: the next start must not mistake this run's `online` for its own
            wait_for(lambda: retained(mosquitto.port, f"genclip/{line}/status") in GONE, 30, "the agent gone")
        lost = json.loads(retained(mosquitto.port, f"genclip/{line}/lost") or "{}")  # the third start's report
        assert plc.wait_settled(window_ms / 1000.0 + 10)
    finally:
        plc.stop()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    time.sleep(0.3)
    watcher.close()
    report = plc.report()
    print("\n" + "\n".join(report.summary_lines()))
    by_part = {r.part_id: r for r in report.records}
    first, killed, third = [[f"R-{n:06d}" for n in range(42 * k + 1, 42 * (k + 1) + 1)] for k in range(3)]
    # SIGTERM: every part the agent had accepted is answered before `stopped` (none is left to silence).
    for run in (first, third):
        assert all(by_part[p].rule != Rule.SILENCE for p in run), [by_part[p] for p in run]
    # SIGKILL: the burst in flight is rejected by silence, and the next start names exactly those parts.
    silent = {p for p in killed if by_part[p].rule == Rule.SILENCE}
    lost_ids = {p["part_id"] for p in lost.get("parts", []) if p["camera"] == "cam-1"}
    assert silent and lost_ids, (silent, lost)
    assert lost_ids <= silent, sorted(lost_ids - silent)
    print(f"SIGKILL: {len(silent)} parts rejected by silence, {len(lost_ids)} listed in `lost`")
    for kind in ("/decision", "/result"):
        assert duplicates([m["part_id"] for m in watcher.of(kind)]) == {}, kind
    made = [m["part_id"] for m in watcher.of("/decision") if m["camera"] == "cam-2"]
    assert len({m.split("-")[2] for m in made}) == 3  # cam-2's own ids carry each start's run id
    assert report.uninspected_passed == 0 and Counter(r.rule for r in report.records)[Rule.SILENCE] == len(silent)
