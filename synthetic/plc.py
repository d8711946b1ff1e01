"""A PLC stand-in that speaks the agent's MQTT contract as a line's PLC does (triggered acquisition, issue 21).

It knows only the documented wire contract (docs/integration.md, "For the PLC" and "Fail-safe rule", and the
trigger message of issue 21): topic strings and JSON fields. It imports nothing of the agent.

The line it models:

- **One trigger per physical part.** `trigger(camera, part_id)` publishes `{"part_id": "P-000042"}` on
  `<prefix>/<line>/<camera>/trigger` (QoS 1, not retained) and puts the part at the end of that camera's FIFO,
  with its trigger time (monotonic clock).
- **The reject station** sits a fixed delay downstream of the camera (`reject_delay_s`: 300 mm at 0.5 m/s is
  0.6 s). A part reaches it at its trigger time + the delay, and the PLC decides then, on what arrived by then:

      REJECTED  NG       a decision with `reject: true` (or verdict NG), or a reject message
      REJECTED  ERROR    verdict ERROR, also with `reject: false` (`[mqtt].reject_uninspected = false`)
      REJECTED  silence  nothing arrived for the part by then
      PASSED    OK       a decision with verdict OK and `reject: false`

- **Binding.** Decisions and rejects (`<prefix>/<line>/+/decision` and `.../+/reject`, QoS 1) are bound to a
  tracked part by the camera in their topic and their `part_id`. The first decision and the first reject of a
  part count; a repeat (QoS 1 delivers at least once) is a *duplicate* and changes nothing. One that arrives at
  or after the part's station time is *late* and ignored: the part has passed. One for a part id never
  triggered on that camera is *unknown*. A payload that is not a JSON object with a `part_id`, a verdict
  (OK, NG, ERROR) and, on a decision, a boolean `reject` is *malformed* and ignored (silence rejects the part).
  The payload's `deadline` is not consulted: this PLC's own clock and station are the judge.
- `<prefix>/<line>/status` (a plain word) is recorded for information.

    plc = Plc(PlcConfig(port=1883, line="line-1", reject_delay_s=0.6))
    plc.start()
    plc.conveyor("cam-1", rate_per_s=5, count=100).run()
    plc.wait_settled(timeout_s=5)  # or, once the agent has stopped: plc.run_out()
    print("\\n".join(plc.report(truth).summary_lines()))
    plc.stop()
"""

from __future__ import annotations

import json
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Literal

import paho.mqtt.client as mqtt

VERDICTS = frozenset({"OK", "NG", "ERROR"})
MAX_PART_ID_CHARS = 128
AnswerKind = Literal["decision", "reject"]


class Rule(StrEnum):
    """Why the station passed or rejected a part."""

    OK = "OK"
    NG = "NG"
    ERROR = "ERROR"
    SILENCE = "silence"


class Outcome(StrEnum):
    PASSED = "PASSED"
    REJECTED = "REJECTED"


def _default_client_id() -> str:
    return f"plc-standin-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class PlcConfig:
    """Where the PLC's broker is, which line it runs, and how far downstream its reject station sits."""

    host: str = "127.0.0.1"
    port: int = 1883
    topic_prefix: str = "genclip"
    line: str = "line-1"
    reject_delay_s: float = 0.6
    username: str | None = None
    password: str | None = None
    client_id: str = field(default_factory=_default_client_id)
    keepalive_s: int = 10

    @property
    def line_topic(self) -> str:
        return f"{self.topic_prefix}/{self.line}"

    def camera_topic(self, camera: str, kind: str) -> str:
        return f"{self.line_topic}/{camera}/{kind}"


@dataclass(frozen=True)
class Answer:
    """A decision or reject message as the PLC took it in (only those that arrived in time)."""

    kind: AnswerKind
    arrived_at: float  # monotonic
    verdict: str
    reject: bool  # the decision's `reject`; True for a reject message
    trigger: int | None  # the agent's trigger counter, when it sent one

    @property
    def says_reject(self) -> bool:
        return self.reject or self.verdict != "OK"


