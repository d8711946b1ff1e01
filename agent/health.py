"""The agent's HTTP port: `/healthz`, `/livez`, `/metrics` and (agent/page/) the live page, beside the inspection loop.

`/healthz` (readiness): 200 `{"status": "ok"}` only when the line is running and healthy, else 503
with the reasons (the first, until warm-up ends: "starting: loading the engine / warming up").
`/livez` (liveness, for a k8s liveness probe or a supervisor): 200 `{"status": "alive"}` while the
agent's threads are alive and not hung (the same rule the systemd watchdog pings on), also while
starting; 503 `{"status": "hung", "reasons": [...]}` otherwise.

The server is Starlette on uvicorn, in an event loop on its own daemon thread (`health-http`).
The socket is bound in `start()` on the caller's thread, so a busy port is a `HealthServerError`
there and then. uvicorn installs signal handlers only on the main thread, so the agent's own
SIGTERM/SIGINT/SIGHUP handling (agent/service.py) is never touched; `stop()` asks the loop to
exit, gives open streams (the page's MJPEG and server-sent events) a second to end, and joins the
thread. Plain endpoints run in the worker-thread pool, so a slow scrape or a hanging check holds
only its own request. Requests are logged at DEBUG, never printed, so a scrape every few seconds
does not flood the journal.
"""

from __future__ import annotations

import errno
import socket
import threading
import time
from collections.abc import Callable, Sequence

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent.logs import get_logger
from agent.metrics import AgentMetrics

log = get_logger(__name__)

HEALTH_PATHS = ("/healthz", "/health")  # /health: the name config.toml has always used
LIVE_PATH = "/livez"
START_WAIT_S = 10.0  # how long start() waits for the loop to serve
STOP_GRACE_S = 1  # open streams get this long to end when the server stops
STOP_JOIN_S = 5.0


class HealthServerError(RuntimeError):
    """The health server cannot listen where the configuration says."""


class _RequestLog:
    """Logs every request at DEBUG (method, path, status) once it is answered; streams pass through untouched."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def send_logged(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_logged)
        finally:
            client = scope.get("client") or ("?", 0)
            log.debug("http request", client=client[0], request=f"{scope['method']} {scope['path']} {status}")


class HealthServer:
    """Serves `checks()` as /healthz (200 or 503 with the reasons), the metrics as /metrics, and `routes`."""

    def __init__(
        self,
        host: str,
        port: int,
        metrics: AgentMetrics,
        checks: Callable[[], list[str]],
        *,
        liveness: Callable[[], list[str]] | None = None,
        routes: Sequence[BaseRoute] = (),
    ) -> None:
        self.host = host
        self.metrics = metrics
        self._port = port
        self._checks = checks
        self._liveness = liveness
        self._routes = list(routes)
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
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

    # --- endpoints (run in the worker-thread pool: plain functions) -------------------------------------
    def _healthz(self, request: Request) -> Response:
        reasons = self.reasons()
        if reasons:
            return JSONResponse({"status": "unhealthy", "reasons": reasons}, 503, headers=_NO_STORE)
        return JSONResponse({"status": "ok"}, headers=_NO_STORE)

    def _livez(self, request: Request) -> Response:
        hung = self.liveness()
        if hung:
            return JSONResponse({"status": "hung", "reasons": hung}, 503, headers=_NO_STORE)
        return JSONResponse({"status": "alive"}, headers=_NO_STORE)

    def _metrics(self, request: Request) -> Response:
        try:
            body = self.metrics.render()
        except Exception:
            log.exception("rendering metrics failed")
            return Response(b"metrics unavailable\n", 500, media_type="text/plain; charset=utf-8")
        return Response(body, headers={**_NO_STORE, "Content-Type": CONTENT_TYPE_LATEST})

    def _index(self, request: Request) -> Response:
        live = [LIVE_PATH] if self.serves_liveness else []
        return JSONResponse({"endpoints": ["/healthz", *live, "/metrics"]}, headers=_NO_STORE)

    def _not_found(self, request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"no such endpoint: {request.url.path}"}, 404)

    def app(self) -> ASGIApp:
        """The ASGI application: health, liveness, metrics, then the extra routes (the page)."""
        routes: list[BaseRoute] = [Route(path, self._healthz) for path in HEALTH_PATHS]
        if self.serves_liveness:
            routes.append(Route(LIVE_PATH, self._livez))
        routes.append(Route("/metrics", self._metrics))
        routes += self._routes
        if not any(getattr(r, "path", None) == "/" for r in self._routes):
            routes.append(Route("/", self._index))
        return _RequestLog(Starlette(routes=routes, exception_handlers={404: self._not_found}))

    # --- start and stop ----------------------------------------------------------------------------------
    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("health server already started")
        self._socket = self._bind()
        self._port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.app(),
            log_config=None,
            access_log=False,
            lifespan="off",
            http="h11",
            ws="none",
            loop="asyncio",
            timeout_graceful_shutdown=STOP_GRACE_S,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._socket]}, name="health-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + START_WAIT_S
        while not server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            self.stop()
            raise HealthServerError(f"the HTTP server on {self.host}:{self._port} did not start")
        log.info("health server listening", host=self.host, port=self._port)

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old sockets sit in TIME_WAIT
        try:
            sock.bind((self.host, self._port))  # no SO_REUSEPORT: a second agent on the same port must fail
            sock.listen(128)
        except OSError as exc:
            sock.close()
            why = "the address is already in use" if exc.errno == errno.EADDRINUSE else exc.strerror or str(exc)
            raise HealthServerError(
                f"cannot serve /healthz and /metrics on {self.host}:{self._port}: {why}; "
                f"set [agent].health_port (or GENCLIP_AGENT__HEALTH_PORT) to a free port, "
                f"or stop the other process (another agent for this line?)"
            ) from exc
        sock.set_inheritable(False)
        return sock

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(STOP_JOIN_S + STOP_GRACE_S)
        if self._socket is not None:
            self._socket.close()
        self._server = None
        self._thread = None
        self._socket = None
        log.info("health server stopped", host=self.host, port=self._port)


_NO_STORE = {"Cache-Control": "no-store"}
