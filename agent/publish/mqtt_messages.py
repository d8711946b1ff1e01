"""What the agent puts on MQTT: the topics of a line, and each kind of message with its QoS, retain and expiry.

Topics are `<prefix>/<line>/...`: `status` (starting/online/degraded/stopped, retained, QoS 1,
offline as Last Will), `heartbeat` (QoS 0, not retained, expiring after `heartbeat_expiry`),
`info` (retained, QoS 1), `lost` (retained, QoS 1: parts a killed run left), `<camera>/result`
(`[mqtt].result_qos`), `<camera>/reject` and `<camera>/decision` (`[mqtt].qos`, expiring at the
part's deadline, see `signal_expiry`), `<camera>/trigger` in (from the PLC, QoS 1,
agent/triggers.py), `cmd/<name>` in and `cmd/response` (or a ResponseTopic below it) out
(`[mqtt].qos`, with the request's CorrelationData). Payloads are compact UTF-8 JSON, except status: a plain word, so a
PLC compares a string (the reasons for `degraded` are in info and in the heartbeat).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from agent.publish.config import MqttConfig
from agent.results import Inspection

KINDS = ("result", "reject", "decision", "response", "info", "status", "lost", "heartbeat")
BULK_KINDS = ("result",)  # the outbox's bulk lane; every other kind is urgent and sent first


@dataclass(slots=True)
class Message:
    """One outgoing publish with what the sender needs to account for it."""

    kind: str
    topic: str
    payload: bytes
    qos: int
    retain: bool = False
    hold: bool = True  # kept across a disconnect; status and info are re-sent on connect instead
    deadline: float | None = None  # time.monotonic() after which it is useless
    correlation: bytes | None = None
    expiry_s: int | None = None  # a fixed MessageExpiryInterval (heartbeat); deadline-bound ones use `deadline`
    part: str = ""  # for log lines
    order: int = 0  # stamped by the link when queued: messages going back to the outbox keep their order


def is_urgent(msg: Message) -> bool:
    """Urgent messages (rejects, decisions, status, ...) are sent before any queued result."""
    return msg.kind not in BULK_KINDS


def signal_expiry(left_s: float) -> int | None:
    """MessageExpiryInterval for a message with `left_s` seconds to its deadline, or None: do not send.

    Past the deadline it is not sent (counted as expired; the PLC rejects the part on silence).
    Before it, whole seconds rounded DOWN, so a broker holding it for a PLC that is not connected
    drops it by the deadline; with under a second left, 1 s, the shortest interval MQTT has (0
    would mean "never expires"): sub-second windows (a reject station 600 ms downstream) must
    work, so such a message may outlive its deadline in the broker by under a second. A
    connected PLC gets it at once; the payload's `deadline` is what the PLC enforces (it ignores
    a decision for a part that has passed its station).
    """
    if left_s <= 0.0:
        return None
    return max(1, int(left_s))


def heartbeat_expiry(interval_s: float) -> int:
    """Two heartbeat intervals, in whole seconds, at least 2: a stale beat never reaches a PLC late."""
    return max(2, math.ceil(2 * interval_s))


def encode_json(data: object) -> bytes:
    """Compact UTF-8 JSON, the encoding of every payload but status."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def deadline_mono(inspection: Inspection) -> float:
    """The part's deadline on the monotonic clock, immune to wall-clock jumps."""
    if inspection.deadline_mono is not None:
        return inspection.deadline_mono
    return inspection.captured_mono + (inspection.deadline - inspection.captured_at).total_seconds()


class MqttTopics:
    """A line's topics, and the messages that go on them."""

    def __init__(self, config: MqttConfig, line_id: str) -> None:
        self.config = config
        self.line_id = line_id

    def topic(self, *parts: str) -> str:
        """`<prefix>/<line>/<parts...>`."""
        return "/".join((self.config.topic_prefix, self.line_id, *parts))

    @property
    def status(self) -> str:
        return self.topic("status")

    @property
    def triggers(self) -> str:
        """What the agent subscribes to for PLC triggers: `+/trigger` (one level: the camera id)."""
        return self.topic("+", "trigger")

    def trigger_camera(self, topic: str) -> str:
        """The camera a `<camera>/trigger` topic names; "" for anything else."""
        prefix = self.topic("")
        if not topic.startswith(prefix) or not topic.endswith("/trigger"):
            return ""
        camera = topic[len(prefix) : -len("/trigger")]
        return "" if not camera or "/" in camera else camera

    @property
    def commands(self) -> str:
        """What the agent subscribes to for commands: `cmd/+`."""
        return self.topic("cmd", "+")

    @property
    def responses(self) -> str:
        return self.topic("cmd", "response")

    def command_name(self, topic: str) -> str:
        """The command a `cmd/<name>` topic asks for; "" for anything else (and for our own responses)."""
        prefix = self.topic("cmd") + "/"
        name = topic[len(prefix) :] if topic.startswith(prefix) else ""
        return "" if name == "response" else name

    def answerable(self, reply_to: str) -> bool:
        """Answers go only to cmd/response or below it: else a commander could make the agent
        publish onto a PLC's reject or status topic, which the agent itself may write."""
        base = self.responses
        if any(c in reply_to for c in "+#\0"):
            return False
        return reply_to == base or reply_to.startswith(base + "/")

    def inspection(self, inspection: Inspection) -> list[Message]:
        """The result, and the reject (NG and ERROR parts) and decision signals, which expire at the deadline."""
        camera, part = inspection.camera, inspection.part_id
        qos = self.config.result_qos
        result = encode_json(inspection.result)
        messages = [Message("result", self.topic(camera, "result"), result, qos, hold=qos > 0, part=part)]
        deadline = deadline_mono(inspection)
        signal_qos = self.config.qos
        if inspection.rejects:
            reject = encode_json(inspection.reject_payload())
            topic = self.topic(camera, "reject")
            messages.append(Message("reject", topic, reject, signal_qos, deadline=deadline, part=part))
        if self.config.decisions:
            decision = encode_json(inspection.decision_payload())
            topic = self.topic(camera, "decision")
            messages.append(Message("decision", topic, decision, signal_qos, deadline=deadline, part=part))
        return messages

    def status_message(self, state: str) -> Message:
        return Message("status", self.status, state.encode(), 1, retain=True, hold=False)

    def heartbeat_message(self, count: int, state: str, reasons: tuple[str, ...], at: str) -> Message:
        """`heartbeat`: a counter a PLC watches with a timer; QoS 0, not retained, expires after two beats."""
        body = {"schema": 1, "line": self.line_id, "count": count, "status": state, "reasons": list(reasons), "at": at}
        expiry = heartbeat_expiry(self.config.heartbeat_s)
        return Message("heartbeat", self.topic("heartbeat"), encode_json(body), 0, hold=False, expiry_s=expiry)

    def info_message(self, payload: bytes) -> Message:
        return Message("info", self.topic("info"), payload, 1, retain=True, hold=False)

    def lost_message(self, payload: bytes) -> Message:
        """`lost`: parts the previous run accepted and never answered (retained, QoS 1; agent/journal.py)."""
        return Message("lost", self.topic("lost"), payload, 1, retain=True, hold=False)

    def response_message(self, name: str, correlation: bytes | None, reply_to: str | None, body: object) -> Message:
        topic = reply_to or self.responses
        return Message("response", topic, encode_json(body), self.config.qos, correlation=correlation, part=name[:64])