@dataclass(frozen=True)
class PartRecord:
    """One part that reached the reject station, and what the station did with it."""

    camera: str
    part_id: str
    triggered_at: float  # monotonic
    station_at: float  # monotonic: triggered_at + reject_delay_s
    answered_at: float | None  # monotonic: the first decision or reject that arrived in time
    verdict: str | None  # the decision's (else the reject's) verdict; None without an answer
    trigger: int | None  # the answer's `trigger` field
    outcome: Outcome
    rule: Rule

    @property
    def latency_ms(self) -> float | None:
        """Trigger to the first answer, in milliseconds."""
        return None if self.answered_at is None else (self.answered_at - self.triggered_at) * 1000.0

    @property
    def uninspected(self) -> bool:
        return self.verdict is None or self.verdict == "ERROR"


@dataclass(frozen=True)
class LatencyStats:
    """Trigger-to-answer latency over the parts that were answered in time."""

    answered: int
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @classmethod
    def of(cls, latencies_ms: Sequence[float]) -> LatencyStats:
        if not latencies_ms:
            return cls(0, None, None, None)
        ordered = sorted(latencies_ms)
        return cls(len(ordered), _nearest_rank(ordered, 0.50), _nearest_rank(ordered, 0.99), ordered[-1])


def _nearest_rank(ordered: Sequence[float], q: float) -> float:
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True)
class Confusion:
    """The station's outcomes against ground truth (part id -> defective)."""

    defective_rejected: int
    defective_passed: int  # escapes
    good_rejected: int
    good_passed: int
    without_truth: int  # parts the ground truth does not name

    @classmethod
    def of(cls, records: Sequence[PartRecord], truth: Mapping[str, bool]) -> Confusion:
        known = [(truth[r.part_id], r.outcome is Outcome.REJECTED) for r in records if r.part_id in truth]
        return cls(
            defective_rejected=sum(defective and rejected for defective, rejected in known),
            defective_passed=sum(defective and not rejected for defective, rejected in known),
            good_rejected=sum(not defective and rejected for defective, rejected in known),
            good_passed=sum(not defective and not rejected for defective, rejected in known),
            without_truth=len(records) - len(known),
        )


@dataclass(frozen=True)
class MessageCounts:
    """What the PLC received that decided nothing, and what it could not send."""

    late: int = 0
    duplicates: int = 0
    unknown: int = 0
    malformed: int = 0
    triggers_unsent: int = 0  # the client refused the publish (not connected); the part is still tracked


