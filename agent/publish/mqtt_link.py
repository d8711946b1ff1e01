"""The MQTT 5 connection of a line: connect, TLS, Last Will, reconnect, and the delivery of queued messages.

Delivery: everything goes through one sender thread that publishes only while
connected and keeps at most `INFLIGHT` QoS >= 1 messages unacknowledged, so paho's own
unbounded queue never holds our backlog. The outbox has two lanes (`LaneOutbox`), each
bounded by `[mqtt].outbox_size` and dropping its own oldest: the urgent lane (rejects,
decisions, status, info, heartbeat, command responses: every kind but `result`) is always
drained first, and results may hold at most `INFLIGHT - URGENT_RESERVE` of the unacknowledged
slots, so a results backlog can neither delay nor evict a reject. Order is kept within a lane:
decisions and rejects go out in the order they were queued (capture order per camera), results
likewise, but a reject may overtake results queued before it.

A message counts as sent on its PUBACK; one in flight when the connection drops goes back to
the front of its lane in its original order (QoS 1 allows the duplicate, not the loss), so
after a reconnect the held rejects and decisions are sent first, still in capture order, then
the held results. Messages with a deadline (rejects, decisions) expire in the broker
(MessageExpiryInterval): the interval is the time left rounded DOWN to whole seconds, 1 s with
under a second left (the shortest MQTT has), and one with less than `[mqtt].send_margin_ms` left
(the time it needs to reach the PLC) is not sent at all and is counted as expired
(`signal_expiry`): the PLC rejects on silence past the deadline.
Messages that are not held across a disconnect (status, info, heartbeat, QoS 0 results) are
dropped with it; the status (`online` unless one was given to `retain`) and the retained
messages lead every new connection instead.
"""

from __future__ import annotations

import dataclasses
import itertools
import ssl
import sys
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.logs import get_logger
from agent.publish.config import MqttConfig
from agent.publish.mqtt_messages import KINDS, Message, MqttTopics, is_urgent, signal_expiry
from agent.publish.outbox import DeliveryStats, LaneOutbox, link_health

log = get_logger("agent.publish.mqtt")

INFLIGHT = 20  # unacknowledged QoS >= 1 messages at once; Mosquitto's default receive maximum
URGENT_RESERVE = 5  # of those, slots results may never take: a reject never waits for results' PUBACKs
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
RESENT_ON_CONNECT = ("status", "info")  # not lost with a connection: sent again on the next one

OnMessage = Callable[[mqtt.MQTTMessage], None]


def sendable(outbox: LaneOutbox[Message], inflight: dict[int, Message]) -> tuple[bool, bool]:
    """(an urgent message may go now, a result may go now): urgent ones while fewer than INFLIGHT
    await a PUBACK; results only while fewer than INFLIGHT - URGENT_RESERVE results do."""
    room = len(inflight) < INFLIGHT
    urgent = room and bool(outbox.urgent_lane)
    if not room or not outbox.bulk_lane:
        return urgent, False
    return urgent, sum(1 for m in inflight.values() if not is_urgent(m)) < INFLIGHT - URGENT_RESERVE


