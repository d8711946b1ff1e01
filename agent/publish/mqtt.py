"""Results, reject signals and decisions to MQTT for PLCs; commands from the line back to the agent.

Topics are `<prefix>/<line>/...`: `status` (online/offline/stopped, retained,
offline as Last Will), `info` (retained), `<camera>/result|reject|decision`,
`cmd/<name>` in and `cmd/response` out.

Delivery: everything goes through one bounded outbox and one sender thread that
publishes only while connected and keeps at most `INFLIGHT` QoS >= 1 messages
unacknowledged, so paho's own unbounded queue never holds our backlog. A message
counts as sent on its PUBACK; one in flight when the connection drops goes back
to the front of the outbox (QoS 1 allows the duplicate, not the loss). Rejects
and decisions carry the part's deadline: they expire in the broker
(MessageExpiryInterval) and are not sent at all once it has passed.
"""

from __future__ import annotations

import itertools
import json
import math
import queue
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.control import Command, CommandError, parse_command
from agent.logs import get_logger
from agent.publish.config import MqttConfig
from agent.publish.outbox import DeliveryStats, Outbox, link_health
from agent.results import Inspection

log = get_logger(__name__)

KINDS = ("result", "reject", "decision", "response", "info", "status")
INFLIGHT = 20  # unacknowledged QoS >= 1 messages at once; Mosquitto's default receive maximum
COMMAND_QUEUE = 32
# CONNACK reason codes a retry will not fix: the configuration or the broker's ACL must change.
PERMANENT_REFUSALS = {0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C}
REFUSAL_HINTS = {  # what the line engineer should change, per permanent CONNACK reason code
    0x84: "the broker does not speak MQTT 5",
    0x85: "check [mqtt].client_id",
    0x86: "check [mqtt].username and its password (password_file, GENCLIP_MQTT__PASSWORD or the mqtt-password "
    "credential)",
    0x87: "the password does not match, or the broker does not let this user in: check [mqtt].username and its "
    "password (password_file, GENCLIP_MQTT__PASSWORD or the mqtt-password credential) and the broker's password file",
    0x8A: "the broker has banned this client",
    0x8C: "the broker expects another authentication method",
}
X509_NAME_MISMATCH = {62, 64}  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH

Handler = Callable[[Command], dict]


@dataclass(slots=True)
class Message:
    """One outgoing publish with what the sender needs to account for it."""

    kind: str
    topic: str
    payload: bytes
    qos: int
    order: int
    retain: bool = False
    hold: bool = True  # kept across a disconnect; status and info are re-sent on connect instead
    deadline: float | None = None  # time.monotonic() after which it is useless
    correlation: bytes | None = None
    part: str = ""  # for log lines


