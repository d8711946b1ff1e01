"""Fail-safe decisions (agent/failsafe.py): every part the agent accepted gets exactly one decision.

Unit tests of the answer rules, then the agent against real Mosquitto and Redis with queues forced
full, a camera paused, frames made stale, a partial publish, and a backlog at shutdown.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from typing import Any

import numpy as np
import redis

from agent.failsafe import AnswerSettings, Dropped, FailSafe
from agent.frames import Frame
from agent.journal import LostPart, PartJournal
from agent.ledger import FrameLedger
from agent.metrics import AgentMetrics
from agent.results import Inspection, build_uninspected
from agent.service import InspectionService
from tests.faults_support import (
    Subscriber,
    assert_identity,
    fault_config,
    metric,
    retained,
    synthetic_camera,
    wait_for,
)


class Recorder:
    """A sink that keeps what it is handed (FailSafe only calls publish_inspection)."""

    def __init__(self) -> None:
        self.inspections: list[Inspection] = []

    def publish_inspection(self, inspection: Inspection) -> None:
        self.inspections.append(inspection)


def frame(seq: int = 7, redelivered_on: frozenset[str] = frozenset()) -> Frame:
    return Frame("cam-1", seq, f"cam-1-{seq}", "widget", np.zeros((4, 4), np.uint8), redelivered_on=redelivered_on)


def failsafe(reject: bool = True) -> tuple[FailSafe, Recorder]:
    sink = Recorder()
    settings = AnswerSettings("l1", 2.0, reject)
    return FailSafe(settings, (sink,), AgentMetrics(), lambda: {"backbone": "b"}), sink  # type: ignore[arg-type]


def test_uninspected_payloads_carry_the_part_and_the_reason():
    f = frame()
    insp = build_uninspected(f, "queue_full", line="l1", window_s=2.0, model={"backbone": "b"})
    assert insp.verdict == "ERROR" and insp.rejects and insp.score is None
    assert insp.result["verdict"] == "ERROR" and insp.result["error"] == "not inspected: queue_full"
    assert insp.result["part_id"] == "cam-1-7" and insp.result["seq"] == 7 and insp.result["map_key"] is None
    decision = insp.decision_payload()
    assert decision["reject"] is True and decision["error"] == "not inspected: queue_full"
    assert decision["part_id"] == "cam-1-7" and decision["camera"] == "cam-1" and decision["seq"] == 7
    assert decision["deadline"] > decision["captured_at"]
    quiet = build_uninspected(f, "stale", line="l1", window_s=2.0, model={}, signal_reject=False)
    assert not quiet.rejects and quiet.decision_payload()["reject"] is False and quiet.verdict == "ERROR"


def test_uninspected_payloads_carry_the_run_id_like_inspected_ones():
    f = dataclasses.replace(frame(), run_id="3m7zp809fn")
    insp = build_uninspected(f, "paused", line="l1", window_s=2.0, model={})
    assert insp.result["run_id"] == "3m7zp809fn"
    assert insp.decision_payload()["run_id"] == "3m7zp809fn" and insp.reject_payload()["run_id"] == "3m7zp809fn"


def test_a_dropped_frame_is_answered_once_through_the_ledger():
    safe, sink = failsafe()
    ledger = FrameLedger(on_dropped_frame=safe.submit)
    dropped, expired, retried = frame(1), frame(2), frame(3, frozenset({"queue_full"}))
    for _ in range(3):
        ledger.accepted("cam-1")
    ledger.dropped(dropped, "queue_full")
    ledger.expired(expired)
    ledger.dropped(retried, "queue_full")  # its source offers the part again: that try answers it
    safe.stop(time.monotonic() + 1)  # never started: answers on this thread
    assert [(i.part_id, i.error) for i in sink.inspections] == [
        ("cam-1-1", "not inspected: queue_full"),
        ("cam-1-2", "not inspected: stale"),
    ]
    assert safe.answered == 2
    snap = ledger.snapshot()
    assert snap.dropped == {"queue_full": 2} and snap.expired == 1 and snap.in_flight == 0
    assert safe.answer(Dropped(dropped, "shutdown")) is None  # decided already: never a second decision
    assert len(sink.inspections) == 2


def test_a_decided_frame_is_not_answered_and_reject_switch_off_still_decides():
    safe, sink = failsafe(reject=False)
    decided = frame(1)
    assert decided.decided.claim()  # its result went to the publishers (then failed half way)
    assert safe.answer(Dropped(decided, "invalid")) is None
    answered = safe.answer(Dropped(frame(2), "paused"))
    assert answered is not None and not answered.rejects and answered.decision_payload()["reject"] is False
    assert len(sink.inspections) == 1


# --- the agent with real brokers ------------------------------------------------------------------------------
def spy_accepted(service: InspectionService) -> list[str]:
    """The part ids the batcher is handed (each accepted by the ledger), in order."""
    seen: list[str] = []
    put = service.batcher.put

    def spying(camera: str, f: Frame) -> None:
        seen.append(f.part_id)
        put(camera, f)

    service.batcher.put = spying  # type: ignore[method-assign]
    return seen


def stream_results(url: str, line: str) -> list[dict[str, Any]]:
    client = redis.Redis.from_url(url)
    try:
        return [json.loads(fields[b"payload"]) for _, fields in client.xrange(f"genclip:{line}:results")]
    finally:
        client.close()


def uninspected(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [p for p in payloads if str(p.get("error", "")).startswith("not inspected: ")]


def check_one_decision_each(watcher: Subscriber, accepted: list[str], reject_uninspected: bool) -> Counter[str]:
    """Every accepted part id has exactly one decision; rejects follow the verdicts and the switch."""
    decisions = watcher.of("/decision")
    assert len(accepted) == len(set(accepted))
    assert Counter(d["part_id"] for d in decisions) == Counter(accepted)
    rejects = Counter(r["part_id"] for r in watcher.of("/reject"))
    assert max(rejects.values(), default=1) == 1
    for d in decisions:
        assert d["reject"] is (d["verdict"] == "NG" or (d["verdict"] == "ERROR" and reject_uninspected)), d
        assert (d["part_id"] in rejects) is d["reject"], d
    return Counter(d["error"].removeprefix("not inspected: ") for d in uninspected(decisions))


def run_flooded_line(tmp_path, mosquitto, redis_server, line: str, reject_uninspected: bool) -> None:
    """Queues forced full (queue_size 1, 12 fps, a slow engine), frames made stale (a longer queue, max_age_ms
    100), one camera paused for a while, then a stop: every accepted part is answered exactly once."""
    cameras = [synthetic_camera(f"cam-{i}", seed=i, fps=12, queue_size=1, max_age_ms=250) for i in (1, 2)]
    cameras.append(synthetic_camera("cam-3", seed=3, fps=12, queue_size=8, max_age_ms=100))  # waits: stale
    cfg = fault_config(
        mosquitto.port,
        redis_server.url,
        line,
        cameras,
        mqtt={"decision_window_ms": 120_000, "reject_uninspected": reject_uninspected},
        agent={"shutdown_timeout_s": 5},
    )
    watcher = Subscriber(mosquitto.port, [f"genclip/{line}/#"], f"plc-{line}")
    service = InspectionService(cfg)
    accepted = spy_accepted(service)
    service.start()
    try:
        service.worker.engine.fault_hook = lambda n: time.sleep(0.4)
        time.sleep(2.0)
        service.batcher.set_paused("cam-2", True)
        time.sleep(1.0)
        service.batcher.set_paused("cam-2", False)
        time.sleep(1.0)
    finally:
        service.shutdown()
    counts = assert_identity(service)
    drops = {**counts["dropped"], "stale": counts["expired"]}
    assert {"queue_full", "paused", "stale"} <= {r for r, n in drops.items() if n}, counts
    wait_for(lambda: len(watcher.of("/decision")) >= len(accepted), 20, "a decision for every accepted part")
    time.sleep(0.3)
    watcher.close()
    by_reason = check_one_decision_each(watcher, accepted, reject_uninspected)
    assert by_reason == Counter({r: n for r, n in drops.items() if n}), (by_reason, counts)
    answered = sum(
        metric(service, "genclip_frames_answered_total", camera=c, reason=r)
        for r in drops
        for c in ("cam-1", "cam-2", "cam-3")
    )
    assert answered == sum(drops.values()) == service.failsafe.answered
    assert counts["accepted"] == counts["published"] + answered  # every accepted part: inspected or answered
    stream = stream_results(redis_server.url, line)
    assert Counter(p["part_id"] for p in stream) == Counter(accepted)
    assert len(uninspected(stream)) == answered and all(p["verdict"] == "ERROR" for p in uninspected(stream))


def test_flooded_paused_and_stale_parts_all_answered_with_rejects(tmp_path, mosquitto, redis_server):
    run_flooded_line(tmp_path, mosquitto, redis_server, "fs-on", reject_uninspected=True)


def test_reject_uninspected_off_decides_error_without_rejects(tmp_path, mosquitto, redis_server):
    run_flooded_line(tmp_path, mosquitto, redis_server, "fs-off", reject_uninspected=False)


def test_shutdown_answers_the_backlog_before_stopped(tmp_path, mosquitto, redis_server):
    """A 'block' camera with a backlog and a slow engine; the stop's time runs out: every queued part gets its
    ERROR decision (shutdown) before `stopped` is published."""
    line = "fs-stop"
    cameras = [synthetic_camera("cam-1", seed=1, fps=20, queue_policy="block", queue_size=16, max_age_ms=0)]
    cfg = fault_config(
        mosquitto.port,
        redis_server.url,
        line,
        cameras,
        mqtt={"decision_window_ms": 120_000},
        agent={"shutdown_timeout_s": 1},
    )
    watcher = Subscriber(mosquitto.port, [f"genclip/{line}/#"], f"plc-{line}")
    service = InspectionService(cfg)
    accepted = spy_accepted(service)
    service.start()
    service.worker.engine.fault_hook = lambda n: time.sleep(1.5)
    wait_for(lambda: service.batcher.depth() >= 12, 30, "a backlog of 12 frames")
    service.shutdown()
    counts = assert_identity(service)
    assert counts["dropped"].get("shutdown", 0) >= 3, counts  # 1 s to drain: a batch or two of 4, not 12
    wait_for(lambda: "stopped" in watcher.of("/status"), 10, "stopped")
    time.sleep(0.3)
    watcher.close()
    by_reason = check_one_decision_each(watcher, accepted, reject_uninspected=True)
    assert by_reason == Counter({"shutdown": counts["dropped"]["shutdown"]})
    with watcher.lock:
        topics = [(t, p) for t, p, _ in watcher.messages]
    stopped_at = max(i for i, (t, p) in enumerate(topics) if t.endswith("/status") and p == "stopped")
    last_signal = max(i for i, (t, _) in enumerate(topics) if t.endswith(("/decision", "/reject")))
    assert last_signal < stopped_at


def test_a_part_dropped_after_a_partial_publish_gets_no_second_decision(tmp_path, mosquitto, redis_server):
    """Redis fails on every third inspected result after MQTT took it: the frame is dropped as invalid, and the
    decision MQTT already has stays the only one."""
    line = "fs-partial"
    cameras = [synthetic_camera("cam-1", seed=1, fps=6, queue_policy="block", max_age_ms=0)]
    cfg = fault_config(mosquitto.port, redis_server.url, line, cameras, mqtt={"decision_window_ms": 120_000})
    watcher = Subscriber(mosquitto.port, [f"genclip/{line}/#"], f"plc-{line}")
    service = InspectionService(cfg)
    accepted = spy_accepted(service)
    publish = service.redis.publish_inspection
    calls = Counter[str]()

    def flaky(inspection: Inspection) -> None:
        if inspection.result.get("inspected") is not False:
            calls["n"] += 1
            if calls["n"] % 3 == 0:
                raise ConnectionError("injected: Redis refused the result")
        publish(inspection)

    service.redis.publish_inspection = flaky  # type: ignore[method-assign]
    service.start()
    try:
        wait_for(lambda: service.ledger.snapshot().dropped.get("invalid", 0) >= 3, 60, "3 invalid drops")
    finally:
        service.shutdown()
    counts = assert_identity(service)
    wait_for(lambda: len(watcher.of("/decision")) >= len(accepted), 20, "a decision for every accepted part")
    time.sleep(0.3)
    watcher.close()
    check_one_decision_each(watcher, accepted, reject_uninspected=True)
    assert metric(service, "genclip_frames_answered_total", reason="invalid") == 0
    assert counts["dropped"]["invalid"] >= 3


# --- the part journal and the `lost` message --------------------------------------------------------------------
def test_journal_keeps_open_parts_across_a_kill(tmp_path):
    path = tmp_path / "l1.parts"
    journal = PartJournal(path)
    assert journal.recover() == []
    a, b, c, folder_file = frame(1), frame(2), frame(3), frame(4, frozenset({"stale"}))
    for f in (a, b, c, folder_file):
        journal.opened(f)
    journal.closed(b)
    journal.closed(folder_file)  # never journaled: its file is its own journal
    with path.open("a") as torn:
        torn.write("+\tcam-1")  # a record cut short by the kill
    # no close(): what a SIGKILL leaves behind
    assert PartJournal(path).recover() == [LostPart("cam-1", "cam-1-1"), LostPart("cam-1", "cam-1-3")]
    assert PartJournal(path).recover() == []  # reported once; the next run starts afresh


def test_a_start_after_a_kill_reports_lost_parts_retained(tmp_path, mosquitto, redis_server, monkeypatch):
    """The journal of a running line with a backlog (what a SIGKILL would leave) is reported by the next start in
    a retained `lost` message: parts that had no decision then; a clean stop leaves nothing to report."""
    line = "fs-lost"
    cameras = [synthetic_camera("cam-1", seed=1, fps=20, queue_policy="block", queue_size=12, max_age_ms=0)]
    cfg = fault_config(mosquitto.port, redis_server.url, line, cameras, mqtt={"decision_window_ms": 120_000})
    cfg.agent.state_dir = tmp_path / "state"
    watcher = Subscriber(mosquitto.port, [f"genclip/{line}/#"], f"plc-{line}")
    first = InspectionService(cfg)
    first.start()
    try:
        first.worker.engine.fault_hook = lambda n: time.sleep(0.5)
        wait_for(lambda: first.batcher.depth() >= 6, 30, "a backlog of 6 frames")
        decided_before = {d["part_id"] for d in watcher.of("/decision")}
        killed = (tmp_path / "state" / "parts.journal").read_bytes()  # what a SIGKILL now would leave
    finally:
        first.shutdown()
    assert PartJournal(tmp_path / "state" / "parts.journal").recover() == []  # a clean stop answered every part
    (tmp_path / "state" / "parts.journal").write_bytes(killed)
    second = InspectionService(cfg)
    second.start()
    try:
        lost = json.loads(wait_for_retained(mosquitto.port, f"genclip/{line}/lost"))
    finally:
        second.shutdown()
        watcher.close()
    ids = [p["part_id"] for p in lost["parts"]]
    assert lost["line"] == line and len(ids) >= 6 and len(set(ids)) == len(ids)
    assert not set(ids) & decided_before
    assert retained(mosquitto.port, f"genclip/{line}/lost") is not None  # still there for a PLC that connects later


def wait_for_retained(port: int, topic: str) -> str:
    found: list[str] = []
    wait_for(lambda: found.append(retained(port, topic, 0.5) or "") or found[-1], 20, f"retained {topic}")
    return found[-1]


def test_a_folder_file_dropped_and_retried_gets_one_decision(tmp_path, mosquitto, redis_server):
    """Folder files go stale behind a slow engine (max_age_ms 300): each stays in the folder and is tried again,
    so it gets no ERROR answer for the drop, and exactly one decision (its later inspection)."""
    import cv2

    inbox, line = tmp_path / "inbox", "fs-folder"
    inbox.mkdir()
    names = [f"part-{i}" for i in range(1, 7)]
    rng = np.random.default_rng(1)
    for name in names:
        (inbox / f"{name}.png").write_bytes(cv2.imencode(".png", rng.integers(0, 256, (32, 32, 3), np.uint8))[1])
    camera = {
        "id": "grabber",
        "source": str(inbox),
        "product_class": "widget",
        "settle_ms": 20,
        "queue_size": 2,
        "max_age_ms": 300,
        "reconnect_min_s": 0.2,
        "reconnect_max_s": 0.5,
    }
    cfg = fault_config(mosquitto.port, redis_server.url, line, [camera], mqtt={"decision_window_ms": 120_000})
    cfg.engine.batch_size = 1
    watcher = Subscriber(mosquitto.port, [f"genclip/{line}/#"], f"plc-{line}")
    service = InspectionService(cfg)
    service.start()
    try:
        service.worker.engine.fault_hook = lambda n: time.sleep(0.6)  # longer than a queued file may wait
        wait_for(lambda: service.ledger.snapshot().expired >= 2, 60, "two stale folder frames")
        service.worker.engine.fault_hook = None
        wait_for(lambda: sorted(p.stem for p in (inbox / "done").glob("*.png")) == names, 60, "every file done")
    finally:
        service.shutdown()
    counts = assert_identity(service)
    assert counts["expired"] >= 2
    wait_for(lambda: len(watcher.of("/decision")) >= len(names), 20, "a decision per file")
    time.sleep(0.3)
    watcher.close()
    decisions = watcher.of("/decision")
    assert Counter(d["part_id"] for d in decisions) == Counter(names)
    assert uninspected(decisions) == [] and service.failsafe.answered == 0
