"""Results, reject signals and decisions to MQTT for PLCs; commands from the line back to the agent.

`MqttPublisher` is the line's MQTT sink (a `Publisher`); it puts three parts together:
- agent/publish/mqtt_messages.py: the topics and each message's payload, QoS, retain and expiry;
- agent/publish/mqtt_link.py: the connection (TLS, Last Will, reconnect) and the delivery rules
  (an outbox with an urgent lane for rejects and decisions drained before the results' lane, at
  most `INFLIGHT` unacknowledged, sent on PUBACK, never delivered after the deadline);
- agent/publish/mqtt_commands.py: the command thread (`cmd/<name>` in, `cmd/response` out).

PLC triggers (`<camera>/trigger`) are handed to `on_trigger` on paho's network thread, which must
not block (the service's only queues them, agent/triggers.py); a line without triggered cameras
does not subscribe to them.

The retained status is `online` on connect unless the service gave another (`set_status`:
starting, online, degraded; see agent/line_state.py); `heartbeat` queues one heartbeat.

Stop order: the command thread first (what is queued is still answered, within the time),
then the outbox is flushed, `stopped` is published and the connection closed without
its Last Will.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import paho.mqtt.client as mqtt

from agent.logs import get_logger
from agent.publish.config import MqttConfig
from agent.publish.mqtt_commands import CommandIntake, Handler
from agent.publish.mqtt_link import MqttLink
from agent.publish.mqtt_messages import Message, MqttTopics, encode_json
from agent.publish.outbox import DeliveryStats
from agent.results import Inspection, JsonObject, iso

log = get_logger(__name__)

OnTrigger = Callable[[str, bytes, bool], None]  # camera, payload, retained


class MqttPublisher:
    """One MQTT 5 connection per line: publishes inspections, answers commands, never blocks the pipeline."""

    sink = "mqtt"

    def __init__(
        self,
        config: MqttConfig,
        line_id: str,
        *,
        handler: Handler | None = None,
        client_id: str | None = None,
        on_trigger: OnTrigger | None = None,
    ) -> None:
        self.config = config
        self.line_id = line_id
        self.topics = MqttTopics(config, line_id)
        self._commands = CommandIntake(self.topics, self._send, handler, config.command_max_bytes)
        self._on_trigger = on_trigger
        subscriptions = (self.topics.commands,) + ((self.topics.triggers,) if on_trigger is not None else ())
        self.link = MqttLink(
            config,
            self.topics,
            client_id or config.client_id or f"genclip-{line_id}",
            subscriptions=subscriptions,
            on_message=self._on_message,
        )

    @property
    def stats(self) -> DeliveryStats:
        return self.link.stats

    @property
    def client_id(self) -> str:
        return self.link.client_id

    def topic(self, *parts: str) -> str:
        """`<prefix>/<line>/<parts...>`."""
        return self.topics.topic(*parts)

    def start(self) -> None:
        """Connect in the background: returns at once, and keeps retrying while the broker is unreachable."""
        if self.link.started:
            return
        self._commands.start()
        self.link.start()

    def publish_inspection(self, inspection: Inspection) -> None:
        """Queue the result, and the reject and decision signals; never waits for the broker."""
        for message in self.topics.inspection(inspection):
            self.link.send(message)

    def publish_info(self, info: JsonObject) -> None:
        """Publish retained service info now if connected, and again after every reconnect."""
        self.link.retain(self.topics.info_message(encode_json(info)))

    def publish_lost(self, lost: JsonObject) -> None:
        """Publish the retained `lost` message (parts a killed run never answered), again after reconnects."""
        self.link.retain(self.topics.lost_message(encode_json(lost)))

    def set_status(self, state: str) -> None:
        """The retained status (starting, online, degraded): sent now if connected, and on every reconnect."""
        self.link.retain(self.topics.status_message(state))

    def heartbeat(self, count: int, state: str, reasons: tuple[str, ...]) -> None:
        """Queue one heartbeat (QoS 0: dropped while disconnected); never waits for the broker."""
        self.link.send(self.topics.heartbeat_message(count, state, reasons, iso(datetime.now(UTC))))

    def stop(self, timeout: float = 5.0) -> None:
        """Flush within timeout, announce `stopped`, disconnect cleanly (no Last Will), join the threads."""
        if not self.link.started or self.link.closed:
            return
        end = time.monotonic() + timeout
        self._commands.stop(end)
        self.link.close(end, last=self.topics.status_message("stopped"))

    def health(self) -> tuple[bool, str]:
        """(True, "connected") or (False, why not), e.g. a refused login or an unreachable broker."""
        return self.link.health()

    def startup_problem(self, timeout: float) -> str | None:
        """Why the broker will never take us (a refused login, an untrusted certificate), or None;
        waits up to `timeout` s for the first connection attempt."""
        return self.link.startup_problem(timeout)

    def _send(self, message: Message) -> None:
        self.link.send(message)

    def _on_message(self, message: mqtt.MQTTMessage) -> None:
        """paho's network thread: a trigger goes to `on_trigger`, anything else to the command intake."""
        camera = self.topics.trigger_camera(message.topic) if self._on_trigger is not None else ""
        if camera and self._on_trigger is not None:
            self._on_trigger(camera, bytes(message.payload), bool(message.retain))
        else:
            self._commands.on_message(message)
