"""The Redis stream publisher against a real redis-server: entries, maps, info, outages and overflow."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from agent.publish.config import RedisConfig
from agent.publish.redis_streams import RedisStreamPublisher
from agent.results import results_stream
from tests.brokers import RedisServer
from tests.test_publish_mqtt import make_inspection, wait_until

pytestmark = pytest.mark.timeout(60)

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32


@pytest.fixture
def line() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def publishers() -> Iterator[list[RedisStreamPublisher]]:
    made: list[RedisStreamPublisher] = []
    yield made
    for p in made:
        p.stop(timeout=1.0)


def start_publisher(made: list[RedisStreamPublisher], url: str, line: str, **overrides: Any) -> RedisStreamPublisher:
    config = RedisConfig(url=url, reconnect_min_s=0.05, reconnect_max_s=0.2, **overrides)
    pub = RedisStreamPublisher(config, line)
    made.append(pub)
    pub.start()
    return pub


def entries(url: str, line: str) -> list[dict[str, str]]:
    with redis.Redis.from_url(url, decode_responses=True, socket_timeout=5) as r:
        return [fields for _, fields in r.xrange(results_stream(line))]


def test_results_maps_and_info(redis_server: RedisServer, publishers: list[RedisStreamPublisher], line: str) -> None:
    pub = start_publisher(publishers, redis_server.url, line, map_ttl_s=120)
    sent = [
        make_inspection(line, 1, "OK"),
        make_inspection(line, 2, "NG", map_png=PNG),
        make_inspection(line, 3, "ERROR", camera="cam-2"),
    ]
    for insp in sent:
        pub.publish_inspection(insp)
    pub.publish_info({"version": "1.2.3"})
    assert wait_until(lambda: pub.stats["result"].sent == 3 and pub.stats["info"].sent == 1)

    got = entries(redis_server.url, line)
    assert [json.loads(e.pop("payload")) for e in got] == [i.result for i in sent]
    assert got == [
        {"camera": "cam-1", "verdict": "OK", "score": "0.12"},
        {"camera": "cam-1", "verdict": "NG", "score": "0.91"},
        {"camera": "cam-2", "verdict": "ERROR", "score": ""},
    ]
    with redis.Redis.from_url(redis_server.url, socket_timeout=5) as r:
        key = sent[1].result["map_key"]
        assert key == f"genclip:{line}:map:cam-1:2"
        assert r.get(key) == PNG and 0 < r.ttl(key) <= 120
        assert r.exists(sent[0].result["map_key"]) == 0
        assert json.loads(r.get(f"genclip:{line}:info")) == {"version": "1.2.3"}
        assert r.ttl(f"genclip:{line}:info") == -1
    assert pub.stats.snapshot() == {
        "connected": True,
        "queued": 0,
        "result": {"sent": 3, "dropped": 0, "expired": 0},
        "map": {"sent": 1, "dropped": 0, "expired": 0},
        "info": {"sent": 1, "dropped": 0, "expired": 0},
    }
    assert pub.health() == (True, "connected")


def test_stream_is_trimmed(redis_server: RedisServer, publishers: list[RedisStreamPublisher], line: str) -> None:
    pub = start_publisher(publishers, redis_server.url, line, stream_maxlen=10)
    for seq in range(1, 501):
        pub.publish_inspection(make_inspection(line, seq, "OK"))
    assert wait_until(lambda: pub.stats["result"].sent == 500)
    assert len(entries(redis_server.url, line)) < 500  # MAXLEN ~ trims whole nodes, never below 10


def test_outage_buffers_in_order(fresh_redis: RedisServer, publishers: list[RedisStreamPublisher], line: str) -> None:
    pub = start_publisher(publishers, fresh_redis.url, line)
    pub.publish_inspection(make_inspection(line, 1, "OK"))
    assert wait_until(lambda: pub.stats["result"].sent == 1)

    fresh_redis.stop()
    for seq in range(2, 12):
        pub.publish_inspection(make_inspection(line, seq, "NG" if seq % 2 else "OK"))
    assert wait_until(lambda: not pub.health()[0])
    assert pub.health()[1].startswith("redis unreachable"), pub.health()
    assert pub.stats.queued == 10

    fresh_redis.restart()
    assert wait_until(lambda: pub.stats["result"].sent == 11), pub.stats.snapshot()
    assert [json.loads(e["payload"])["seq"] for e in entries(fresh_redis.url, line)] == list(range(1, 12))
    assert pub.health() == (True, "connected") and pub.stats["result"].dropped == 0


def test_overflow_drops_oldest(fresh_redis: RedisServer, publishers: list[RedisStreamPublisher], line: str) -> None:
    fresh_redis.stop()
    began = time.monotonic()
    pub = start_publisher(publishers, fresh_redis.url, line, outbox_size=5)
    assert time.monotonic() - began < 1.0, "start() blocked on a Redis that is down"
    assert wait_until(lambda: pub.health()[1].startswith("redis unreachable"))
    for seq in range(1, 9):
        pub.publish_inspection(make_inspection(line, seq, "OK"))
    # The writer may hold the oldest for a failing attempt; it goes back in the count when returned.
    assert wait_until(lambda: pub.stats["result"].dropped == 3 and pub.stats.queued == 5), pub.stats.snapshot()

    fresh_redis.restart()
    assert wait_until(lambda: pub.stats["result"].sent == 5)
    assert [json.loads(e["payload"])["seq"] for e in entries(fresh_redis.url, line)] == [4, 5, 6, 7, 8]


def test_stop_flushes_then_counts_the_rest(
    fresh_redis: RedisServer, publishers: list[RedisStreamPublisher], line: str
) -> None:
    pub = start_publisher(publishers, fresh_redis.url, line)
    for seq in range(1, 4):
        pub.publish_inspection(make_inspection(line, seq, "OK"))
    pub.stop(timeout=2.0)
    assert pub.stats["result"].sent == 3 and pub.health() == (False, "stopped")

    down = start_publisher(publishers, fresh_redis.url, f"{line}-b")
    fresh_redis.stop()
    down.publish_inspection(make_inspection(line, 1, "OK"))
    began = time.monotonic()
    down.stop(timeout=0.5)
    assert time.monotonic() - began < 2.0
    assert down.stats["result"].dropped == 1


def test_stopping_while_redis_refuses_backs_off_instead_of_spinning(
    publishers: list[RedisStreamPublisher], line: str
) -> None:
    """While the stop waits for a Redis that is down, retries keep their backoff (no connection storm)."""
    attempts = []
    with socket.socket() as server:  # accepts, then hangs up at once: every attempt fails
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        server.settimeout(0.1)
        url = f"redis://127.0.0.1:{server.getsockname()[1]}/0"
        pub = start_publisher(publishers, url, line)  # backoff 0.05 s growing to 0.2 s
        pub.publish_inspection(make_inspection(line, 1, "OK"))
        stopper = threading.Thread(target=pub.stop, kwargs={"timeout": 2.0})
        time.sleep(0.3)
        stopper.start()
        while stopper.is_alive():
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                attempts.append(time.monotonic())
                conn.close()
        stopper.join()
    assert pub.stats["result"].dropped == 1
    # 2 s at a backoff growing to 0.2 s: a dozen tries or so (a spin made hundreds).
    assert len(attempts) < 30, len(attempts)