def _json(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def deadline_mono(inspection: Inspection) -> float:
    """The part's deadline on the monotonic clock, immune to wall-clock jumps."""
    return inspection.captured_mono + (inspection.deadline - inspection.captured_at).total_seconds()


class MqttPublisher:
    """One MQTT 5 connection per line: publishes inspections, answers commands, never blocks the pipeline."""

    def __init__(
        self,
        config: MqttConfig,
        line_id: str,
        *,
        handler: Handler | None = None,
        client_id: str | None = None,
    ) -> None:
        self.config = config
        self.line_id = line_id
        self.handler = handler
        self.client_id = client_id or config.client_id or f"genclip-{line_id}"
        self._cv = threading.Condition()
        self._outbox: Outbox[Message] = Outbox(config.outbox_size, on_drop=self._overflow, cond=self._cv)
        self.stats = DeliveryStats(KINDS, depth=lambda: len(self._outbox))
        self._order = itertools.count()
        self._inflight: dict[int, Message] = {}
        self._early_acks: dict[int, ReasonCode] = {}
        self._epoch = 0  # bumped on every disconnect, to spot a publish that raced with it
        self._connected = False
        self._closing = False
        self._closed = False
        self._started = False
        self._commands_closed = False
        self._problem = "connecting"
        self._fatal: str | None = None  # a problem no retry fixes (refused login, untrusted certificate)
        self._attempted = threading.Event()  # set once the first connection attempt has an outcome
        self._refused = False  # this attempt's CONNACK refused us (paho disconnects after it)
        self._info: bytes | None = None
        self._commands: queue.Queue[tuple[str, bytes, bytes | None, str | None] | None] = queue.Queue(COMMAND_QUEUE)
        self._client = self._make_client()
        self._sender = threading.Thread(target=self._send_loop, name=f"mqtt-send-{line_id}", daemon=True)
        self._command_thread = threading.Thread(target=self._command_loop, name=f"mqtt-commands-{line_id}", daemon=True)

    # --- public API -------------------------------------------------------------------------------

    def topic(self, *parts: str) -> str:
        """`<prefix>/<line>/<parts...>`."""
        return "/".join((self.config.topic_prefix, self.line_id, *parts))

    def start(self) -> None:
        """Connect in the background: returns at once, and keeps retrying while the broker is unreachable."""
        if self._started:
            return
        self._started = True
        self._sender.start()
        self._command_thread.start()
        self._client.connect_async(
            self.config.host, self.config.port, keepalive=self.config.keepalive_s, clean_start=True
        )
        self._client.loop_start()
        log.info("mqtt starting", host=self.config.host, port=self.config.port, client_id=self.client_id)

    def publish_inspection(self, inspection: Inspection) -> None:
        """Queue the result, and the reject and decision signals; never waits for the broker."""
        camera = inspection.camera
        qos = self.config.result_qos
        part = inspection.part_id
        result = _json(inspection.result)
        self._enqueue(self._message("result", self.topic(camera, "result"), result, qos, hold=qos > 0, part=part))
        deadline = deadline_mono(inspection)
        signal_qos = self.config.qos
        if inspection.rejects:
            reject = _json(inspection.reject_payload())
            topic = self.topic(camera, "reject")
            self._enqueue(self._message("reject", topic, reject, signal_qos, deadline=deadline, part=part))
        if self.config.decisions:
            decision = _json(inspection.decision_payload())
            topic = self.topic(camera, "decision")
            self._enqueue(self._message("decision", topic, decision, signal_qos, deadline=deadline, part=part))

    def publish_info(self, info: dict) -> None:
        """Publish retained service info now if connected, and again after every reconnect."""
        with self._cv:
            self._info = _json(info)
            if self._connected:
                self._outbox.put(self._info_message())

    def stop(self, timeout: float = 5.0) -> None:
        """Flush within timeout, announce `stopped`, disconnect cleanly (no Last Will), join the threads."""
        if not self._started or self._closed:
            return
        end = time.monotonic() + timeout
        try:
            self._commands.put_nowait(None)
        except queue.Full:  # commands still queued are not run
            self._commands_closed = True
        self._command_thread.join(max(0.0, end - time.monotonic()))
        with self._cv:
            self._cv.wait_for(lambda: not self._outbox and not self._inflight, max(0.0, end - time.monotonic()))
            if self._connected:
                self._outbox.put(self._status_message("stopped"))
                self._cv.wait_for(lambda: not self._outbox and not self._inflight, max(0.5, end - time.monotonic()))
            self._closing = True
            self._cv.notify_all()
        self._client.disconnect()
        self._client.loop_stop()
        self._sender.join(max(0.5, end - time.monotonic()))
        with self._cv:
            self._closed = True
            self._connected = self.stats.connected = False
            left = self._outbox.clear() + list(self._inflight.values())
            self._inflight.clear()
        for msg in left:
            if msg.kind != "status":
                self.stats.count(msg.kind, "dropped")
        if left:
            log.warning("mqtt stopped with messages unsent", unsent=len(left))
        log.info("mqtt stopped")

    def health(self) -> tuple[bool, str]:
        """(True, "connected") or (False, why not), e.g. a refused login or an unreachable broker."""
        with self._cv:
            return link_health(self._closed, self._started, self._connected, self._problem)

    def startup_problem(self, timeout: float) -> str | None:
        """Wait up to `timeout` s for the first connection attempt; the reason it can never succeed
        (a refused login, a certificate our CA did not sign), or None: connected, still trying, or
        merely unreachable (a broker that is down is retried in the background)."""
        self._attempted.wait(timeout)
        with self._cv:
            return self._fatal

    # --- connection -------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
        )
        client.will_set(self.topic("status"), b"offline", qos=1, retain=True)
        client.reconnect_delay_set(self.config.reconnect_min_s, self.config.reconnect_max_s)
        client.max_inflight_messages_set(INFLIGHT)
        if self.config.username is not None:
            password = self.config.password.get_secret_value() if self.config.password is not None else None
            client.username_pw_set(self.config.username, password)
        tls = self.config.tls
        if tls.enabled:
            try:
                client.tls_set(
                    ca_certs=str(tls.ca_file) if tls.ca_file else None,
                    certfile=str(tls.cert_file) if tls.cert_file else None,
                    keyfile=str(tls.key_file) if tls.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (ssl.SSLError, OSError, ValueError) as exc:  # not PEM, a key that does not match its cert
                files = ", ".join(f"{k}={v}" for k, v in tls.model_dump().items() if k.endswith("_file") and v)
                raise ValueError(f"[mqtt.tls]: cannot load the TLS files ({files}): {exc}") from None
            client.tls_insecure_set(tls.insecure)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _report(self, problem: str, permanent: bool, fatal: str | None = None) -> None:
        """Remember why we are not connected; log only when the reason changes.

        `fatal`: for a permanent problem, the full explanation `startup_problem` gives."""
        with self._cv:
            changed = problem != self._problem
            self._problem = problem
            self._fatal = (fatal or problem) if permanent else None
        self._attempted.set()
        if changed:
            if permanent:
                where = {"host": self.config.host, "port": self.config.port}
                log.error("mqtt connection refused", reason=problem, detail=fatal or problem, **where)
            else:
                log.warning("mqtt not connected", reason=problem, host=self.config.host, port=self.config.port)

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            with self._cv:
                self._refused = True
            permanent = reason_code.value in PERMANENT_REFUSALS
            self._report(f"refused by broker: {reason_code.getName()}", permanent, self._refusal(reason_code))
            return
        # Messages paho kept from the last connection: ours are back in the outbox, resend them from there.
        client.drop_out_messages()
        client.subscribe(self.topic("cmd", "+"), options=SubscribeOptions(qos=1, noLocal=True))
        with self._cv:
            first = [self._status_message("online")]
            if self._info is not None:
                first.append(self._info_message())
            self._outbox.put_front(first, trim=False)
            self._connected = self.stats.connected = True
            self._problem = "connected"
            self._fatal = None
            self._cv.notify_all()
        self._attempted.set()
        log.info("mqtt connected", host=self.config.host, port=self.config.port, queued=len(self._outbox))

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        # paho calls this from inside its `except OSError` block, so the exception is still at hand.
        exc = sys.exc_info()[1]
        where = f"{self.config.host}:{self.config.port}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            if exc.verify_code in X509_NAME_MISMATCH:
                hint = "the broker's certificate is not issued for [mqtt].host: use a name or address it names"
            else:
                hint = "check [mqtt.tls].ca_file: it must hold the CA that signed the broker's certificate"
            fatal = f"TLS certificate verification failed for {where}: {exc.verify_message} ({hint})"
            self._report(f"TLS certificate verification failed: {exc.verify_message}", True, fatal)
        elif isinstance(exc, ssl.SSLError):
            fatal = (
                f"TLS handshake with {where} failed: {exc.reason or exc} "
                "(check that [mqtt].port is the broker's TLS listener, and [mqtt.tls])"
            )
            self._report(f"TLS handshake failed: {exc.reason or exc}", True, fatal)
        else:
            self._report(f"broker unreachable: {exc or 'connection failed'}", False)

    def _refusal(self, reason_code: ReasonCode) -> str:
        """A refused CONNECT, explained for the log and for `genclip run`'s exit message."""
        who = f"user {self.config.username!r}" if self.config.username is not None else "an anonymous client"
        hint = REFUSAL_HINTS.get(reason_code.value)
        if reason_code.value == 0x87 and self.config.username is None:
            hint = "set [mqtt].username and its password"
        text = f"MQTT broker {self.config.host}:{self.config.port} refused the login for {who}: "
        text += reason_code.getName().lower()
        return f"{text} ({hint})" if hint else text

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        with self._cv:
            was_connected = self._connected
            refused, self._refused = self._refused, False
            self._connected = self.stats.connected = False
            self._epoch += 1
            back = sorted((m for m in self._inflight.values() if m.hold), key=lambda m: m.order)
            lost = [m for m in self._inflight.values() if not m.hold]
            self._inflight.clear()
            lost += self._outbox.remove_if(lambda m: not m.hold)
            self._outbox.put_front(back)
            self._cv.notify_all()
        for msg in lost:
            if msg.kind not in ("status", "info"):  # re-sent on connect, not lost
                self.stats.count(msg.kind, "dropped")
        if was_connected and not self._closing:
            self._report(f"connection lost: {reason_code.getName()}", False)
        elif not refused and not self._closing:
            # Closed before any CONNACK: e.g. a plain client at a TLS listener, or a broker at its limit.
            hint = "" if self.config.tls.enabled else " (if [mqtt].port is a TLS listener, enable [mqtt.tls])"
            self._report(f"broker closed the connection before accepting it: {reason_code.getName()}{hint}", False)

    # --- sending ----------------------------------------------------------------------------------

    def _message(self, kind: str, topic: str, payload: bytes, qos: int, **extra: Any) -> Message:
        return Message(kind, topic, payload, qos, next(self._order), **extra)

    def _status_message(self, state: str) -> Message:
        return self._message("status", self.topic("status"), state.encode(), 1, retain=True, hold=False)

    def _info_message(self) -> Message:
        assert self._info is not None
        return self._message("info", self.topic("info"), self._info, 1, retain=True, hold=False)

    def _overflow(self, msg: Message) -> None:
        self.stats.count(msg.kind, "dropped")
        log.warning("mqtt outbox full, oldest message dropped", kind=msg.kind, part=msg.part)

    def _enqueue(self, msg: Message) -> None:
        with self._cv:
            if self._closing or self._closed or (msg.qos == 0 and not self._connected):
                self.stats.count(msg.kind, "dropped")
                return
            self._outbox.put(msg)

    def _ready(self) -> bool:
        return self._closing or (self._connected and bool(self._outbox) and len(self._inflight) < INFLIGHT)

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(self._ready)
                if self._closing:
                    return
                msg = self._outbox.pop()
                epoch = self._epoch
            if msg is not None and not self._send(msg, epoch):
                time.sleep(0.05)  # the connection is going; let paho notice before trying again

    def _send(self, msg: Message, epoch: int) -> bool:
        """Publish one message; False when the connection was gone and the message went back."""
        props = Properties(PacketTypes.PUBLISH)
        if msg.deadline is not None:
            left = msg.deadline - time.monotonic()
            if left <= 0:
                self.stats.count(msg.kind, "expired")
                late = round(-left, 3)
                log.warning("mqtt message expired before it could be sent", kind=msg.kind, part=msg.part, late_s=late)
                return True
            props.MessageExpiryInterval = max(1, math.ceil(left))
        if msg.correlation is not None:
            props.CorrelationData = msg.correlation
        try:
            info = self._client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain, properties=props)
        except ValueError as exc:  # a topic paho refuses, e.g. a bad ResponseTopic
            self.stats.count(msg.kind, "dropped")
            log.error("mqtt publish refused", kind=msg.kind, topic=msg.topic, error=str(exc))
            return True
        with self._cv:
            if info.rc != mqtt.MQTT_ERR_SUCCESS or epoch != self._epoch:
                # The connection went away around this publish: keep it for the next one.
                self._early_acks.pop(info.mid, None)
                if msg.hold:
                    self._outbox.put_front([msg])
                    return False
                if msg.kind not in ("status", "info"):
                    self.stats.count(msg.kind, "dropped")
                return False
            if info.mid not in self._early_acks:
                self._inflight[info.mid] = msg
                return True
            reason = self._early_acks.pop(info.mid)
        self._done(msg, reason)
        return True

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason_code: ReasonCode, properties: Properties
    ) -> None:
        with self._cv:
            msg = self._inflight.pop(mid, None)
            if msg is None:
                # Acknowledged before the sender recorded it; the sender finishes the bookkeeping.
                self._early_acks[mid] = reason_code
                return
            self._cv.notify_all()
        self._done(msg, reason_code)

    def _done(self, msg: Message, reason: ReasonCode) -> None:
        if reason.is_failure:
            self.stats.count(msg.kind, "dropped")
            log.error("mqtt broker refused a message", kind=msg.kind, topic=msg.topic, reason=reason.getName())
        else:
            self.stats.count(msg.kind, "sent")
        with self._cv:
            self._cv.notify_all()

    # --- commands ---------------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        prefix = self.topic("cmd") + "/"
        name = message.topic[len(prefix) :] if message.topic.startswith(prefix) else ""
        if not name or name == "response":
            return
        props = message.properties
        correlation = getattr(props, "CorrelationData", None)
        reply_to = getattr(props, "ResponseTopic", None)
        if reply_to is not None and not self._answerable(reply_to):
            log.warning("command ResponseTopic outside cmd/response; answering there", response_topic=reply_to[:128])
            reply_to = None
        try:
            self._commands.put_nowait((name, bytes(message.payload), correlation, reply_to))
        except queue.Full:
            self._respond(name, correlation, reply_to, {"ok": False, "error": "busy: too many commands waiting"})

    def _answerable(self, reply_to: str) -> bool:
        """Answers go only to cmd/response or below it: else a commander could make the agent
        publish onto a PLC's reject or status topic, which the agent itself may write."""
        base = self.topic("cmd", "response")
        if any(c in reply_to for c in "+#\0"):
            return False
        return reply_to == base or reply_to.startswith(base + "/")

    def _command_loop(self) -> None:
        """Runs handlers off paho's network thread: a reload may take seconds."""
        while not self._commands_closed:
            try:
                item = self._commands.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            name, payload, correlation, reply_to = item
            self._respond(name, correlation, reply_to, self._run_command(name, payload, correlation))

    def _run_command(self, name: str, payload: bytes, correlation: bytes | None) -> dict[str, Any]:
        try:
            command = parse_command(name, payload, correlation=correlation, max_bytes=self.config.command_max_bytes)
        except CommandError as exc:
            log.warning("mqtt command refused", command=name[:64], error=str(exc))
            return {"ok": False, "error": str(exc)}
        if self.handler is None:
            return {"ok": False, "error": "this agent does not accept commands"}
        log.info("mqtt command", command=name, args=command.args.model_dump(by_alias=True))
        try:
            fields = self.handler(command)
        except ValueError as exc:  # the command cannot be done as asked (unknown class, bad checkpoint): say why
            log.warning("mqtt command refused", command=name, error=str(exc))
            return {"ok": False, "error": str(exc)}
        except Exception as exc:
            log.exception("mqtt command failed", command=name)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        if not isinstance(fields, dict):
            return {"ok": False, "error": "handler returned no result"}
        return {**fields, "ok": True}

    def _respond(self, name: str, correlation: bytes | None, reply_to: str | None, outcome: dict[str, Any]) -> None:
        body = {"command": name, "ok": outcome["ok"]}
        body.update((k, v) for k, v in outcome.items() if k not in body)
        topic = reply_to or self.topic("cmd", "response")
        self._enqueue(
            self._message("response", topic, _json(body), self.config.qos, correlation=correlation, part=name[:64])
        )
