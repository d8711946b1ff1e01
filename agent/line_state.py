"""The line's state as the PLC sees it (the retained `status`), the heartbeat, and what /healthz and /livez say.

States (the retained MQTT `status` word, and `status.state` in info and the heartbeat):
- `starting`: from the first connect until the engine is loaded and warmed up, every class set
  up (or known to have failed) and the cameras started; `/healthz` is 503 meanwhile, with
  STARTING_REASON first;
- `online`: running and healthy;
- `degraded`: running, but something the line should know about is wrong: a camera down or
  stalled, a class that could not be set up or runs on a stale calibration, a hung engine or
  result thread, Redis unreachable. The reasons are `reasons` (in info and the heartbeat). An
  MQTT outage itself is not a reason: nothing can be said on MQTT while it lasts, and the
  status sent on reconnect must not be a stale `degraded`. Neither is a camera still opening;
- `stopped` (a clean stop) and `offline` (the Last Will) are published by the MQTT sink.

`/healthz` 503 ⟺ not running or any reason (also an MQTT outage or a camera still opening);
`/livez` 503 only while a thread is dead or hung (`hang`), the rule the systemd watchdog pings on.

`StatusMonitor` evaluates the state every tick (`[mqtt].heartbeat_s`, or 1 s with heartbeats off);
when the state word changes it sets the retained status, when the state or its reasons change
(once running) it re-publishes info; every tick it sends a heartbeat whose counter rises by one
per beat from 1 at every start.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from agent.line_status import stale_calibration_reason
from agent.logs import get_logger
from agent.publish.publisher import Publisher
from agent.results import JsonObject

if TYPE_CHECKING:
    from agent.sources.base import FrameSource
    from model.engine import Engine

log = get_logger(__name__)

StateName = Literal["starting", "online", "degraded"]
STARTING_REASON = "starting: loading the engine / warming up"
IDLE_TICK_S = 1.0  # how often the state is evaluated when heartbeats are off


@dataclass(frozen=True, slots=True)
class LineState:
    """What the line tells the PLC: a state and why (empty reasons when online)."""

    state: StateName
    reasons: tuple[str, ...] = ()

    def as_json(self) -> JsonObject:
        return {"state": self.state, "reasons": list(self.reasons)}


STARTING = LineState("starting", (STARTING_REASON,))


def line_state(running: bool, reasons: list[str]) -> LineState:
    """starting until running; then degraded with reasons, else online."""
    if not running:
        return STARTING
    return LineState("degraded", tuple(reasons)) if reasons else LineState("online")


@dataclass(frozen=True)
class LineChecks:
    """Reads the service's parts (never changes them) for /healthz, /livez and the status."""

    class_errors: Mapping[str, str]
    engine: Callable[[], Engine | None]
    sources: Mapping[str, FrameSource]
    publishers: tuple[Publisher, ...]
    hang: Callable[[], str | None]
    running: threading.Event
    status_sink: str  # the sink the status goes out on: its own outage is not a status reason

    def health(self) -> list[str]:
        """Why /healthz is 503 (empty: 200)."""
        reasons = [] if self.running.is_set() else [STARTING_REASON]
        return reasons + self._line(starting_cameras=True) + self._sinks(skip=None)

    def liveness(self) -> list[str]:
        """Why /livez is 503: a dead or hung thread (empty: alive)."""
        hang = self.hang()
        return [] if hang is None else [hang]

    def state(self) -> LineState:
        reasons = self._line(starting_cameras=False) + self._sinks(skip=self.status_sink)
        return line_state(self.running.is_set(), reasons)

    def _line(self, *, starting_cameras: bool) -> list[str]:
        reasons = [f"class {name}: {error}" for name, error in self.class_errors.items()]
        engine = self.engine()
        if engine is not None:
            stale = (stale_calibration_reason(engine.classes.status(name)) for name in engine.classes.names())
            reasons += [reason for reason in stale if reason is not None]
        for camera_id, source in self.sources.items():
            status = source.status()
            if not status.healthy and (starting_cameras or status.state != "starting"):
                reasons.append(f"camera {camera_id}: {status.state} ({status.detail})")
        hang = self.hang()
        if hang is not None:
            reasons.append(hang)
        return reasons

    def _sinks(self, *, skip: str | None) -> list[str]:
        reasons = []
        for publisher in self.publishers:
            ok, why = publisher.health()
            if not ok and publisher.sink != skip:
                reasons.append(f"{publisher.sink}: {why}")
        return reasons


class StatusSink(Protocol):
    """Where the retained status and the heartbeat go (the MQTT sink)."""

    def set_status(self, state: str) -> None: ...

    def heartbeat(self, count: int, state: str, reasons: tuple[str, ...]) -> None: ...


class StatusMonitor:
    """Evaluates the line's state on a daemon thread; reports changes and sends heartbeats."""

    def __init__(
        self,
        evaluate: Callable[[], LineState],
        sink: StatusSink,
        publish_info: Callable[[], object],
        heartbeat_s: float,
    ) -> None:
        self._evaluate = evaluate
        self._sink = sink
        self._publish_info = publish_info
        self._beats = heartbeat_s > 0
        self._interval = heartbeat_s if heartbeat_s > 0 else IDLE_TICK_S
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last: LineState | None = None
        self._count = 0
        self._thread = threading.Thread(target=self._loop, name="line-status", daemon=True)

    @property
    def current(self) -> LineState:
        return self._last or STARTING

    def start(self) -> None:
        self._thread.start()

    def refresh(self) -> LineState:
        """Evaluate now and report a change (under the lock, so changes go out in order)."""
        with self._lock:
            state = self._evaluate()
            if state != self._last:
                old, self._last = self._last, state
                if old is None or old.state != state.state:
                    self._sink.set_status(state.state)
                if state.state != "starting":
                    self._publish_info()  # the reasons are in info
                log.info("line status", status=state.state, reasons=list(state.reasons))
            return state

    def stop(self, timeout: float = 2.0) -> None:
        """No status change or heartbeat after this returns."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                state = self.refresh()
                if self._beats and not self._stop.is_set():
                    self._count += 1
                    self._sink.heartbeat(self._count, state.state, state.reasons)
            except Exception:
                log.exception("line status check failed")
            self._stop.wait(self._interval)
