"""The PLC stand-in (synthetic/plc.py) against a real Mosquitto, driven by a scripted agent.

The responder below plays the agent's side of the wire contract only: it answers each trigger with a
decision (and a reject when the part is not OK) of the documented shape, or misbehaves on purpose
(silence, late, duplicate, unknown part id). Timing margins are wide: answers that must be in time
have a full second; late answers come well after the station by construction.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from synthetic.plc import (
    Conveyor,
    MessageCounts,
    Outcome,
    PartRecord,
    PartTracker,
    Plc,
    PlcConfig,
    PlcReport,
    Rule,
)
from tests.brokers import MosquittoServer

pytestmark = pytest.mark.timeout(120)

PREFIX = "genclip"
DELAY_S = 1.0  # the reject station: in-time answers have this long
LATE_S = DELAY_S + 1.0  # a late answer is sent this long after its trigger arrived: after the station
WAIT_S = 15.0


class Act(Enum):
    """How the scripted agent answers one trigger."""

    OK = "ok"
    NG = "ng"  # a reject and a decision with reject: true
    ERROR = "error"  # a reject and a decision with reject: true
    ERROR_NO_REJECT = "error-no-reject"  # [mqtt].reject_uninspected = false: decision only, reject: false
    SILENCE = "silence"
    LATE = "late"  # an OK decision after the part passed the station
    DUPLICATE = "duplicate"  # the same OK decision twice (QoS 1 redelivery)
    DUPLICATE_CHANGED = "duplicate-changed"  # OK, then a second decision saying NG: the first is kept
    UNKNOWN = "unknown"  # an OK decision for a part id never triggered
    OTHER_CAMERA = "other-camera"  # an OK decision for the right id on another camera's topic


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Responder:
    """A scripted agent: subscribes to the line's triggers and answers each as `script(part_id)` says."""

    def __init__(self, port: int, line: str, script: Callable[[str], Act]) -> None:
        self.line, self.script = line, script
        self.triggers: list[tuple[str, dict[str, Any], bool]] = []  # topic, payload, retained
        self._count = 0
        self._timers: list[threading.Timer] = []
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"agent-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{PREFIX}/{line}/+/trigger", qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_trigger
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self._subscribed.wait(WAIT_S), "responder got no SUBACK"

    def _on_trigger(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        camera = message.topic.split("/")[-2]
        body = json.loads(message.payload)
        self.triggers.append((message.topic, body, bool(message.retain)))
        self._count += 1
        self.answer(camera, body["part_id"], self._count, self.script(body["part_id"]))

    def answer(self, camera: str, part_id: str, trigger: int, act: Act) -> None:
        if act is Act.SILENCE:
            return
        if act is Act.LATE:
            timer = threading.Timer(LATE_S, self.send, (camera, part_id, trigger, "OK"))
            self._timers.append(timer)
            timer.start()
        elif act is Act.UNKNOWN:
            self.send(camera, f"{part_id}-never-triggered", trigger, "OK")
        elif act is Act.OTHER_CAMERA:
            self.send(f"{camera}-other", part_id, trigger, "OK")
        elif act is Act.ERROR_NO_REJECT:
            self.send(camera, part_id, trigger, "ERROR", reject=False)
        else:
            verdict = {Act.NG: "NG", Act.ERROR: "ERROR"}.get(act, "OK")
            self.send(camera, part_id, trigger, verdict)
            if act is Act.DUPLICATE:
                self.send(camera, part_id, trigger, "OK")
            if act is Act.DUPLICATE_CHANGED:
                self.send(camera, part_id, trigger, "NG", reject=True, with_reject_topic=False)

    def send(
        self,
        camera: str,
        part_id: str,
        trigger: int,
        verdict: str,
        *,
        reject: bool | None = None,
        with_reject_topic: bool = True,
    ) -> None:
        """A decision (and a reject when the part is to be rejected) as docs/integration.md shows them."""
        reject = verdict != "OK" if reject is None else reject
        now = datetime.now(UTC)
        payload: dict[str, Any] = {
            "schema": 1,
            "line": self.line,
            "camera": camera,
            "part_id": part_id,
            "seq": trigger,
            "run_id": "abc123def456",
            "trigger": trigger,
            "captured_at": iso(now),
            "deadline": iso(now + timedelta(seconds=2)),
            "verdict": verdict,
            "score": None if verdict == "ERROR" else (0.9 if verdict == "NG" else 0.1),
            "defect_types": {"OK": [], "NG": ["scratch"], "ERROR": ["inspection-error"]}[verdict],
        }
        if verdict == "ERROR":
            payload["error"] = "camera timeout"
        base = f"{PREFIX}/{self.line}/{camera}"
        if reject and with_reject_topic:
            self.client.publish(f"{base}/reject", json.dumps(payload), qos=1)
        self.client.publish(f"{base}/decision", json.dumps({**payload, "reject": reject}), qos=1)

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def line() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def made() -> Iterator[list[Any]]:
    """PLCs and responders a test made; stopped afterwards whatever happened."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        if isinstance(thing, Plc):
            thing.stop()
        else:
            thing.close()


@pytest.fixture
def plc(mosquitto: MosquittoServer, line: str, made: list[Any]) -> Plc:
    plc = Plc(PlcConfig(port=mosquitto.port, topic_prefix=PREFIX, line=line, reject_delay_s=DELAY_S))
    made.append(plc)
    plc.start()
    return plc


@pytest.fixture
def respond(mosquitto: MosquittoServer, line: str, made: list[Any]) -> Callable[[Callable[[str], Act]], Responder]:
    def start(script: Callable[[str], Act]) -> Responder:
        responder = Responder(mosquitto.port, line, script)
        made.append(responder)
        return responder

    return start


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def settle(plc: Plc, parts: int) -> PlcReport:
    assert wait_until(lambda: plc.report().triggers == parts)
    assert plc.wait_settled(WAIT_S), "parts still on the belt"
    return plc.report()


# --- one rule per part ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("act", "outcome", "rule", "verdict"),
    [
        (Act.OK, Outcome.PASSED, Rule.OK, "OK"),
        (Act.NG, Outcome.REJECTED, Rule.NG, "NG"),
        (Act.ERROR, Outcome.REJECTED, Rule.ERROR, "ERROR"),
        (Act.ERROR_NO_REJECT, Outcome.REJECTED, Rule.ERROR, "ERROR"),
        (Act.SILENCE, Outcome.REJECTED, Rule.SILENCE, None),
    ],
)
def test_each_rule_decides_the_part_at_the_station(
    plc: Plc, respond: Callable[..., Responder], act: Act, outcome: Outcome, rule: Rule, verdict: str | None
) -> None:
    respond(lambda part_id: act)
    plc.trigger("cam-1", "P-000001")
    report = settle(plc, 1)

    (record,) = report.records
    assert (record.camera, record.part_id, record.outcome, record.rule, record.verdict) == (
        "cam-1",
        "P-000001",
        outcome,
        rule,
        verdict,
    )
    assert record.station_at == pytest.approx(record.triggered_at + DELAY_S)
    answered = act is not Act.SILENCE
    assert (record.latency_ms is not None) == answered
    assert record.trigger == (1 if answered else None)
    assert (report.passed, report.rejected) == ((1, 0) if outcome is Outcome.PASSED else (0, 1))
    assert report.messages == MessageCounts()  # a reject and a decision of one part are no duplicates
    assert report.uninspected_passed == 0


def test_a_late_decision_is_ignored_and_the_part_rejected_on_silence(
    plc: Plc, respond: Callable[..., Responder]
) -> None:
    respond(lambda part_id: Act.LATE)
    plc.trigger("cam-1", "P-000001")
    settle(plc, 1)
    assert wait_until(lambda: plc.report().late == 1), "the late decision never arrived"

    report = plc.report()
    (record,) = report.records
    assert (record.outcome, record.rule, record.verdict, record.latency_ms) == (
        Outcome.REJECTED,
        Rule.SILENCE,
        None,
        None,
    )
    assert (report.rejected_silence, report.duplicates, report.unknown) == (1, 0, 0)


def test_duplicates_are_counted_once_and_the_first_decision_kept(plc: Plc, respond: Callable[..., Responder]) -> None:
    acts = {"P-000001": Act.DUPLICATE, "P-000002": Act.DUPLICATE_CHANGED, "P-000003": Act.NG}
    respond(acts.__getitem__)
    for part_id in acts:
        plc.trigger("cam-1", part_id)
    settle(plc, 3)
    assert wait_until(lambda: plc.report().duplicates == 2)

    report = plc.report()
    outcomes = {r.part_id: (r.outcome, r.rule) for r in report.records}
    assert outcomes == {
        "P-000001": (Outcome.PASSED, Rule.OK),
        "P-000002": (Outcome.PASSED, Rule.OK),  # its repeat said NG: the first decision stands
        "P-000003": (Outcome.REJECTED, Rule.NG),
    }
    assert (report.parts, report.passed, report.rejected_ng) == (3, 2, 1)
    assert (report.duplicates, report.late, report.unknown) == (2, 0, 0)
    assert report.latency.answered == 3


def test_answers_for_parts_never_triggered_are_unknown(plc: Plc, respond: Callable[..., Responder]) -> None:
    acts = {"P-000001": Act.UNKNOWN, "P-000002": Act.OTHER_CAMERA}
    respond(acts.__getitem__)
    for part_id in acts:
        plc.trigger("cam-1", part_id)
    settle(plc, 2)
    assert wait_until(lambda: plc.report().unknown == 2)

    report = plc.report()
    assert [(r.part_id, r.rule) for r in report.records] == [("P-000001", Rule.SILENCE), ("P-000002", Rule.SILENCE)]
    assert (report.rejected_silence, report.passed, report.late, report.duplicates) == (2, 0, 0, 0)


def test_malformed_answers_decide_nothing(plc: Plc, respond: Callable[..., Responder], line: str) -> None:
    responder = respond(lambda part_id: Act.SILENCE)
    plc.trigger("cam-1", "P-000001")
    base = f"{PREFIX}/{line}/cam-1"
    for topic, payload in [
        (f"{base}/decision", b"not json"),
        (f"{base}/decision", json.dumps({"part_id": "P-000001", "verdict": "OK"}).encode()),  # no reject flag
        (f"{base}/reject", json.dumps({"part_id": "P-000001", "verdict": "MAYBE"}).encode()),
        (f"{base}/decision", json.dumps(["P-000001"]).encode()),
    ]:
        responder.client.publish(topic, payload, qos=1)
    assert wait_until(lambda: plc.report().messages.malformed == 4)
    report = settle(plc, 1)
    assert [r.rule for r in report.records] == [Rule.SILENCE]


# --- the conveyor --------------------------------------------------------------------------------


def test_conveyor_triggers_every_part_on_a_steady_schedule(plc: Plc, respond: Callable[..., Responder]) -> None:
    responder = respond(lambda part_id: Act.OK)
    rate, count = 20.0, 40
    conveyor = plc.conveyor("cam-1", rate_per_s=rate, count=count).start()
    assert conveyor.join(WAIT_S)
    report = settle(plc, count)

    ids = [f"P-{n:06d}" for n in range(1, count + 1)]
    assert conveyor.part_ids == tuple(ids)
    assert wait_until(lambda: len(responder.triggers) == count)
    topic = f"{PREFIX}/{plc.config.line}/cam-1/trigger"
    assert responder.triggers == [(topic, {"part_id": part_id}, False) for part_id in ids]

    times = conveyor.trigger_times
    assert len(times) == count
    assert all(t >= conveyor.scheduled_at(i) for i, t in enumerate(times)), "a trigger fired early"
    span = times[-1] - times[0]
    assert (count - 1) / rate - 0.01 <= span <= (count - 1) / rate + 1.0
    assert (report.parts, report.passed, report.latency.answered) == (count, count, count)
    assert [r.part_id for r in report.records] == ids  # the station takes the FIFO in trigger order
    assert [r.trigger for r in report.records] == list(range(1, count + 1))
    lat = report.latency
    assert lat.p50_ms is not None and lat.p99_ms is not None and lat.max_ms is not None
    assert 0 < lat.p50_ms <= lat.p99_ms <= lat.max_ms < DELAY_S * 1000


def test_conveyor_keeps_its_schedule_when_a_trigger_is_slow() -> None:
    """Each trigger takes 40 % of the period: a conveyor that sleeps a period after each would fall behind."""
    rate, count, busy_s = 20.0, 30, 0.02
    fired: list[str] = []

    def slow_trigger(camera: str, part_id: str) -> None:
        fired.append(part_id)
        time.sleep(busy_s)

    conveyor = Conveyor(slow_trigger, "cam-1", rate, count, id_prefix="X-", first_number=7)
    assert conveyor.run() == count
    assert fired[0] == "X-000007" and fired[-1] == "X-000036"
    span = conveyor.trigger_times[-1] - conveyor.trigger_times[0]
    drifting = (count - 1) * (1 / rate + busy_s)
    assert span < (count - 1) / rate + 0.4 < drifting


def test_a_stopped_conveyor_triggers_no_more() -> None:
    fired: list[str] = []
    conveyor = Conveyor(lambda camera, part_id: fired.append(part_id), "cam-1", 2.0, 100).start()
    assert wait_until(lambda: len(fired) >= 1)
    conveyor.stop()
    assert conveyor.join(1)
    assert len(fired) < 100
    assert len(conveyor.trigger_times) == len(fired)


# --- ground truth --------------------------------------------------------------------------------


def test_ground_truth_confusion(plc: Plc, respond: Callable[..., Responder]) -> None:
    # part: (what the agent answers, defective in truth)
    parts = {
        "P-000001": (Act.NG, True),  # defective rejected
        "P-000002": (Act.NG, True),  # defective rejected
        "P-000003": (Act.SILENCE, True),  # defective rejected (silence)
        "P-000004": (Act.OK, True),  # escape
        "P-000005": (Act.OK, False),  # good passed
        "P-000006": (Act.OK, False),  # good passed
        "P-000007": (Act.OK, False),  # good passed
        "P-000008": (Act.NG, False),  # good rejected (false alarm)
        "P-000009": (Act.ERROR_NO_REJECT, False),  # good rejected (ERROR)
        "P-000010": (Act.OK, None),  # not in the ground truth
    }
    respond(lambda part_id: parts[part_id][0])
    plc.conveyor("cam-1", rate_per_s=10, count=len(parts)).run()
    settle(plc, len(parts))

    truth = {part_id: defective for part_id, (_, defective) in parts.items() if defective is not None}
    report = plc.report(truth)
    assert report.confusion is not None
    c = report.confusion
    assert (c.defective_rejected, c.defective_passed, c.good_rejected, c.good_passed, c.without_truth) == (
        3,
        1,
        2,
        3,
        1,
    )
    assert (report.passed, report.rejected_ng, report.rejected_error, report.rejected_silence) == (5, 3, 1, 1)
    assert report.uninspected_passed == 0
    assert plc.report().confusion is None

    text = "\n".join(report.summary_lines())
    for expected in ("OK            5  passed", "NG            3  rejected", "silence       1  rejected"):
        assert expected in text
    assert "defective passed (escapes) 1" in text


def test_uninspected_passed_is_counted_from_the_records() -> None:
    def record(part_id: str, verdict: str | None, outcome: Outcome, rule: Rule) -> PartRecord:
        return PartRecord("cam-1", part_id, 0.0, 1.0, None if verdict is None else 0.1, verdict, None, outcome, rule)

    records = [
        record("a", "OK", Outcome.PASSED, Rule.OK),
        record("b", "ERROR", Outcome.PASSED, Rule.OK),  # never made by the station: proves it is counted
        record("c", None, Outcome.PASSED, Rule.OK),
        record("d", "ERROR", Outcome.REJECTED, Rule.ERROR),
    ]
    report = PlcReport.from_records(records, triggers=4)
    assert report.uninspected_passed == 2
    assert (report.parts, report.passed, report.rejected_error) == (4, 3, 1)
    assert report.latency.answered == 3


# --- the PLC itself ------------------------------------------------------------------------------


def test_trigger_refuses_bad_and_repeated_part_ids(plc: Plc) -> None:
    plc.trigger("cam-1", "P-1")
    with pytest.raises(ValueError, match="already triggered"):
        plc.trigger("cam-1", "P-1")
    plc.trigger("cam-2", "P-1")  # the same id on another camera is another part
    for bad in ("", "x" * 129, "P\n2"):
        with pytest.raises(ValueError, match="part id"):
            plc.trigger("cam-1", bad)
    assert plc.report().triggers == 2


def test_status_is_recorded_and_stop_ends_the_station(
    mosquitto: MosquittoServer, line: str, respond: Callable[..., Responder]
) -> None:
    responder = respond(lambda part_id: Act.SILENCE)
    responder.client.publish(f"{PREFIX}/{line}/status", b"online", qos=1, retain=True).wait_for_publish(WAIT_S)
    plc = Plc(PlcConfig(port=mosquitto.port, topic_prefix=PREFIX, line=line, reject_delay_s=30.0))
    plc.start()
    try:
        assert wait_until(lambda: plc.statuses == ("online",))
        plc.trigger("cam-1", "P-000001")
    finally:
        plc.stop()
    assert not [t for t in threading.enumerate() if t.name == f"plc-station-{plc.config.client_id}"]
    report = plc.report()
    assert (report.triggers, report.parts, report.pending) == (1, 0, 1)
    assert "1 still on the belt" in report.summary_lines()[0]
    with pytest.raises(RuntimeError):
        plc.trigger("cam-1", "P-000002")
    responder.client.publish(f"{PREFIX}/{line}/status", b"", qos=1, retain=True).wait_for_publish(WAIT_S)


def test_run_out_decides_the_parts_on_the_belt_on_what_arrived(
    mosquitto: MosquittoServer, line: str, made: list[Any], respond: Callable[..., Responder]
) -> None:
    acts = {"P-000001": Act.OK, "P-000002": Act.NG, "P-000003": Act.SILENCE}
    responder = respond(lambda part_id: acts[part_id])
    plc = Plc(PlcConfig(port=mosquitto.port, topic_prefix=PREFIX, line=line, reject_delay_s=60.0))
    made.append(plc)
    plc.start()
    for part_id in acts:
        plc.trigger("cam-1", part_id)
    assert wait_until(lambda: len(responder.triggers) == 3)
    time.sleep(1.0)  # the answers are in (local broker: milliseconds); the station is a minute away
    assert plc.report().pending == 3

    records = plc.run_out()

    assert [(r.part_id, r.rule) for r in records] == [
        ("P-000001", Rule.OK),
        ("P-000002", Rule.NG),
        ("P-000003", Rule.SILENCE),
    ]
    assert all(r.station_at > time.monotonic() + 50 for r in records)  # decided before their station time
    assert plc.wait_settled(0) and plc.run_out() == []
    report = plc.report()
    assert (report.parts, report.pending, report.passed, report.rejected) == (3, 0, 1, 2)


def test_start_fails_when_no_broker_listens() -> None:
    from tests.brokers import free_port

    plc = Plc(PlcConfig(port=free_port()))
    with pytest.raises(ConnectionError):
        plc.start(timeout_s=2)


# --- the tracking rules, clock-free --------------------------------------------------------------


def answer(part_id: str, verdict: str = "OK", *, reject: bool | None = None) -> bytes:
    body: dict[str, Any] = {"part_id": part_id, "verdict": verdict, "trigger": 1}
    if reject is not None:
        body["reject"] = reject
    return json.dumps(body).encode()


def test_tracker_counts_an_answer_after_the_station_time_as_late_even_before_the_station_took_the_part() -> None:
    tracker = PartTracker(reject_delay_s=0.6)
    tracker.track("cam-1", "P-1", now=10.0)
    tracker.bind("cam-1", "decision", answer("P-1", reject=False), now=10.6)  # the station is behind: not taken
    assert tracker.pending == 1
    assert [(r.rule, r.verdict) for r in tracker.settle_due(now=10.7)] == [(Rule.SILENCE, None)]
    tracker.bind("cam-1", "decision", answer("P-1", reject=False), now=10.8)  # after the station took it
    assert (tracker.report().late, tracker.report().unknown) == (2, 0)


def test_tracker_binds_by_camera_and_part_and_settles_in_station_order() -> None:
    tracker = PartTracker(reject_delay_s=1.0)
    tracker.track("cam-1", "P-1", now=0.0)
    tracker.track("cam-2", "P-1", now=0.1)
    tracker.track("cam-1", "P-2", now=0.2)
    assert tracker.next_station_at() == 1.0
    tracker.bind("cam-2", "reject", answer("P-1", "NG"), now=0.3)
    tracker.bind("cam-2", "decision", answer("P-1", "NG", reject=True), now=0.31)
    tracker.bind("cam-2", "decision", answer("P-1", "OK", reject=False), now=0.32)  # a repeat: changes nothing
    tracker.bind("cam-1", "decision", answer("P-2", reject=False), now=0.4)
    tracker.bind("cam-1", "decision", answer("P-3", reject=False), now=0.4)
    assert tracker.settle_due(now=0.99) == []
    settled = tracker.settle_due(now=1.15)
    assert [(r.camera, r.part_id, r.rule) for r in settled] == [
        ("cam-1", "P-1", Rule.SILENCE),
        ("cam-2", "P-1", Rule.NG),
    ]
    assert settled[1].latency_ms == pytest.approx(200.0)
    assert tracker.next_station_at() == 1.2
    assert [(r.part_id, r.rule) for r in tracker.settle_due(now=5.0)] == [("P-2", Rule.OK)]
    assert tracker.next_station_at() is None
    report = tracker.report()
    assert (report.parts, report.passed, report.rejected_ng, report.rejected_silence) == (3, 1, 1, 1)
    assert (report.duplicates, report.unknown, report.late) == (1, 1, 0)


def test_tracker_rejects_on_a_reject_message_alone_and_on_any_verdict_but_ok() -> None:
    tracker = PartTracker(reject_delay_s=1.0)
    for part_id in ("reject-only", "ng-reject-false", "ok-reject-true"):
        tracker.track("cam-1", part_id, now=0.0)
    tracker.bind("cam-1", "reject", answer("reject-only", "NG"), now=0.1)  # an agent with decisions off
    tracker.bind("cam-1", "decision", answer("ng-reject-false", "NG", reject=False), now=0.1)
    tracker.bind("cam-1", "decision", answer("ok-reject-true", "OK", reject=True), now=0.1)
    records = tracker.settle_due(now=1.0)
    assert [(r.part_id, r.outcome, r.rule) for r in records] == [
        ("reject-only", Outcome.REJECTED, Rule.NG),
        ("ng-reject-false", Outcome.REJECTED, Rule.NG),
        ("ok-reject-true", Outcome.REJECTED, Rule.NG),
    ]