class MqttLink:
    """One MQTT 5 connection: sends queued messages in order while connected, never blocks its callers."""

    def __init__(
        self,
        config: MqttConfig,
        topics: MqttTopics,
        client_id: str,
        *,
        subscriptions: tuple[str, ...] = (),
        on_message: OnMessage | None = None,
    ) -> None:
        self.config = config
        self.topics = topics
        self.client_id = client_id
        self._subscriptions = subscriptions
        self._on_message = on_message
        self._cv = threading.Condition()
        self._outbox: LaneOutbox[Message] = LaneOutbox(
            config.outbox_size, is_urgent, on_drop=self._overflow, cond=self._cv
        )
        self.stats = DeliveryStats(KINDS, depth=lambda: len(self._outbox))
        self._order = itertools.count()
        self._inflight: dict[int, Message] = {}
        self._early_acks: dict[int, ReasonCode] = {}
        self._epoch = 0  # bumped on every disconnect, to spot a publish that raced with it
        self._connected = False
        self._closing = False
        self._closed = False
        self._started = False
        self._problem = "connecting"
        self._fatal: str | None = None  # a problem no retry fixes (refused login, untrusted certificate)
        self._attempted = threading.Event()  # set once the first connection attempt has an outcome
        self._refused = False  # this attempt's CONNACK refused us (paho disconnects after it)
        self._retained: dict[str, Message] = {}  # by kind: sent now if connected, and after every reconnect
        self._client = self._make_client()
        self._sender = threading.Thread(target=self._send_loop, name=f"mqtt-send-{topics.line_id}", daemon=True)

    @property
    def started(self) -> bool:
        return self._started

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        """Connect in the background: returns at once, and keeps retrying while the broker is unreachable."""
        self._started = True
        self._sender.start()
        self._client.connect_async(
            self.config.host, self.config.port, keepalive=self.config.keepalive_s, clean_start=True
        )
        self._client.loop_start()
        log.info("mqtt starting", host=self.config.host, port=self.config.port, client_id=self.client_id)

    def send(self, msg: Message) -> None:
        """Queue a message; dropped (and counted) while closing, or when QoS 0 and not connected."""
        with self._cv:
            if self._closing or self._closed or (msg.qos == 0 and not self._connected):
                self.stats.count(msg.kind, "dropped")
                return
            self._queue([msg])

    def retain(self, msg: Message) -> None:
        """Send now if connected, and again at the start of every later connection (the latest per kind)."""
        with self._cv:
            self._retained[msg.kind] = msg
            if self._connected:
                self._queue([dataclasses.replace(msg)])

    def close(self, end: float, last: Message) -> None:
        """Flush until the monotonic time `end`, send `last` if connected, disconnect cleanly (no Last Will)."""
        with self._cv:
            self._cv.wait_for(lambda: not self._outbox and not self._inflight, max(0.0, end - time.monotonic()))
            if self._connected:
                self._queue([last])
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
        client.will_set(self.topics.status, b"offline", qos=1, retain=True)
        # paho takes floats here too (its own default is 1 s .. 120 s); its stubs say int.
        client.reconnect_delay_set(self.config.reconnect_min_s, self.config.reconnect_max_s)  # type: ignore[arg-type]
        client.max_inflight_messages_set(INFLIGHT)
        if self.config.username is not None:
            password = self.config.password.get_secret_value() if self.config.password is not None else None
            client.username_pw_set(self.config.username, password)
        if self.config.tls.enabled:
            self._set_tls(client)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        if self._on_message is not None:
            on_message = self._on_message
            client.on_message = lambda _client, _userdata, message: on_message(message)
        return client

    def _set_tls(self, client: mqtt.Client) -> None:
        tls = self.config.tls
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
        for topic in self._subscriptions:  # retain as published: a retained trigger is seen as one, and refused
            client.subscribe(topic, options=SubscribeOptions(qos=1, noLocal=True, retainAsPublished=True))
        with self._cv:
            # The latest status given to `retain` (the service's starting/online/degraded), else online.
            status = self._retained.get("status", self.topics.status_message("online"))
            first = [dataclasses.replace(status)]
            first += [dataclasses.replace(msg) for kind, msg in self._retained.items() if kind != "status"]
            self._queue(first, front=True)
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
            if msg.kind not in RESENT_ON_CONNECT:
                self.stats.count(msg.kind, "dropped")
        if was_connected and not self._closing:
            self._report(f"connection lost: {reason_code.getName()}", False)
        elif not refused and not self._closing:
            # Closed before any CONNACK: e.g. a plain client at a TLS listener, or a broker at its limit.
            hint = "" if self.config.tls.enabled else " (if [mqtt].port is a TLS listener, enable [mqtt.tls])"
            self._report(f"broker closed the connection before accepting it: {reason_code.getName()}{hint}", False)

    # --- sending ----------------------------------------------------------------------------------

    def _queue(self, messages: list[Message], *, front: bool = False) -> None:
        """Stamp the messages' order and queue them (under the lock): at the back, or untrimmed at the front."""
        for msg in messages:
            msg.order = next(self._order)
        if front:
            self._outbox.put_front(messages, trim=False)
        else:
            for msg in messages:
                self._outbox.put(msg)

    def _overflow(self, msg: Message) -> None:
        self.stats.count(msg.kind, "dropped")
        log.warning("mqtt outbox full, oldest message dropped", kind=msg.kind, part=msg.part)

    def _ready(self) -> bool:
        return self._closing or (self._connected and any(sendable(self._outbox, self._inflight)))

    def _send_loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(self._ready)
                if self._closing:
                    return
                msg = self._outbox.pop(bulk=sendable(self._outbox, self._inflight)[1])
                epoch = self._epoch
            if msg is not None and not self._send(msg, epoch):
                time.sleep(0.05)  # the connection is going; let paho notice before trying again

    def _send(self, msg: Message, epoch: int) -> bool:
        """Publish one message; False when the connection was gone and the message went back."""
        props = Properties(PacketTypes.PUBLISH)
        if msg.deadline is not None:
            left = msg.deadline - time.monotonic()
            expiry = signal_expiry(left - self.config.send_margin_ms / 1000.0)
            if expiry is None:
                self.stats.count(msg.kind, "expired")
                log.warning(
                    "mqtt message expired before it could be sent", kind=msg.kind, part=msg.part, left_s=round(left, 3)
                )
                return True
            props.MessageExpiryInterval = expiry
        elif msg.expiry_s is not None:
            props.MessageExpiryInterval = msg.expiry_s
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
                if msg.kind not in RESENT_ON_CONNECT:
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