@dataclass(frozen=True)
class PlcReport:
    """What the reject station did, by rule, with latency and (given ground truth) the confusion."""

    triggers: int
    parts: int  # reached the station
    pending: int  # triggered, not at the station yet
    passed: int
    rejected_ng: int
    rejected_error: int
    rejected_silence: int
    messages: MessageCounts
    latency: LatencyStats
    uninspected_passed: int  # verdict ERROR or no answer, and yet passed: 0 by the rule, counted from the records
    confusion: Confusion | None
    records: tuple[PartRecord, ...]

    @property
    def rejected(self) -> int:
        return self.rejected_ng + self.rejected_error + self.rejected_silence

    @property
    def late(self) -> int:
        return self.messages.late

    @property
    def duplicates(self) -> int:
        return self.messages.duplicates

    @property
    def unknown(self) -> int:
        return self.messages.unknown

    @classmethod
    def from_records(
        cls,
        records: Sequence[PartRecord],
        *,
        triggers: int,
        pending: int = 0,
        messages: MessageCounts | None = None,
        truth: Mapping[str, bool] | None = None,
    ) -> PlcReport:
        by_rule = {rule: sum(r.rule is rule for r in records) for rule in Rule}
        latencies = [ms for r in records if (ms := r.latency_ms) is not None]
        return cls(
            triggers=triggers,
            parts=len(records),
            pending=pending,
            passed=sum(r.outcome is Outcome.PASSED for r in records),
            rejected_ng=by_rule[Rule.NG],
            rejected_error=by_rule[Rule.ERROR],
            rejected_silence=by_rule[Rule.SILENCE],
            messages=messages or MessageCounts(),
            latency=LatencyStats.of(latencies),
            uninspected_passed=sum(r.uninspected and r.outcome is Outcome.PASSED for r in records),
            confusion=None if truth is None else Confusion.of(records, truth),
            records=tuple(records),
        )

    def summary_lines(self) -> list[str]:
        """The station's table by rule, for a demo's output."""
        lines = [
            f"PLC: {self.triggers} triggers, {self.parts} parts at the station ({self.pending} still on the belt)",
            f"  {'rule':<8} {'parts':>6}  outcome",
            f"  {'OK':<8} {self.passed:>6}  passed",
            f"  {'NG':<8} {self.rejected_ng:>6}  rejected",
            f"  {'ERROR':<8} {self.rejected_error:>6}  rejected",
            f"  {'silence':<8} {self.rejected_silence:>6}  rejected",
            f"  messages ignored: {self.late} late, {self.duplicates} duplicate, {self.unknown} unknown part, "
            f"{self.messages.malformed} malformed; {self.messages.triggers_unsent} triggers not sent",
            f"  trigger-to-answer ms: {self._latency_text()}",
            f"  uninspected parts passed: {self.uninspected_passed}",
        ]
        if self.confusion is not None:
            c = self.confusion
            lines.append(
                f"  ground truth: defective rejected {c.defective_rejected}, defective passed (escapes) "
                f"{c.defective_passed}, good rejected {c.good_rejected}, good passed {c.good_passed}"
                + (f", {c.without_truth} without truth" if c.without_truth else "")
            )
        return lines

    def _latency_text(self) -> str:
        stats = self.latency
        if stats.answered == 0:
            return "no answers"
        return f"p50 {stats.p50_ms:.1f}, p99 {stats.p99_ms:.1f}, max {stats.max_ms:.1f} ({stats.answered} answered)"


@dataclass
class _TrackedPart:
    camera: str
    part_id: str
    triggered_at: float
    station_at: float
    decision: Answer | None = None
    reject: Answer | None = None

    def answer(self, kind: AnswerKind) -> Answer | None:
        return self.decision if kind == "decision" else self.reject

    def take(self, answer: Answer) -> None:
        if answer.kind == "decision":
            self.decision = answer
        else:
            self.reject = answer

    def decide(self) -> PartRecord:
        rule = self._rule()
        answers = [a for a in (self.decision, self.reject) if a is not None]
        first = min(answers, key=lambda a: a.arrived_at) if answers else None
        return PartRecord(
            camera=self.camera,
            part_id=self.part_id,
            triggered_at=self.triggered_at,
            station_at=self.station_at,
            answered_at=None if first is None else first.arrived_at,
            verdict=answers[0].verdict if answers else None,
            trigger=next((a.trigger for a in answers if a.trigger is not None), None),
            outcome=Outcome.PASSED if rule is Rule.OK else Outcome.REJECTED,
            rule=rule,
        )

    def _rule(self) -> Rule:
        answers = [a for a in (self.decision, self.reject) if a is not None]
        if not answers:
            return Rule.SILENCE
        if any(a.verdict == "ERROR" for a in answers):
            return Rule.ERROR
        if any(a.says_reject for a in answers):
            return Rule.NG
        return Rule.OK


def _parse_answer(kind: AnswerKind, payload: bytes, arrived_at: float) -> tuple[str, Answer] | None:
    """The part id and answer of a decision or reject payload; None when it is malformed."""
    try:
        body = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict):
        return None
    part_id, verdict, reject = body.get("part_id"), body.get("verdict"), body.get("reject")
    if not isinstance(part_id, str) or not part_id or verdict not in VERDICTS:
        return None
    if kind == "decision" and not isinstance(reject, bool):
        return None
    trigger = body.get("trigger")
    answer = Answer(
        kind=kind,
        arrived_at=arrived_at,
        verdict=str(verdict),
        reject=True if kind == "reject" else bool(reject),
        trigger=trigger if isinstance(trigger, int) and not isinstance(trigger, bool) else None,
    )
    return part_id, answer


