"""Commands from the line over MQTT: `cmd/<name>` in, parsed, run, answered on `cmd/response`.

paho's network thread only queues a command (at most `COMMAND_QUEUE`; beyond that the
commander is told "busy" at once); one thread, `mqtt-commands-<line>`, parses it
(agent/control.py), runs the handler (the service's: agent/commands.py) and queues the
answer with the request's CorrelationData, to the request's ResponseTopic when that is
`cmd/response` or below it, else to `cmd/response`. A reload may take seconds: publishing
results never waits for it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from agent.control import Answer, Command, CommandError, parse_command
from agent.logs import get_logger
from agent.publish.mqtt_messages import Message, MqttTopics

log = get_logger("agent.publish.mqtt")

COMMAND_QUEUE = 32

Handler = Callable[[Command], Answer]  # the fields of the answer; raises ValueError with the reason to tell
Request = tuple[str, bytes, bytes | None, str | None]  # name, payload, CorrelationData, ResponseTopic


class CommandIntake:
    """The command thread of one line: requests in from paho, answers out through `send`."""

    def __init__(
        self, topics: MqttTopics, send: Callable[[Message], None], handler: Handler | None, max_bytes: int
    ) -> None:
        self.topics = topics
        self.handler = handler
        self._send = send
        self._max_bytes = max_bytes
        self._closed = False
        self._requests: queue.Queue[Request | None] = queue.Queue(COMMAND_QUEUE)
        self._thread = threading.Thread(target=self._loop, name=f"mqtt-commands-{topics.line_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, end: float) -> None:
        """Run what is queued until the monotonic time `end`; when the queue is full, nothing more is run."""
        try:
            self._requests.put_nowait(None)
        except queue.Full:  # commands still queued are not run
            self._closed = True
        self._thread.join(max(0.0, end - time.monotonic()))

    def on_message(self, message: mqtt.MQTTMessage) -> None:
        """paho's network thread: queue a request on `cmd/<name>`, never run it here."""
        name = self.topics.command_name(message.topic)
        if not name:
            return
        props = message.properties
        correlation = getattr(props, "CorrelationData", None)
        reply_to = getattr(props, "ResponseTopic", None)
        if reply_to is not None and not self.topics.answerable(reply_to):
            log.warning("command ResponseTopic outside cmd/response; answering there", response_topic=reply_to[:128])
            reply_to = None
        try:
            self._requests.put_nowait((name, bytes(message.payload), correlation, reply_to))
        except queue.Full:
            self._respond(name, correlation, reply_to, {"ok": False, "error": "busy: too many commands waiting"})

    def _loop(self) -> None:
        """Runs handlers off paho's network thread: a reload may take seconds."""
        while not self._closed:
            try:
                item = self._requests.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            name, payload, correlation, reply_to = item
            self._respond(name, correlation, reply_to, self._run(name, payload, correlation))

    def _run(self, name: str, payload: bytes, correlation: bytes | None) -> Answer:
        try:
            command = parse_command(name, payload, correlation=correlation, max_bytes=self._max_bytes)
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

    def _respond(self, name: str, correlation: bytes | None, reply_to: str | None, outcome: Answer) -> None:
        body: Answer = {"command": name, "ok": outcome["ok"]}
        body.update((k, v) for k, v in outcome.items() if k not in body)
        self._send(self.topics.response_message(name, correlation, reply_to, body))
