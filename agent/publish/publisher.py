"""The `Publisher` protocol: what the service asks of each sink (MQTT for PLCs, Redis Streams for dashboards).

A sink never blocks the pipeline: `start` returns at once (a broker that is down is retried
in the background), `publish_*` only queue. `stop` gets the time the line's stop has left
to deliver what is queued; what it cannot deliver is counted as dropped in `stats`.
"""

from __future__ import annotations

from typing import Protocol

from agent.publish.outbox import DeliveryStats
from agent.results import Inspection, JsonObject


class Publisher(Protocol):
    """One sink of a line's results."""

    @property
    def sink(self) -> str:
        """Its name in metrics (`sink` label) and health reasons: "mqtt", "redis"."""

    @property
    def stats(self) -> DeliveryStats:
        """Delivery counters per message kind, read at scrape time."""

    def start(self) -> None:
        """Connect in the background; returns at once."""

    def startup_problem(self, timeout: float) -> str | None:
        """Why the broker will never take us (wrong password, untrusted certificate), or None; waits up to
        `timeout` s for the first answer."""

    def publish_inspection(self, inspection: Inspection) -> None:
        """Queue one frame's results; never waits for the broker."""

    def publish_info(self, info: JsonObject) -> None:
        """Publish the line's info (retained / stored), replacing the last."""

    def health(self) -> tuple[bool, str]:
        """(True, "connected") or (False, why not)."""

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued within `timeout`, then close."""