def check_part_id(part_id: str) -> None:
    """A part id the contract accepts: 1 to 128 characters, no control characters."""
    if not 1 <= len(part_id) <= MAX_PART_ID_CHARS:
        raise ValueError(f"a part id has 1 to {MAX_PART_ID_CHARS} characters, not {len(part_id)}")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in part_id):
        raise ValueError(f"a part id has no control characters: {part_id!r}")


class PartTracker:
    """The PLC's part tracking, clock-free: per camera a FIFO of parts, answers bound to them, the station.

    Not thread-safe by itself (Plc calls it under one lock); every method takes the time (monotonic) it
    happens at, so the rules can be checked without waiting.
    """

    def __init__(self, reject_delay_s: float) -> None:
        self.reject_delay_s = reject_delay_s
        self._fifos: dict[str, deque[_TrackedPart]] = {}
        self._tracked: dict[tuple[str, str], _TrackedPart] = {}
        self._passed: set[tuple[str, str]] = set()
        self._records: list[PartRecord] = []
        self._counts = MessageCounts()
        self.triggers = 0

    def track(self, camera: str, part_id: str, now: float) -> None:
        """A part triggered at `now` enters its camera's FIFO; it reaches the station reject_delay_s later."""
        key = (camera, part_id)
        if key in self._tracked or key in self._passed:
            raise ValueError(f"part {part_id!r} was already triggered on {camera}")
        part = _TrackedPart(camera, part_id, now, now + self.reject_delay_s)
        self._fifos.setdefault(camera, deque()).append(part)
        self._tracked[key] = part
        self.triggers += 1

    def bind(self, camera: str, kind: AnswerKind, payload: bytes, now: float) -> None:
        """Take a decision or reject payload that arrived at `now` on `camera`'s topic (or count why not)."""
        parsed = _parse_answer(kind, payload, now)
        if parsed is None:
            self.count(malformed=1)
            return
        part_id, answer = parsed
        key = (camera, part_id)
        part = self._tracked.get(key)
        if part is None and key in self._passed:
            self.count(late=1)
        elif part is None:
            self.count(unknown=1)
        elif now >= part.station_at:  # the station may not have taken it yet: the clock decides
            self.count(late=1)
        elif part.answer(kind) is not None:
            self.count(duplicates=1)
        else:
            part.take(answer)

    def count(self, **more: int) -> None:
        counts = self._counts
        self._counts = replace(counts, **{name: getattr(counts, name) + n for name, n in more.items()})

    def next_station_at(self) -> float | None:
        """When the next part reaches the station; None when the belt is empty."""
        heads = [fifo[0].station_at for fifo in self._fifos.values() if fifo]
        return min(heads, default=None)

    def settle_due(self, now: float) -> list[PartRecord]:
        """Decide every part whose station time has come by `now`, in station order."""
        settled = []
        while (due := self._next_due()) is not None and due.station_at <= now:
            settled.append(self._settle(due))
        return settled

    def _next_due(self) -> _TrackedPart | None:
        heads = [fifo[0] for fifo in self._fifos.values() if fifo]
        return min(heads, key=lambda part: part.station_at, default=None)

    def _settle(self, part: _TrackedPart) -> PartRecord:
        self._fifos[part.camera].popleft()
        key = (part.camera, part.part_id)
        del self._tracked[key]
        self._passed.add(key)
        record = part.decide()
        self._records.append(record)
        return record

    @property
    def pending(self) -> int:
        return len(self._tracked)

    def report(self, truth: Mapping[str, bool] | None = None) -> PlcReport:
        return PlcReport.from_records(
            self._records, triggers=self.triggers, pending=self.pending, messages=self._counts, truth=truth
        )


