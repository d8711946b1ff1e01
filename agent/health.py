"""`/healthz`, `/livez` and `/metrics` over HTTP, on a daemon thread beside the inspection loop.

`/healthz` (readiness): 200 `{"status": "ok"}` only when the line is running and healthy, else 503
with the reasons (the first, until warm-up ends: "starting: loading the engine / warming up").
`/livez` (liveness, for a k8s liveness probe or a supervisor): 200 `{"status": "alive"}` while the
agent's threads are alive and not hung (the same rule the systemd watchdog pings on), also while
starting; 503 `{"status": "hung", "reasons": [...]}` otherwise.

The server is the standard library's threaded one: a slow scrape or a hanging
check holds only its own request. Requests are logged at DEBUG, never printed,
so a scrape every few seconds does not flood the journal.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST

from agent.logs import get_logger
from agent.metrics import AgentMetrics

log = get_logger(__name__)

HEALTH_PATHS = ("/healthz", "/health")  # /health: the name config.toml has always used
LIVE_PATH = "/livez"
POLL_S = 0.1  # how soon stop() is noticed by the serving loop


class HealthServerError(RuntimeError):
    """The health server cannot listen where the configuration says."""


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True  # restart while old sockets sit in TIME_WAIT
    allow_reuse_port = False  # a second agent on the same port must fail, not share it

    def __init__(self, address: tuple[str, int], owner: HealthServer) -> None:
        self.owner = owner
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "genclip-health"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in HEALTH_PATHS:
            reasons = self.server.owner.reasons()
            if reasons:
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "unhealthy", "reasons": reasons})
            else:
                self._json(HTTPStatus.OK, {"status": "ok"})
        elif path == LIVE_PATH and self.server.owner.serves_liveness:
            hung = self.server.owner.liveness()
            if hung:
                self._json(HTTPStatus.SERVICE_UNAVAILABLE, {"status": "hung", "reasons": hung})
            else:
                self._json(HTTPStatus.OK, {"status": "alive"})
        elif path == "/metrics":
            try:
                body = self.server.owner.metrics.render()
            except Exception:
                log.exception("rendering metrics failed")
                self._send(HTTPStatus.INTERNAL_SERVER_ERROR, b"metrics unavailable\n", "text/plain; charset=utf-8")
                return
            self._send(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)
        elif path == "/":
            live = [LIVE_PATH] if self.server.owner.serves_liveness else []
            self._json(HTTPStatus.OK, {"endpoints": ["/healthz", *live, "/metrics"]})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {path}"})

    def _json(self, status: HTTPStatus, payload: dict[str, object]) -> None:
        self._send(status, json.dumps(payload).encode() + b"\n", "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http request", client=self.client_address[0], request=format % args)


class HealthServer:
    """Serves `checks()` as /healthz (200 or 503 with the reasons) and the metrics as /metrics."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: AgentMetrics,
        checks: Callable[[], list[str]],
        *,
        liveness: Callable[[], list[str]] | None = None,
    ) -> None:
        self.host = host
        self.metrics = metrics
        self._port = port
        self._checks = checks
        self._liveness = liveness
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port listened on; with port 0, the one the system picked (known after start())."""
        return self._port

    def reasons(self) -> list[str]:
        """Why the agent is unhealthy; empty when it is fine. A failing check is itself a reason."""
        try:
            return [str(r) for r in self._checks()]
        except Exception as exc:
            log.warning("health check raised", exc_info=True)
            return [f"health check failed: {type(exc).__name__}: {exc}"]

    @property
    def serves_liveness(self) -> bool:
        """/livez exists only with a liveness check (the service always gives one)."""
        return self._liveness is not None

    def liveness(self) -> list[str]:
        """Why the agent is hung (/livez 503); empty when alive."""
        if self._liveness is None:
            return []
        try:
            return [str(r) for r in self._liveness()]
        except Exception as exc:
            log.warning("liveness check raised", exc_info=True)
            return [f"liveness check failed: {type(exc).__name__}: {exc}"]

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("health server already started")
        try:
            self._server = _Server((self.host, self._port), self)
        except OSError as exc:
            why = "the address is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
            raise HealthServerError(
                f"cannot serve /healthz and /metrics on {self.host}:{self._port}: {why}; "
                f"set [agent].health_port (or GENCLIP_AGENT__HEALTH_PORT) to a free port, "
                f"or stop the other process (another agent for this line?)"
            ) from exc
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(POLL_S,), name="health-http", daemon=True
        )
        self._thread.start()
        log.info("health server listening", host=self.host, port=self._port)

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        self._server = self._thread = None
        log.info("health server stopped", host=self.host, port=self._port)
