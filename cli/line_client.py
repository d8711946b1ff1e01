"""An operator's MQTT 5 session with a running line: read its retained info and status, send one command and wait.

`LineSession` connects with the operator's account (never the agent's: the shipped broker ACL lets an agent
account read commands, not send them), then

- `read()` subscribes to `<prefix>/<line>/info` and `<prefix>/<line>/status` and returns their retained
  payloads (None for a topic with nothing retained, once `RETAINED_GRACE_S` has passed after the SUBACK);
- `request(name, args)` subscribes to its own reply topic `<prefix>/<line>/cmd/response/<client id>` (the
  agent answers only there or on `cmd/response` itself; the operator may read `cmd/response/#`), publishes
  the JSON object `args` to `<prefix>/<line>/cmd/<name>` at QoS 1 with that ResponseTopic and a fresh
  CorrelationData, and returns the answer that carries the same CorrelationData.

Every wait ends at one deadline, `timeout` seconds after the session opened. What goes wrong is an exception
that says what did not answer: `BrokerUnreachableError` (no TCP/TLS session), `BrokerRefusedError` (CONNACK or PUBACK
with a failure reason: credentials, ACL), `NoAnswerError` (the broker took the command, the line said nothing).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.publish.config import MqttConfig
from agent.publish.mqtt_messages import MqttTopics

RETAINED_GRACE_S = 1.0
"""How long after the SUBACK a retained message may still come; the broker sends them right behind it."""

Answer = dict[str, object]  # a command's answer, as the agent sends it: {"command": ..., "ok": ..., ...}


class LineError(Exception):
    """The session could not do what was asked; the message says what did not answer and why."""


class BrokerUnreachableError(LineError):
    """No connection to the broker (refused, timed out, TLS failed)."""


class BrokerRefusedError(LineError):
    """The broker answered and said no: the account's credentials (CONNACK) or the ACL (PUBACK)."""


class NoAnswerError(LineError):
    """The broker took the command (or the subscription) but the line sent nothing back in time."""


@dataclass(frozen=True, slots=True)
class Operator:
    """Who connects: the operator's account, never the agent's ([mqtt].username of the line's config)."""

    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a traceback or log line
    cert_file: Path | None = None  # a TLS client certificate of the operator's, where the broker asks for one
    key_file: Path | None = None


@dataclass(frozen=True, slots=True)
class LineView:
    """A line as the broker keeps it: the retained info document and status word (None: nothing retained)."""

    info: dict[str, object] | None
    status: str | None