class Plc:
    """The stand-in PLC on a broker: triggers cameras, tracks their parts, rejects at the station.

    Thread-safe: `trigger` (the caller or Conveyors), paho's network thread (answers) and the station
    thread share one lock around the PartTracker; paho is never called under it.
    """

    def __init__(self, config: PlcConfig) -> None:
        self.config = config
        self._cond = threading.Condition()
        self._trigger_lock = threading.Lock()  # a camera's triggers go out in its FIFO's order
        self._tracker = PartTracker(config.reject_delay_s)
        self._statuses: list[str] = []
        self._stopping = False
        self._subscribed = threading.Event()
        self._refusal: str | None = None
        self._client = self._make_client()
        self._station = threading.Thread(target=self._run_station, name=f"plc-station-{config.client_id}", daemon=True)
        self._started = False

    # ------------------------------------------------------------------ lifecycle

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.config.client_id,
            protocol=mqtt.MQTTv5,
        )
        if self.config.username is not None:
            client.username_pw_set(self.config.username, self.config.password)
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def start(self, timeout_s: float = 10.0) -> None:
        """Connect and subscribe; raises ConnectionError when the broker refuses or does not answer in time."""
        self._station.start()
        try:
            self._client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        except OSError as e:
            self.stop()
            raise ConnectionError(f"cannot reach the broker at {self.config.host}:{self.config.port}: {e}") from e
        self._client.loop_start()
        self._started = True
        if not self._subscribed.wait(timeout_s) or self._refusal is not None:
            self.stop()
            raise ConnectionError(self._refusal or f"no subscription acknowledged within {timeout_s} s")

    def stop(self) -> None:
        """Stop the station (parts still on the belt stay pending) and disconnect."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._started:
            self._started = False
            self._client.disconnect()
            self._client.loop_stop()
        if self._station.is_alive():
            self._station.join(timeout=5)

    def __enter__(self) -> Plc:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ triggers

    def trigger(self, camera: str, part_id: str) -> None:
        """Fire one camera's trigger for a part and track it to the reject station."""
        check_part_id(part_id)
        if not self._started:
            raise RuntimeError("start() the PLC before triggering")
        payload = json.dumps({"part_id": part_id})
        with self._trigger_lock:
            self._track(camera, part_id)
            info = self._client.publish(self.config.camera_topic(camera, "trigger"), payload, qos=1, retain=False)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            with self._cond:
                self._tracker.count(triggers_unsent=1)

    def _track(self, camera: str, part_id: str) -> None:
        with self._cond:
            self._tracker.track(camera, part_id, time.monotonic())
            self._cond.notify_all()  # the station may be waiting on an empty belt

    def conveyor(
        self, camera: str, rate_per_s: float, count: int, *, id_prefix: str = "P-", first_number: int = 1
    ) -> Conveyor:
        """A conveyor that triggers `camera` for `count` parts at a steady rate (call run() or start())."""
        return Conveyor(self.trigger, camera, rate_per_s, count, id_prefix=id_prefix, first_number=first_number)

    # ------------------------------------------------------------------ MQTT callbacks (paho's thread)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self._refusal = f"the broker refused the connection: {reason}"
            self._subscribed.set()
            return
        base = self.config.line_topic
        client.subscribe([(f"{base}/+/decision", 1), (f"{base}/+/reject", 1), (f"{base}/status", 1)])

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any], properties: Any) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            self._refusal = f"the broker refused the subscriptions: {', '.join(refused)}"
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        base = self.config.line_topic + "/"
        if not message.topic.startswith(base):
            return
        rest = message.topic[len(base) :]
        payload = bytes(message.payload)
        camera, _, kind = rest.rpartition("/")
        if rest == "status":
            self._note_status(payload)
        elif kind == "decision":
            self._bind(camera, "decision", payload)
        elif kind == "reject":
            self._bind(camera, "reject", payload)

    def _note_status(self, payload: bytes) -> None:
        if not payload:  # a retained status being cleared
            return
        with self._cond:
            self._statuses.append(payload.decode("utf-8", errors="replace"))

    def _bind(self, camera: str, kind: AnswerKind, payload: bytes) -> None:
        with self._cond:  # the time is taken under the lock: consistent with the station's decisions
            self._tracker.bind(camera, kind, payload, time.monotonic())

    # ------------------------------------------------------------------ the reject station (its own thread)

    def _run_station(self) -> None:
        with self._cond:
            while not self._stopping:
                due = self._tracker.next_station_at()
                left = None if due is None else due - time.monotonic()
                if left is None or left > 0:
                    self._cond.wait(left)
                elif self._tracker.settle_due(time.monotonic()):
                    self._cond.notify_all()

    # ------------------------------------------------------------------ results

    def wait_settled(self, timeout_s: float) -> bool:
        """Wait until every tracked part has reached the station; False when some had not by the timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._tracker.pending == 0, timeout_s)

    def run_out(self) -> list[PartRecord]:
        """The line stops and its belt runs out: every part still on it is decided now, on what has arrived.

        Call it once no answer can come any more (the agent has stopped and its last messages are in): the
        station would then decide each part the same at its own time, without waiting out the delay.
        """
        with self._cond:
            records = self._tracker.settle_due(math.inf)
            self._cond.notify_all()
        return records

    @property
    def statuses(self) -> tuple[str, ...]:
        """The line status words received, oldest first (the retained one first)."""
        with self._cond:
            return tuple(self._statuses)

    def report(self, truth: Mapping[str, bool] | None = None) -> PlcReport:
        """The station's figures so far; with ground truth (part id -> defective) also the confusion."""
        with self._cond:
            return self._tracker.report(truth)


