"""SystemdNotifier against a real datagram socket standing in for systemd's."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.systemd import SystemdNotifier


@pytest.fixture
def notify_socket(monkeypatch) -> Iterator[socket.socket]:
    # AF_UNIX paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    folder = Path(tempfile.mkdtemp(prefix="sd-"))
    path = folder / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()
    path.unlink()
    folder.rmdir()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_messages(notify_socket):
    notifier = SystemdNotifier()
    assert notifier.enabled
    notifier.ready()
    assert received(notify_socket) == "READY=1"
    notifier.status("scoring 3 cameras\nREADY=1")
    assert received(notify_socket) == "STATUS=scoring 3 cameras READY=1"  # no field smuggled in
    notifier.watchdog()
    assert received(notify_socket) == "WATCHDOG=1"
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    first, second = received(notify_socket).split("\n")
    assert first == "RELOADING=1"
    key, usec = second.split("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.stopping()
    assert received(notify_socket) == "STOPPING=1"


def test_no_op_without_notify_socket(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    for call in (notifier.ready, notifier.reloading, notifier.stopping, notifier.watchdog):
        call()
    notifier.status("fine")


def test_socket_that_is_gone_is_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    notifier = SystemdNotifier()
    assert not notifier.enabled
    notifier.ready()


def test_peer_closing_later_is_not_fatal(notify_socket):
    notifier = SystemdNotifier()
    notify_socket.close()
    notifier.ready()
    notifier.watchdog()


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("20000000", None, 10.0),
        ("20000000", "self", 10.0),
        ("20000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
        ("3000000", "not-a-pid", None),
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    assert SystemdNotifier.watchdog_interval() == expected
