"""Real Mosquitto and Redis processes for tests: a pytest plugin (the processes: `bench/brokers.py`).

The agent's delivery guarantees (QoS 1, outboxes that drain after an outage) only mean something
against real brokers, so tests start their own processes on free loopback ports instead of mocking.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.brokers import (
    _EXTRA_BIN_DIRS,
    HOST,
    INSTALL_HINT,
    BrokerBinaryMissingError,
    BrokerServer,
    BrokerStartError,
    MosquittoServer,
    RedisServer,
    find_binary,
    free_port,
    port_open,
)

__all__ = [
    "HOST",
    "INSTALL_HINT",
    "_EXTRA_BIN_DIRS",
    "BrokerBinaryMissingError",
    "BrokerServer",
    "BrokerStartError",
    "MosquittoServer",
    "RedisServer",
    "find_binary",
    "free_port",
    "port_open",
]


def require_binary(name: str, search_path: str | None = None) -> str:
    """Like find_binary, but fails the test (never skips): missing brokers are a setup error."""
    try:
        return find_binary(name, search_path)
    except BrokerBinaryMissingError as e:
        pytest.fail(str(e), pytrace=False)


@contextlib.contextmanager
def _running(server: BrokerServer) -> Iterator[BrokerServer]:
    try:
        server.start()
    except BrokerStartError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoServer]:
    """A Mosquitto shared by the session; tests that stop it must use fresh_mosquitto instead."""
    exe = require_binary(MosquittoServer.binary)
    server = MosquittoServer(tmp_path_factory.mktemp("mosquitto"), executable=exe)
    with _running(server):
        yield server


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis shared by the session; tests that stop it must use fresh_redis instead."""
    exe = require_binary(RedisServer.binary)
    server = RedisServer(tmp_path_factory.mktemp("redis"), executable=exe)
    with _running(server):
        yield server


@pytest.fixture
def fresh_mosquitto(tmp_path: Path) -> Iterator[MosquittoServer]:
    """A Mosquitto of this test alone, free to stop, kill and restart."""
    exe = require_binary(MosquittoServer.binary)
    server = MosquittoServer(tmp_path / "mosquitto", executable=exe)
    with _running(server):
        yield server


@pytest.fixture
def fresh_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test alone, free to stop, kill and restart."""
    exe = require_binary(RedisServer.binary)
    server = RedisServer(tmp_path / "redis", executable=exe)
    with _running(server):
        yield server