class Conveyor:
    """Triggers one camera at a steady rate: part k at start + k / rate on the monotonic clock.

    The schedule never drifts: a slow trigger delays only its own part, the next ones keep their times (a
    conveyor far behind fires the missed triggers at once). Part ids are `<id_prefix><number>`, the number
    zero-padded to 6 digits (`P-000001`).
    """

    def __init__(
        self,
        trigger: Callable[[str, str], object],
        camera: str,
        rate_per_s: float,
        count: int,
        *,
        id_prefix: str = "P-",
        first_number: int = 1,
    ) -> None:
        if rate_per_s <= 0 or count < 0:
            raise ValueError("a conveyor needs a positive rate and a count of zero or more")
        self.camera, self.rate_per_s, self.count = camera, rate_per_s, count
        self.part_ids = tuple(f"{id_prefix}{number:06d}" for number in range(first_number, first_number + count))
        self._trigger = trigger
        self._times: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started_at: float | None = None

    def run(self) -> int:
        """Trigger every part on schedule (blocks); the number triggered (fewer when stopped)."""
        self.started_at = start = time.monotonic()
        for index, part_id in enumerate(self.part_ids):
            if not self._sleep_until(start + index / self.rate_per_s):
                break
            self._times.append(time.monotonic())
            self._trigger(self.camera, part_id)
        return len(self._times)

    def _sleep_until(self, due: float) -> bool:
        while (left := due - time.monotonic()) > 0:
            if self._stop.wait(left):
                return False
        return not self._stop.is_set()

    def start(self) -> Conveyor:
        """Run on its own thread."""
        self._thread = threading.Thread(target=self.run, name=f"conveyor-{self.camera}", daemon=True)
        self._thread.start()
        return self

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for a started conveyor; True when it has finished."""
        if self._thread is not None:
            self._thread.join(timeout_s)
        return self._thread is None or not self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self.join(5)

    @property
    def trigger_times(self) -> tuple[float, ...]:
        """Monotonic time of each trigger fired so far (taken just before the trigger)."""
        return tuple(self._times)

    def scheduled_at(self, index: int) -> float:
        """When part `index` (from 0) is due; after run() has started."""
        if self.started_at is None:
            raise RuntimeError("the conveyor has not started")
        return self.started_at + index / self.rate_per_s
