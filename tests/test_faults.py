"""Faults: brokers SIGKILLed, cameras that stall, the agent killed, bad checkpoints, a blocked done/ folder.

Each test runs the whole service against real Mosquitto and Redis processes on loopback, breaks one
thing while parts flow, and checks that the agent keeps working and that nothing it accepted is lost
without being counted: after each scenario the frame identity holds (accepted = published + dropped
by reason + expired + in flight, in flight 0 after a clean stop). Measured figures are printed
(`pytest -s -m fault` shows them).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import InspectConfig
from agent.service import InspectionService
from tests.brokers import MosquittoServer, RedisServer
from tests.faults_support import (
    Subscriber,
    assert_identity,
    come_back,
    crash,
    duplicates,
    fault_config,
    now_utc,
    parse_time,
    synthetic_camera,
    wait_for,
)

pytestmark = pytest.mark.fault


@pytest.fixture
def running() -> Iterator[Any]:
    """Starts services; whatever a failing test left running is stopped."""
    services: list[InspectionService] = []

    def start(cfg: InspectConfig) -> InspectionService:
        service = InspectionService(cfg)
        services.append(service)
        service.start()
        return service

    yield start
    for service in services:
        if not service._stop.is_set():
            service.shutdown()


# --- 1. the MQTT broker SIGKILLed ten times ------------------------------------------------------------------
KILLS = 10
LONG_OUTAGE = 6  # this outage outlasts the decision window, so some rejects must expire in the agent
WINDOW_MS = 2500


def test_mqtt_broker_killed_ten_times_every_reject_delivered_or_expired(
    fresh_mosquitto: MosquittoServer, redis_server: RedisServer, running
):
    """Rejects are kept in the agent's outbox until PUBACK and resent after each crash.

    What the agent can promise: every reject it produced is acknowledged by a broker (and so reaches
    a subscriber whose session the broker kept) or counted as expired once its deadline has passed;
    QoS 1 allows duplicates. The subscriber comes back within 0.2 s of each restart and the broker is
    only killed again after the subscriber is back and new rejects reach it, so what a broker
    acknowledged was handed to the subscriber before the next crash (Mosquitto persists to disk only
    every second: a message acknowledged and killed within that second, while the subscriber is away,
    would be the broker's loss, not the agent's).
    """
    broker = fresh_mosquitto
    line = "kill-mqtt"
    plc = Subscriber(broker.port, [f"genclip/{line}/+/reject"], client_id="plc-kill-mqtt")
    wait_for(plc.connected.is_set, 10, "the subscriber")
    cameras = [synthetic_camera(f"cam-{i}", seed=i, fps=3, queue_size=4) for i in (1, 2)]
    cfg = fault_config(broker.port, redis_server.url, line, cameras, mqtt={"decision_window_ms": WINDOW_MS})
    service = running(cfg)
    wait_for(lambda: len(plc.of("/reject")) >= 2, 60, "rejects before the first crash")
    time.sleep(1.2)  # the broker's autosave (1 s) has written the subscriber's session

    outages: list[tuple[Any, Any]] = []  # (killed at, agent connected again at), wall clock
    reconnect_s: list[float] = []
    for kill in range(1, KILLS + 1):
        seen = len(plc.of("/reject"))
        killed_at = now_utc()
        crash(broker)
        wait_for(lambda: not service.mqtt.health()[0], 5, "the agent to notice the crash")
        time.sleep(5.0 if kill == LONG_OUTAGE else 0.3 + 0.1 * (kill % 4))
        restarted = time.monotonic()
        come_back(broker)
        wait_for(lambda: service.mqtt.health()[0], 15, f"the agent to reconnect ({kill})")
        reconnect_s.append(time.monotonic() - restarted)
        outages.append((killed_at, now_utc()))
        wait_for(plc.connected.is_set, 10, "the subscriber to reconnect")
        wait_for(lambda n=seen: len(plc.of("/reject")) > n, 20, f"a reject after restart {kill}")
        time.sleep(1.2)  # autosave, and the next crash never hits a broker that just started

    wait_for(lambda: service.mqtt.stats.queued == 0, 15, "the agent's outbox to drain")
    service.shutdown()
    counts = assert_identity(service)
    time.sleep(1.0)
    plc.close()

    # Every reject the agent produced, from the Redis stream (Redis stayed up): verdict NG or ERROR.
    import json

    import redis

    entries = redis.Redis.from_url(redis_server.url).xrange(f"genclip:{line}:results")
    results = [json.loads(fields[b"payload"]) for _, fields in entries]
    assert len(results) == counts["published"]
    produced = {r["part_id"]: r for r in results if r["verdict"] != "OK"}
    stats = service.mqtt.stats.snapshot()["reject"]
    assert stats["sent"] + stats["expired"] + stats["dropped"] == len(produced), stats
    assert stats["dropped"] == 0, stats

    got = [r["part_id"] for r in plc.of("/reject")]
    assert set(got) <= set(produced)
    missing = sorted(set(produced) - set(got), key=lambda p: produced[p]["captured_at"])
    dups = duplicates(got)
    print(
        f"\nmqtt kills={KILLS} frames={counts['published']} rejects={len(produced)} delivered={len(set(got))} "
        f"deliveries={len(got)} duplicates={sum(n - 1 for n in dups.values())} on {len(dups)} parts {dups} "
        f"expired={stats['expired']} missing={missing}\n"
        f"agent reconnect after restart: median {statistics.median(reconnect_s):.2f} s, max {max(reconnect_s):.2f} s"
    )
    # Nothing acknowledged was lost: what did not arrive is exactly what the agent counted as expired.
    assert len(missing) == stats["expired"], (missing, stats)
    assert stats["expired"] >= 1  # the long outage outlasted the decision window
    window = WINDOW_MS / 1000
    for part in missing:  # and each of them had its deadline pass while the broker was away
        deadline = parse_time(produced[part]["captured_at"]).timestamp() + window
        assert any(k.timestamp() - 0.5 <= deadline <= back.timestamp() + 1.0 for k, back in outages), part
    assert len(set(got)) >= len(produced) - stats["expired"] > len(produced) // 2
