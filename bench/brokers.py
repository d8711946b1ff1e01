"""Real Mosquitto and Redis processes on free loopback ports, for tests and benchmarks.

The agent's delivery guarantees (QoS 1, outboxes that drain after an outage) only mean something
against real brokers, so tests and `genclip bench agent` start their own processes instead of
mocking or touching the line's brokers. `tests/brokers.py` wraps these in pytest fixtures.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import ClassVar

HOST = "127.0.0.1"
INSTALL_HINT = (
    "install the brokers with `bash deploy/services.sh install` "
    "(as root; or: apt-get install -y mosquitto mosquitto-clients redis-server)"
)
# Debian puts mosquitto in /usr/sbin, which is not on every PATH.
_EXTRA_BIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class BrokerBinaryMissingError(RuntimeError):
    """A broker executable is not installed; the message says how to install it."""


class BrokerStartError(RuntimeError):
    """A broker process did not become ready; the message carries its log tail."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def find_binary(name: str, search_path: str | None = None) -> str:
    """Locate a broker executable, raising a message with the install command if it is missing.

    search_path replaces $PATH plus the sbin directories (tests use it to simulate a bare machine).
    """
    if search_path is None:
        search_path = os.pathsep.join([os.environ.get("PATH", ""), *_EXTRA_BIN_DIRS])
    found = shutil.which(name, path=search_path)
    if found is None:
        raise BrokerBinaryMissingError(f"`{name}` not found on PATH; {INSTALL_HINT}")
    return found


class BrokerServer:
    """One broker process on a fixed loopback port, owned by a test or a bench (start/stop/kill/restart)."""

    binary: ClassVar[str] = ""
    name: ClassVar[str] = ""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        executable: str | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self.host = HOST
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._port_fixed = port is not None
        self.port = port if port is not None else free_port()
        self.executable = executable or find_binary(self.binary)
        self.start_timeout = start_timeout
        self.log_path = self.workdir / f"{self.name}.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.host}:{self.port} running={self.is_running()}>"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        """True once the broker serves clients; a plain TCP accept by default."""
        return port_open(self.port, self.host)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def start(self) -> None:
        """Start the process and wait until it serves; a port lost to a race is retried once or twice."""
        if self.is_running():
            return
        attempts = 1 if self._port_fixed else 3
        for attempt in range(attempts):
            try:
                self._start_once()
                return
            except BrokerStartError:
                if attempt == attempts - 1:
                    raise
                self.port = free_port()

    def _start_once(self) -> None:
        if port_open(self.port, self.host):
            raise BrokerStartError(f"{self.name}: port {self.port} is already used by another process")
        with self.log_path.open("ab") as log:
            log.write(f"--- start {self.name} on {self.host}:{self.port} ---\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self._command(),
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise BrokerStartError(
                    f"{self.name} exited with code {code} while starting on port {self.port}:\n{self.log_tail()}"
                )
            if self._ready():
                return
            time.sleep(0.05)
        self.kill()
        raise BrokerStartError(
            f"{self.name} did not accept connections on {self.host}:{self.port} within "
            f"{self.start_timeout:.0f}s:\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful shutdown (SIGTERM), so the broker writes its persistent state."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=timeout)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL: simulates a crash, nothing is flushed."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None

    def restart(self) -> None:
        """Stop and start again on the same port, so clients can reconnect to the same address."""
        self.stop()
        self._port_fixed = True
        self.start()

    def __enter__(self) -> BrokerServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class MosquittoServer(BrokerServer):
    """Mosquitto 2 with MQTT 5, anonymous clients, and persistence so QoS 1 sessions survive restarts."""

    binary = "mosquitto"
    name = "mosquitto"

    def _command(self) -> list[str]:
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        conf = self.workdir / "mosquitto.conf"
        # As root, Mosquitto 2 switches to user "mosquitto", which cannot write our tmp dir.
        conf.write_text(
            "\n".join(
                [
                    f"user {getpass.getuser()}",
                    "per_listener_settings false",
                    "allow_anonymous true",
                    f"listener {self.port} {self.host}",
                    "protocol mqtt",
                    "persistence true",
                    f"persistence_location {data}/",
                    "autosave_interval 1",
                    "log_dest stdout",
                    "log_type all",
                    "",
                ]
            )
        )
        return [self.executable, "-c", str(conf)]


class RedisServer(BrokerServer):
    """redis-server on loopback with an append-only file, so data survives a graceful restart."""

    binary = "redis-server"
    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        return [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--protected-mode",
            "yes",
            "--dir",
            str(self.workdir),
            "--save",
            "",
            "--appendonly",
            "yes",
            # 'always': an acknowledged XADD is on disk before the reply, so a SIGKILL loses nothing
            # acknowledged ('everysec' may postpone the write while an fsync is pending and lose ~1 s).
            "--appendfsync",
            "always",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]

    def _ready(self) -> bool:
        """PING must answer PONG: a port that accepts may still be loading the append-only file."""
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False
