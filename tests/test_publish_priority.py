"""Rejects and decisions before results, and expiry that never outlasts a part's deadline (real Mosquitto)."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.publish.mqtt import MqttPublisher
from agent.publish.mqtt_messages import Message, is_urgent, signal_expiry
from agent.publish.outbox import LaneOutbox
from tests.brokers import MosquittoServer
from tests.test_publish_mqtt import clients, config, line, make_inspection, start_publisher, subscribe, wait_until

__all__ = ["clients", "line"]  # fixtures imported for pytest

pytestmark = pytest.mark.timeout(60)


def test_signal_expiry_rounds_down_and_is_one_second_under_one_second() -> None:
    assert [signal_expiry(s) for s in (-1.0, 0.0)] == [None] * 2
    assert [signal_expiry(s) for s in (0.001, 0.4, 0.999)] == [1] * 3
    assert [signal_expiry(s) for s in (1.0, 1.001, 1.999, 2.0, 59.99)] == [1, 1, 1, 2, 59]


def message(kind: str, n: int) -> Message:
    return Message(kind, f"t/{kind}", str(n).encode(), 1, part=str(n))


def test_lane_outbox_results_never_evict_or_delay_urgent() -> None:
    dropped: list[Message] = []
    box: LaneOutbox[Message] = LaneOutbox(3, is_urgent, on_drop=dropped.append)
    box.put(message("reject", 1))
    for n in range(10):
        box.put(message("result", n))
    box.put(message("decision", 2))
    assert [(m.kind, m.part) for m in dropped] == [("result", str(n)) for n in range(7)]
    assert len(box) == 5
    assert [box.pop().part for _ in range(2)] == ["1", "2"]  # type: ignore[union-attr]
    assert box.pop(bulk=False) is None
    back = [message("reject", 3), message("result", 99)]
    box.put_front(back, trim=False)
    popped = [box.pop() for _ in range(5)]
    assert [(m.kind, m.part) for m in popped if m] == [
        ("reject", "3"),
        ("result", "99"),
        ("result", "7"),
        ("result", "8"),
        ("result", "9"),
    ]


def test_reject_overtakes_a_results_backlog(mosquitto: MosquittoServer, clients: list[Any], line: str) -> None:
    """300 QoS 1 results queued while not yet connected, then an NG part: its reject is sent before them."""
    sub = subscribe(clients, mosquitto.port, f"genclip/{line}/+/+")
    pub = MqttPublisher(
        config(mosquitto.port, result_qos=1, decisions=False), line, client_id=f"agent-{uuid.uuid4().hex[:8]}"
    )
    clients.append(pub)
    for seq in range(1, 301):
        pub.publish_inspection(make_inspection(line, seq, "OK"))
    pub.publish_inspection(make_inspection(line, 301, "NG"))
    assert pub.stats.queued == 301 + 1
    pub.start()
    assert wait_until(lambda: len(sub.messages) == 302), len(sub.messages)
    topics = [m.topic for m in sub.messages]
    assert topics[0] == pub.topic("cam-1", "reject"), topics[:5]
    results = [json.loads(m.payload)["seq"] for m in sub.messages if m.topic.endswith("/result")]
    assert results == list(range(1, 302))  # results keep their own order
    assert wait_until(lambda: pub.stats["result"].sent == 301 and pub.stats["reject"].sent == 1)


class TimedSubscriber:
    """Records each message with its arrival time on the wall clock (the payload's deadline is wall clock)."""

    def __init__(self, port: int, topic: str) -> None:
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"sub-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv5,
        )
        self.received: list[tuple[float, mqtt.MQTTMessage]] = []
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = lambda c, u, m: self.received.append((time.time(), m))
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert subscribed.wait(10), "subscriber got no SUBACK"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_expiry_never_exceeds_the_time_left(mosquitto: MosquittoServer, clients: list[Any], line: str) -> None:
    sub = TimedSubscriber(mosquitto.port, f"genclip/{line}/+/+")
    clients.append(sub)
    pub = start_publisher(clients, mosquitto.port, line)
    assert wait_until(lambda: pub.health()[0])
    windows = (1.2, 1.5, 1.9, 2.3, 2.9, 3.7, 10.0)
    for seq, window in enumerate(windows, 1):
        pub.publish_inspection(make_inspection(line, seq, "NG", deadline_s=window))
    signals = lambda: [(t, m) for t, m in sub.received if not m.topic.endswith("/result")]  # noqa: E731
    assert wait_until(lambda: len(signals()) == 2 * len(windows)), len(signals())
    for arrived, msg in signals():
        deadline = datetime.fromisoformat(json.loads(msg.payload)["deadline"].replace("Z", "+00:00")).timestamp()
        expiry = msg.properties.MessageExpiryInterval
        assert expiry >= 1
        # The payload's deadline is truncated to milliseconds: the true one is at most 1 ms later.
        assert arrived + expiry <= deadline + 0.001, (msg.topic, msg.payload, expiry, deadline - arrived)


def test_signals_past_their_deadline_are_never_sent_and_under_a_second_left_get_one_second(
    mosquitto: MosquittoServer, clients: list[Any], line: str
) -> None:
    sub = TimedSubscriber(mosquitto.port, f"genclip/{line}/+/+")
    clients.append(sub)
    pub = start_publisher(clients, mosquitto.port, line)
    assert wait_until(lambda: pub.health()[0])
    pub.publish_inspection(make_inspection(line, 1, "NG", deadline_s=-0.5))  # already past
    pub.publish_inspection(make_inspection(line, 2, "NG", deadline_s=0.8))  # under a second left: a 600 ms line
    pub.publish_inspection(make_inspection(line, 3, "NG", deadline_s=5.0))
    signals = lambda: [(t, m) for t, m in sub.received if not m.topic.endswith("/result")]  # noqa: E731
    assert wait_until(lambda: len(signals()) == 4), len(signals())
    assert sorted(json.loads(m.payload)["seq"] for _, m in signals()) == [2, 2, 3, 3]
    for arrived, msg in signals():
        deadline = datetime.fromisoformat(json.loads(msg.payload)["deadline"].replace("Z", "+00:00")).timestamp()
        assert arrived <= deadline + 0.001, (msg.topic, msg.payload, deadline - arrived)  # sent before the deadline
        expected = 1 if json.loads(msg.payload)["seq"] == 2 else 4
        assert msg.properties.MessageExpiryInterval == expected
    # A message is counted sent when the broker acknowledges it, which can come after the subscriber has it.
    expected = {"sent": 2, "dropped": 0, "expired": 1}
    wait_until(lambda: pub.stats.snapshot()["reject"] == pub.stats.snapshot()["decision"] == expected)
    snap = pub.stats.snapshot()
    assert snap["reject"] == expected
    assert snap["decision"] == expected
