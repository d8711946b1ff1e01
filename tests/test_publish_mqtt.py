"""The MQTT publisher against a real Mosquitto: what a PLC sees, across outages, and the command channel."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import structlog.testing
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.control import Command
from agent.publish.config import MqttConfig
from agent.publish.mqtt import MqttPublisher
from agent.results import Inspection, map_key
from tests.brokers import MosquittoServer

REPO = Path(__file__).resolve().parent.parent
WAIT_S = 10.0

pytestmark = pytest.mark.timeout(60)


def make_inspection(
    line: str,
    seq: int,
    verdict: str = "NG",
    *,
    camera: str = "cam-1",
    deadline_s: float = 30.0,
    map_png: bytes | None = None,
) -> Inspection:
    """An Inspection as the service builds it, with a deadline `deadline_s` from now."""
    now, mono = datetime.now(UTC), time.monotonic()
    score = None if verdict == "ERROR" else (0.91 if verdict == "NG" else 0.12)
    part_id = f"{camera}-{seq}"
    result = {
        "schema": 1,
        "line": line,
        "camera": camera,
        "seq": seq,
        "part_id": part_id,
        "verdict": verdict,
        "score": score,
        "map_key": map_key(line, camera, seq),
    }
    return Inspection(
        line=line,
        camera=camera,
        seq=seq,
        part_id=part_id,
        product_class="widget",
        verdict=verdict,  # type: ignore[arg-type]
        score=score,
        captured_at=now,
        deadline=now + timedelta(seconds=deadline_s),
        captured_mono=mono,
        defect_types=["scratch"] if verdict == "NG" else [],
        result=result,
        map_png=map_png,
        error="camera timeout" if verdict == "ERROR" else None,
    )


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class Subscriber:
    """An independent MQTT 5 client that records everything it receives."""

    def __init__(self, port: int, topics: list[str], *, persistent: bool = False) -> None:
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"sub-{uuid.uuid4().hex[:10]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]
        self.topics = topics
        self.messages: list[mqtt.MQTTMessage] = []
        self.subscribed = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append(m)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 300 if persistent else 0
        self.client.connect("127.0.0.1", port, keepalive=10, clean_start=not persistent, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT_S), "subscriber got no SUBACK"

    def _on_connect(self, client: mqtt.Client, u: Any, f: Any, rc: ReasonCode, p: Any) -> None:
        if not rc.is_failure:
            client.subscribe([(t, 1) for t in self.topics])

    def on(self, topic: str) -> list[mqtt.MQTTMessage]:
        return [m for m in list(self.messages) if m.topic == topic]

    def payloads(self, topic: str) -> list[bytes]:
        return [m.payload for m in self.on(topic)]

    def request(self, topic: str, payload: bytes, correlation: bytes, response_topic: str | None = None) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = correlation
        if response_topic:
            props.ResponseTopic = response_topic
        self.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def line() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def clients() -> Iterator[list[Any]]:
    """Publishers and subscribers made by a test; stopped afterwards whatever happened."""
    made: list[Any] = []
    yield made
    for c in reversed(made):
        if isinstance(c, MqttPublisher):
            c.stop(timeout=1.0)
        else:
            c.close()


def config(port: int, **overrides: Any) -> MqttConfig:
    return MqttConfig(port=port, reconnect_min_s=0.1, reconnect_max_s=0.5, keepalive_s=5, **overrides)


def start_publisher(clients: list[Any], port: int, line: str, **kwargs: Any) -> MqttPublisher:
    handler = kwargs.pop("handler", None)
    pub = MqttPublisher(config(port, **kwargs), line, handler=handler, client_id=f"agent-{uuid.uuid4().hex[:8]}")
    clients.append(pub)
    pub.start()
    return pub


def subscribe(clients: list[Any], port: int, *topics: str, persistent: bool = False) -> Subscriber:
    sub = Subscriber(port, list(topics), persistent=persistent)
    clients.append(sub)
    return sub


# --- status, Last Will, info ---------------------------------------------------------------------


def test_status_online_retained_then_stopped(mosquitto: MosquittoServer, clients: list[Any], line: str) -> None:
    pub = start_publisher(clients, mosquitto.port, line)
    assert wait_until(lambda: pub.health() == (True, "connected"))
    status = pub.topic("status")
    assert status == f"genclip/{line}/status"
    # the status goes out through the urgent outbox lane after the connect: wait until the broker acknowledged it
    assert wait_until(lambda: pub.stats.counts().get("status", {}).get("sent", 0) >= 1)
    late = subscribe(clients, mosquitto.port, status)  # subscribes after the publish: sees the retained copy
    assert wait_until(lambda: late.payloads(status) == [b"online"])
    assert late.on(status)[0].retain

    pub.stop(timeout=2.0)
    assert wait_until(lambda: late.payloads(status) == [b"online", b"stopped"])
    assert pub.health() == (False, "stopped")
    after = subscribe(clients, mosquitto.port, status)
    assert wait_until(lambda: after.payloads(status) == [b"stopped"]), "stopped is not retained"
    assert pub.stats["status"].sent == 2


def test_last_will_offline_when_the_agent_dies(mosquitto: MosquittoServer, clients: list[Any], line: str) -> None:
    script = (
        "import time\n"
        "from agent.publish.config import MqttConfig\n"
        "from agent.publish.mqtt import MqttPublisher\n"
        f"p = MqttPublisher(MqttConfig(port={mosquitto.port}), {line!r})\n"
        "p.start()\n"
        "while not p.health()[0]: time.sleep(0.02)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    status = f"genclip/{line}/status"
    sub = subscribe(clients, mosquitto.port, status)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert b"ready\n" in iter(proc.stdout.readline, b""), "the agent process did not connect"
        assert wait_until(lambda: sub.payloads(status) == [b"online"])
    finally:
        proc.kill()  # no DISCONNECT reaches the broker
        proc.wait(timeout=WAIT_S)
    assert wait_until(lambda: sub.payloads(status) == [b"online", b"offline"]), sub.payloads(status)
    assert sub.on(status)[-1].qos == 1


def test_info_retained_and_resent_after_reconnect(
    fresh_mosquitto: MosquittoServer, clients: list[Any], line: str
) -> None:
    pub = start_publisher(clients, fresh_mosquitto.port, line)
    pub.publish_info({"version": "1.2.3", "cameras": ["cam-1"]})
    info = pub.topic("info")
    assert wait_until(lambda: pub.stats["info"].sent == 1)
    first = subscribe(clients, fresh_mosquitto.port, info)
    assert wait_until(lambda: first.payloads(info) == [b'{"version":"1.2.3","cameras":["cam-1"]}'])
    assert first.on(info)[0].retain
    first.close()
    clients.remove(first)

    # A broker that lost its retained messages (new machine, wiped store) gets them again on reconnect.
    fresh_mosquitto.stop()
    shutil.rmtree(fresh_mosquitto.workdir / "data")
    assert wait_until(lambda: not pub.health()[0])
    fresh_mosquitto.restart()
    assert wait_until(lambda: pub.health()[0])
    again = subscribe(clients, fresh_mosquitto.port, info, pub.topic("status"))
    assert wait_until(lambda: len(again.on(info)) == 1 and again.payloads(pub.topic("status")) == [b"online"])
    assert pub.stats["info"].sent >= 2


# --- inspections ---------------------------------------------------------------------------------


def test_result_reject_decision_per_inspection(mosquitto: MosquittoServer, clients: list[Any], line: str) -> None:
    sub = subscribe(clients, mosquitto.port, f"genclip/{line}/+/+")
    pub = start_publisher(clients, mosquitto.port, line)
    assert wait_until(lambda: pub.health()[0])
    inspections = [
        make_inspection(line, 1, "OK", deadline_s=2.0),
        make_inspection(line, 2, "NG", deadline_s=2.0),
        make_inspection(line, 3, "ERROR", deadline_s=2.0, camera="cam-2"),
    ]
    for insp in inspections:
        pub.publish_inspection(insp)
    assert wait_until(lambda: len(sub.messages) == 3 + 2 + 3), [m.topic for m in sub.messages]

    for insp in inspections:
        results = [m for m in sub.on(pub.topic(insp.camera, "result")) if json.loads(m.payload)["seq"] == insp.seq]
        assert [json.loads(m.payload) for m in results] == [insp.result]
        assert results[0].qos == 0 and not results[0].retain
        decisions = [m for m in sub.on(pub.topic(insp.camera, "decision")) if json.loads(m.payload)["seq"] == insp.seq]
        assert [json.loads(m.payload) for m in decisions] == [insp.decision_payload()]
        assert decisions[0].qos == 1 and 1 <= decisions[0].properties.MessageExpiryInterval <= 2
    rejects = [json.loads(m.payload) for t in ("cam-1", "cam-2") for m in sub.on(pub.topic(t, "reject"))]
    assert rejects == [inspections[1].reject_payload(), inspections[2].reject_payload()]
    for m in sub.on(pub.topic("cam-1", "reject")):
        assert m.qos == 1 and not m.retain and 1 <= m.properties.MessageExpiryInterval <= 2
    assert wait_until(lambda: pub.stats["decision"].sent == 3 and pub.stats["reject"].sent == 2)
    snap = pub.stats.snapshot()
    assert snap["result"] == {"sent": 3, "dropped": 0, "expired": 0}
    assert snap["reject"] == {"sent": 2, "dropped": 0, "expired": 0}
    assert snap["decision"]["sent"] == 3 and snap["connected"] is True


def test_result_qos_and_decisions_off(mosquitto: MosquittoServer, clients: list[Any], line: str) -> None:
    sub = subscribe(clients, mosquitto.port, f"genclip/{line}/#")
    pub = start_publisher(clients, mosquitto.port, line, result_qos=1, decisions=False)
    assert wait_until(lambda: pub.health()[0])
    pub.publish_inspection(make_inspection(line, 1, "NG"))
    assert wait_until(lambda: pub.stats["reject"].sent == 1 and pub.stats["result"].sent == 1)
    assert wait_until(lambda: len(sub.on(pub.topic("cam-1", "reject"))) == 1)
    assert [m.qos for m in sub.on(pub.topic("cam-1", "result"))] == [1]
    assert sub.on(pub.topic("cam-1", "decision")) == []


def test_outage_holds_signals_and_expires_late_ones(
    fresh_mosquitto: MosquittoServer, clients: list[Any], line: str
) -> None:
    port = fresh_mosquitto.port
    sub = subscribe(clients, port, f"genclip/{line}/+/+", persistent=True)
    pub = start_publisher(clients, port, line)
    assert wait_until(lambda: pub.health()[0])

    fresh_mosquitto.stop()
    assert wait_until(lambda: not pub.health()[0])
    _, reason = pub.health()
    assert reason.startswith(("connection lost", "broker unreachable")), reason
    late = [make_inspection(line, s, "NG", deadline_s=0.3) for s in (1, 2, 3)]
    live = [make_inspection(line, s, "NG") for s in (4, 5, 6, 7)] + [make_inspection(line, s, "OK") for s in (8, 9)]
    for insp in late + live:
        pub.publish_inspection(insp)
    assert pub.stats.queued == 3 + 3 + 4 + 4 + 2  # rejects and decisions held; QoS 0 results dropped
    time.sleep(0.4)
    fresh_mosquitto.restart()

    assert wait_until(lambda: pub.health()[0]), "publisher did not reconnect by itself"
    assert wait_until(lambda: pub.stats["decision"].sent == 6 and pub.stats.queued == 0)
    reject_topic = pub.topic("cam-1", "reject")
    assert wait_until(lambda: len({m.payload for m in sub.on(reject_topic)}) == 4)
    assert sorted({json.loads(m.payload)["seq"] for m in sub.on(reject_topic)}) == [4, 5, 6, 7]
    stats = pub.stats.snapshot()
    assert stats["reject"] == {"sent": 4, "dropped": 0, "expired": 3}
    assert stats["decision"] == {"sent": 6, "dropped": 0, "expired": 3}
    assert stats["result"] == {"sent": 0, "dropped": 9, "expired": 0}


def test_outbox_overflow_drops_oldest(fresh_mosquitto: MosquittoServer, clients: list[Any], line: str) -> None:
    port = fresh_mosquitto.port
    sub = subscribe(clients, port, f"genclip/{line}/+/reject", persistent=True)
    fresh_mosquitto.stop()
    began = time.monotonic()
    pub = start_publisher(clients, port, line, outbox_size=5, decisions=False)
    assert time.monotonic() - began < 1.0, "start() blocked on a broker that is down"
    assert wait_until(lambda: pub.health()[1].startswith("broker unreachable"))
    for seq in range(1, 9):
        pub.publish_inspection(make_inspection(line, seq, "NG"))
    assert pub.stats["reject"].dropped == 3 and pub.stats.queued == 5
    assert pub.stats["result"].dropped == 8

    fresh_mosquitto.restart()
    assert wait_until(lambda: pub.stats["reject"].sent == 5)
    assert wait_until(lambda: len({m.payload for m in sub.messages}) == 5)
    assert sorted({json.loads(m.payload)["seq"] for m in sub.messages}) == [4, 5, 6, 7, 8]


# --- commands ------------------------------------------------------------------------------------


def test_commands_answered_with_correlation(mosquitto: MosquittoServer, clients: list[Any], line: str) -> None:
    calls: list[tuple[Command, str]] = []

    def handler(command: Command) -> dict:
        calls.append((command, threading.current_thread().name))
        if command.name == "resume" and command.args.camera == "boom":  # type: ignore[attr-defined]
            raise RuntimeError("camera boom is not connected")
        return {"applied": command.args.model_dump(by_alias=True)}

    pub = start_publisher(clients, mosquitto.port, line, handler=handler)
    assert wait_until(lambda: pub.health()[0])
    reply = pub.topic("cmd", "response", uuid.uuid4().hex)
    plc_topic = pub.topic("cam-1", "reject")
    sub = subscribe(clients, mosquitto.port, pub.topic("cmd", "response"), reply, plc_topic)
    cases: list[tuple[str, bytes, bool]] = [
        ("reload", b"{}", True),
        ("threshold", b'{"class": "widget", "value": 0.7}', True),
        ("pause", b'{"camera": "cam-1"}', True),
        ("resume", b"", True),
        ("snapshot", b"", True),
        ("resume", b'{"camera": "boom"}', False),  # handler raises
        ("reload", b"{not json", False),
        ("pause", b'{"camera": "' + b"x" * 5000 + b'"}', False),  # over 4096 bytes
        ("threshold", b'{"class": "widget", "value": "high"}', False),
        ("threshold", b'{"class": "widget", "value": 1.5}', False),
        ("pause", b'{"camera": "cam-1", "extra": 1}', False),
        ("explode", b"{}", False),
    ]
    for i, (name, payload, _) in enumerate(cases):
        sub.request(pub.topic("cmd", name), payload, f"corr-{i}".encode())
    sub.request(pub.topic("cmd", "snapshot"), b"", b"via-response-topic", response_topic=reply)
    # An answer is never published outside cmd/response: it would reach a PLC as a reject.
    sub.request(pub.topic("cmd", "snapshot"), b"", b"hijack", response_topic=plc_topic)

    response = pub.topic("cmd", "response")
    assert wait_until(lambda: len(sub.on(response)) == len(cases) + 1 and len(sub.on(reply)) == 1), len(sub.messages)
    assert sub.on(plc_topic) == []
    by_corr = {m.properties.CorrelationData: json.loads(m.payload) for m in sub.on(response)}
    assert by_corr.pop(b"hijack")["ok"] is True
    for i, (name, _, ok) in enumerate(cases):
        body = by_corr[f"corr-{i}".encode()]
        assert body["command"] == name and body["ok"] is ok, (name, body)
        assert ("error" in body) is not ok
    assert by_corr[b"corr-1"]["applied"] == {"class": "widget", "value": 0.7}
    assert "boom is not connected" in by_corr[b"corr-5"]["error"]
    assert "exceeds" in by_corr[b"corr-7"]["error"]
    assert "unknown command" in by_corr[b"corr-11"]["error"]
    (via,) = sub.on(reply)
    assert via.properties.CorrelationData == b"via-response-topic" and json.loads(via.payload)["ok"] is True

    valid = [name for name, _, ok in cases if ok] + ["resume", "snapshot", "snapshot"]
    assert sorted(c.name for c, _ in calls) == sorted(valid)
    assert {t for _, t in calls} == {f"mqtt-commands-{line}"}, "handlers must not run on paho's network thread"
    assert wait_until(lambda: pub.stats["response"].sent == len(cases) + 2)


def test_slow_handler_does_not_stall_publishing(mosquitto: MosquittoServer, clients: list[Any], line: str) -> None:
    release = threading.Event()

    def handler(command: Command) -> dict:
        release.wait(WAIT_S)
        return {}

    pub = start_publisher(clients, mosquitto.port, line, handler=handler)
    assert wait_until(lambda: pub.health()[0])
    sub = subscribe(clients, mosquitto.port, pub.topic("cmd", "response"), pub.topic("cam-1", "reject"))
    sub.request(pub.topic("cmd", "reload"), b"", b"slow")
    pub.publish_inspection(make_inspection(line, 1, "NG"))
    assert wait_until(lambda: len(sub.on(pub.topic("cam-1", "reject"))) == 1), "reject waited for the handler"
    assert sub.on(pub.topic("cmd", "response")) == []
    release.set()
    assert wait_until(lambda: len(sub.on(pub.topic("cmd", "response"))) == 1)


# --- refused connections -------------------------------------------------------------------------


class AuthMosquitto(MosquittoServer):
    """Mosquitto that only lets `agent` / `right-password` in."""

    def _command(self) -> list[str]:
        command = super()._command()
        passwords = self.workdir / "passwd"
        subprocess.run(
            ["mosquitto_passwd", "-b", "-c", str(passwords), "agent", "right-password"], check=True, capture_output=True
        )
        conf = self.workdir / "mosquitto.conf"
        text = conf.read_text().replace("allow_anonymous true", f"allow_anonymous false\npassword_file {passwords}")
        conf.write_text(text)
        return command


@pytest.fixture
def auth_mosquitto(tmp_path: Path) -> Iterator[AuthMosquitto]:
    server = AuthMosquitto(tmp_path / "auth-mosquitto")
    with server:
        yield server


def test_bad_password_is_reported_once(auth_mosquitto: AuthMosquitto, clients: list[Any], line: str) -> None:
    with structlog.testing.capture_logs() as logs:
        pub = start_publisher(clients, auth_mosquitto.port, line, username="agent", password="wrong")
        assert wait_until(lambda: pub.health()[1].startswith("refused by broker"))
        time.sleep(0.6)  # a few more attempts: still one log line
    ok, reason = pub.health()
    assert not ok and reason in ("refused by broker: Bad user name or password", "refused by broker: Not authorized")
    refused = [e for e in logs if e["event"] == "mqtt connection refused"]
    assert len(refused) == 1 and refused[0]["log_level"] == "error" and refused[0]["reason"] == reason
    assert "wrong" not in repr(logs)

    good = start_publisher(clients, auth_mosquitto.port, f"{line}-b", username="agent", password="right-password")
    assert wait_until(lambda: good.health() == (True, "connected"))


def test_tls_verify_failure_is_reported(tmp_path: Path, clients: list[Any], line: str) -> None:
    """A broker whose certificate our CA did not sign: a permanent failure, visible in health()."""
    cert, key = tmp_path / "broker.crt", tmp_path / "broker.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by the test
                return
            with contextlib.suppress(OSError), server_ctx.wrap_socket(conn, server_side=True):
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        pub = start_publisher(clients, listener.getsockname()[1], line, tls={"enabled": True})
        assert wait_until(lambda: "TLS" in pub.health()[1]), pub.health()
        assert pub.health()[1].startswith("TLS certificate verification failed: self")
    finally:
        done.set()
        listener.close()
