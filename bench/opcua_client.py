"""An OPC UA client as a PLC would run it, for `genclip bench agent` and the tests (needs the extra `opcua`).

`make_credentials` writes what a line's OPC UA server and its clients need into a folder: the server's
certificate and key (agent/opcua/certificate.py), a client certificate and a users file with one user
per role. `secure_client` opens a Basic256Sha256 SignAndEncrypt client with that certificate and a
user's name and password.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.opcua.certificate import CertificateFiles, write_certificate

CLIENT_URI = "urn:genclip-inspect:test-client"
PASSWORDS = {"plc": "plc-secret-1", "operator": "operator-secret-1", "reader": "reader-secret-1"}


@dataclass(frozen=True, slots=True)
class OpcuaCredentials:
    server: CertificateFiles
    client: CertificateFiles
    users: Path

    def config(self, port: int, **keys: Any) -> dict[str, Any]:
        """The `[opcua]` section for a server on 127.0.0.1:`port` with these files."""
        return {
            "enabled": True,
            "host": "127.0.0.1",
            "port": port,
            "certificate_file": str(self.server.certificate),
            "private_key_file": str(self.server.private_key),
            "users_file": str(self.users),
            **keys,
        }


def make_credentials(folder: Path, line: str) -> OpcuaCredentials:
    """Server and client certificates and a users file (users `plc`, `operator`, `reader`, see PASSWORDS)."""
    server = write_certificate(folder / "server", f"urn:genclip-inspect:{line}", overwrite=True)
    client = write_certificate(folder / "client", CLIENT_URI, client=True, overwrite=True)
    users = folder / "opcua-users"
    users.write_text("".join(f"{role}:{role}:{password}\n" for role, password in PASSWORDS.items()))
    return OpcuaCredentials(server, client, users)


async def secure_client(url: str, credentials: OpcuaCredentials, user: str | None, password: str | None = None) -> Any:
    """An asyncua Client (not yet connected) on SignAndEncrypt, logging in as `user` (None: anonymous)."""
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    client = Client(url, timeout=10)
    client.application_uri = CLIENT_URI
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        str(credentials.client.certificate),
        str(credentials.client.private_key),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    if user is not None:
        client.set_user(user)
        client.set_password(password or PASSWORDS.get(user, "no-such-user"))
    return client


class OpcuaLatencyListener:
    """A monitoring client on its own thread and loop: capture-to-notification latency (ms) of each result.

    It monitors every camera's `CapturedAt` (publishing interval `interval_ms`, sampling on every change);
    a notification's latency is its arrival on this machine's clock minus the value (the capture time).
    The figure so includes the server's publishing interval: up to `interval_ms` of waiting."""

    def __init__(self, url: str, credentials: OpcuaCredentials, line: str, cameras: list[str], interval_ms: float = 10):
        import asyncio
        import threading

        self.url, self.credentials, self.line, self.cameras = url, credentials, line, cameras
        self.interval_ms = interval_ms
        self.latencies: list[float] = []
        self.count = 0
        self.error: str | None = None
        self._measuring = False
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="opcua-listener", daemon=True)

    def start(self, timeout: float = 60.0) -> None:
        self._thread.start()
        self._ready.wait(timeout)
        if self.error is not None:
            raise RuntimeError(f"the OPC UA listener cannot connect to {self.url}: {self.error}")

    def measure(self) -> int:
        with self._lock:
            self._measuring = True
            return self.count

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _heard(self, captured: Any) -> None:
        import time
        from datetime import UTC

        now = time.time()
        if captured is None or captured.year < 2000:  # the initial value, before any result
            return
        stamp = captured if captured.tzinfo is not None else captured.replace(tzinfo=UTC)
        with self._lock:
            self.count += 1
            if self._measuring:
                self.latencies.append(1000 * (now - stamp.timestamp()))

    async def _run(self) -> None:
        import asyncio

        from agent.opcua.ua_values import node_id

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        listener = self

        class Handler:
            def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
                listener._heard(value)

            def status_change_notification(self, status: Any) -> None:
                pass

        for _ in range(60):  # the server starts with the agent: retry until it listens
            try:
                client = await secure_client(self.url, self.credentials, "reader")
                await client.connect()
                break
            except Exception as exc:
                self.error = str(exc) or type(exc).__name__
                await asyncio.sleep(1.0)
        else:
            self._ready.set()
            return
        self.error = None
        try:
            ns = await client.get_namespace_index(f"urn:genclip-inspect:{self.line}")
            subscription = await client.create_subscription(self.interval_ms, Handler())
            nodes = [client.get_node(node_id(f"{self.line}.{c}.CapturedAt", ns)) for c in self.cameras]
            await subscription.subscribe_data_change(nodes)
            self._ready.set()
            await self._stop.wait()
        finally:
            self._ready.set()
            await client.disconnect()