class LineSession:
    """One MQTT 5 session with the broker of a line; use it as a context manager."""

    def __init__(self, config: MqttConfig, line: str, operator: Operator, timeout: float) -> None:
        self.topics = MqttTopics(config, line)
        self.config = config
        self.line = line
        self.timeout = timeout
        self.client_id = f"genclip-line-{uuid.uuid4().hex[:12]}"
        self._deadline = 0.0
        self._lock = threading.Condition()
        self._connack: ReasonCode | None = None
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: dict[int, ReasonCode] = {}
        self._retained: dict[str, bytes] = {}
        self._answers: dict[bytes, bytes] = {}
        self._client = self._build(operator)

    # --- the session ------------------------------------------------------------------------------------
    def __enter__(self) -> LineSession:
        self._deadline = time.monotonic() + self.timeout
        where = f"{self.config.host}:{self.config.port}"
        self._client.connect_timeout = max(0.1, self.timeout)
        try:
            self._client.connect(self.config.host, self.config.port, keepalive=max(5, int(self.timeout) + 5))
        except ssl.SSLError as exc:
            raise BrokerUnreachableError(f"TLS with the broker at {where} failed: {exc} (check [mqtt.tls])") from None
        except OSError as exc:  # refused, unreachable, timed out
            raise BrokerUnreachableError(f"cannot reach the broker at {where}: {exc}") from None
        self._client.loop_start()
        if not self._wait(lambda: self._connack is not None):
            self._close()
            raise BrokerUnreachableError(f"the broker at {where} did not answer the connect within {self.timeout:g} s")
        assert self._connack is not None
        if self._connack.is_failure:
            self._close()
            raise BrokerRefusedError(
                f"the broker at {where} refused the connection: {self._connack} (give the operator's account "
                "with --username and --password-file or $GENCLIP_OPERATOR_PASSWORD)"
            )
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._close()

    # --- what an operator does --------------------------------------------------------------------------
    def read(self) -> LineView:
        """The retained info and status of the line."""
        info_topic, status_topic = self.topics.topic("info"), self.topics.status
        self._subscribe([info_topic, status_topic])
        grace = min(self._deadline, time.monotonic() + RETAINED_GRACE_S)
        self._wait(lambda: info_topic in self._retained and status_topic in self._retained, grace)
        with self._lock:
            info_raw, status_raw = self._retained.get(info_topic), self._retained.get(status_topic)
        info = None
        if info_raw is not None:
            try:
                data = json.loads(info_raw)
            except ValueError as exc:
                raise LineError(f"the retained {info_topic} is not JSON: {exc}") from None
            info = data if isinstance(data, dict) else None
        status = status_raw.decode("utf-8", "replace") if status_raw is not None else None
        return LineView(info=info, status=status)

    def request(self, name: str, args: dict[str, object]) -> Answer:
        """Send one command and return the line's answer to it (also when it says ok: false)."""
        reply_to = self.topics.topic("cmd", "response", self.client_id)
        self._subscribe([reply_to, self.topics.status])
        correlation = uuid.uuid4().bytes
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_to
        props.CorrelationData = correlation
        topic = self.topics.topic("cmd", name)
        sent = self._client.publish(topic, json.dumps(args), qos=1, properties=props)
        if not self._wait(lambda: sent.mid in self._pubacks):
            raise NoAnswerError(f"the broker did not acknowledge the command on {topic} within {self.timeout:g} s")
        if self._pubacks[sent.mid].is_failure:
            raise BrokerRefusedError(
                f"the broker refused the command on {topic}: {self._pubacks[sent.mid]} (the account "
                f"{'given' if self._client.username else 'anonymous'} may not send commands: the shipped ACL allows "
                "genclip-operator, not the agent's own account)"
            )
        if not self._wait(lambda: correlation in self._answers):
            with self._lock:
                status = self._retained.get(self.topics.status)
            said = f"its status: {status.decode('utf-8', 'replace')}" if status else "no retained status"
            raise NoAnswerError(
                f"line {self.line!r} did not answer {name} within {self.timeout:g} s ({said}); is its agent "
                f"running and connected to {self.config.host}:{self.config.port}?"
            )
        try:
            answer = json.loads(self._answers[correlation])
        except ValueError as exc:
            raise LineError(f"the line's answer is not JSON: {exc}") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
            raise LineError(f"the line's answer is not a command answer: {str(answer)[:200]}")
        return answer

    # --- paho ---------------------------------------------------------------------------------------------
    def _build(self, operator: Operator) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5)
        if operator.username is not None:
            client.username_pw_set(operator.username, operator.password)
        tls = self.config.tls
        if tls.enabled:
            try:
                client.tls_set(
                    ca_certs=str(tls.ca_file) if tls.ca_file else None,
                    certfile=str(operator.cert_file) if operator.cert_file else None,
                    keyfile=str(operator.key_file) if operator.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                )
            except (ssl.SSLError, OSError, ValueError) as exc:
                raise BrokerRefusedError(f"cannot load the TLS files: {exc}") from None
            client.tls_insecure_set(tls.insecure)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, reason: ReasonCode, _p: object) -> None:
        with self._lock:
            self._connack = reason
            self._lock.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, reasons: list[ReasonCode], _p: object) -> None:
        with self._lock:
            self._subacks[mid] = reasons
            self._lock.notify_all()

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, reason: ReasonCode, _p: object) -> None:
        with self._lock:
            self._pubacks[mid] = reason
            self._lock.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        correlation = getattr(message.properties, "CorrelationData", None)
        with self._lock:
            if correlation is not None and message.topic.startswith(self.topics.responses):
                self._answers[bytes(correlation)] = bytes(message.payload)
            elif message.retain:
                self._retained[message.topic] = bytes(message.payload)
            self._lock.notify_all()

    def _subscribe(self, topics: list[str]) -> None:
        result, mid = self._client.subscribe([(topic, 1) for topic in topics])
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerUnreachableError(f"lost the broker while subscribing: {mqtt.error_string(result)}")
        if not self._wait(lambda: mid in self._subacks):
            raise NoAnswerError(f"the broker did not acknowledge the subscription within {self.timeout:g} s")
        refused = [t for t, r in zip(topics, self._subacks[mid], strict=False) if r.is_failure]
        if refused:
            raise BrokerRefusedError(f"the broker refused the subscription to {', '.join(refused)}")

    def _wait(self, condition: Callable[[], bool], until: float | None = None) -> bool:
        end = self._deadline if until is None else until
        with self._lock:
            return self._lock.wait_for(condition, max(0.0, end - time.monotonic()))

    def _close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
