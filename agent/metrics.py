"""The agent's Prometheus metrics, in a registry of their own.

A private `CollectorRegistry` (never the process-global one) lets tests, and a
process that runs two agents, build as many `AgentMetrics` as they like.
Publishers report plain nested dicts through `add_stats_source`; they are read at
scrape time, so no publisher imports prometheus_client.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.ledger import STALE, DropReason
from agent.logs import get_logger

if TYPE_CHECKING:
    from agent.sources.base import SourceStatus

log = get_logger(__name__)

NAMESPACE = "genclip"
DROP_REASONS: tuple[str, ...] = (*get_args(DropReason), STALE)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

StatsReader = Callable[[], dict[str, dict[str, int]]]
TriggerReader = Callable[[], tuple[int, int]]  # (triggers accepted, missed) of one camera
GrabErrorReader = Callable[[], dict[str, int]]  # a GenICam camera's broken frames by kind (failed, incomplete)


@dataclass(frozen=True, slots=True)
class CameraCounts:
    """One camera's counters as the live page shows them."""

    parts: int
    verdicts: dict[str, int]
    dropped: dict[str, int]


def _totals(counter: Counter, label: str, camera: str) -> dict[str, int]:
    """A labelled counter's `_total` samples of one camera, by the value of `label`."""
    out: dict[str, int] = {}
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("camera") == camera:
                key = sample.labels[label]
                out[key] = out.get(key, 0) + int(sample.value)
    return out


class _StatsCollector(Collector):
    """Turns `{kind: {outcome: count}}` from each named source into one counter family."""

    def __init__(self) -> None:
        self._sources: dict[str, StatsReader] = {}
        self._lock = threading.Lock()

    def add(self, name: str, read: StatsReader) -> None:
        with self._lock:
            if name in self._sources:
                raise ValueError(f"stats source {name!r} is already registered")
            self._sources[name] = read

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            f"{NAMESPACE}_messages",
            "Messages handled by each publisher sink, by kind and outcome (sent, expired, dropped, ...).",
            labels=["sink", "kind", "outcome"],
        )

    def describe(self) -> Iterator[Metric]:
        # Registration asks for names only; without this it would call every reader early.
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        with self._lock:
            sources = list(self._sources.items())
        for sink, read in sources:
            try:
                stats = read()
                rows = [(kind, outcome, float(n)) for kind, by in stats.items() for outcome, n in by.items()]
            except Exception:
                # One broken publisher must not take /metrics down with it.
                log.warning("stats source failed; skipped in this scrape", sink=sink, exc_info=True)
                continue
            for kind, outcome, n in rows:
                family.add_metric([sink, str(kind), str(outcome)], n)
        yield family


class _TriggerCollector(Collector):
    """genclip_triggers_total and genclip_triggers_missed_total, read from each camera's trigger queue."""

    def __init__(self) -> None:
        self._cameras: dict[str, TriggerReader] = {}
        self._lock = threading.Lock()

    def add(self, camera: str, read: TriggerReader) -> None:
        with self._lock:
            self._cameras[camera] = read

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily]:
        accepted = CounterMetricFamily(
            f"{NAMESPACE}_triggers", "Triggers accepted from the PLC, per camera.", labels=["camera"]
        )
        missed = CounterMetricFamily(
            f"{NAMESPACE}_triggers_missed",
            "Accepted triggers that got no frame in time (answered ERROR), per camera.",
            labels=["camera"],
        )
        return accepted, missed

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        accepted, missed = self._families()
        with self._lock:
            cameras = list(self._cameras.items())
        for camera, read in cameras:
            count, lost = read()
            accepted.add_metric([camera], float(count))
            missed.add_metric([camera], float(lost))
        yield accepted
        yield missed


class _GrabErrorCollector(Collector):
    """genclip_grab_errors_total{camera, kind}: frames a GenICam camera delivered broken, read from the source."""

    def __init__(self) -> None:
        self._cameras: dict[str, GrabErrorReader] = {}
        self._lock = threading.Lock()

    def add(self, camera: str, read: GrabErrorReader) -> None:
        with self._lock:
            self._cameras[camera] = read

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(
            f"{NAMESPACE}_grab_errors",
            "Frames a GenICam camera delivered broken (failed grab, incomplete buffer), each answered ERROR.",
            labels=["camera", "kind"],
        )

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        with self._lock:
            cameras = list(self._cameras.items())
        for camera, read in cameras:
            for kind, count in read().items():
                family.add_metric([camera, kind], float(count))
        yield family


class AgentMetrics:
    """Every metric the agent exports; the service updates them, `/metrics` renders them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r, ns = self.registry, NAMESPACE

        self.frames_captured = Counter(
            "frames_captured", "Frames read from each camera.", ["camera"], namespace=ns, registry=r
        )
        self.frames_dropped = Counter(
            "frames_dropped",
            "Frames discarded before scoring, by reason (queue_full, stale, shutdown, paused, invalid).",
            ["camera", "reason"],
            namespace=ns,
            registry=r,
        )
        self.frames_answered = Counter(
            "frames_answered",
            "Dropped frames answered with an ERROR decision (a folder file that is tried again is not), by reason.",
            ["camera", "reason"],
            namespace=ns,
            registry=r,
        )
        self.frames_processed = Counter(
            "frames_processed", "Frames scored by the engine.", ["camera"], namespace=ns, registry=r
        )
        self.frame_errors = Counter(
            "frame_errors", "Frames the engine could not score.", ["camera"], namespace=ns, registry=r
        )
        self.results_published = Counter(
            "results_published", "Results handed to the publishers.", ["camera", "verdict"], namespace=ns, registry=r
        )
        self.prompt_reloads = Counter(
            "prompt_reloads", "Prompt checkpoint reloads (ok, refused).", ["outcome"], namespace=ns, registry=r
        )
        self.batch_size = Histogram(
            "batch_size", "Frames per engine batch.", buckets=BATCH_BUCKETS, namespace=ns, registry=r
        )
        self.inference_seconds = Histogram(
            "inference_seconds", "Engine time per batch.", buckets=INFERENCE_BUCKETS, namespace=ns, registry=r
        )
        self.capture_to_publish_seconds = Histogram(
            "capture_to_publish_seconds",
            "Time from frame capture to publishing its result or reject signal.",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            namespace=ns,
            registry=r,
        )
        self.queue_depth = Gauge("queue_depth", "Items waiting in each queue.", ["queue"], namespace=ns, registry=r)
        self.camera_up = Gauge(
            "camera_up", "1 while the camera delivers frames, else 0.", ["camera"], namespace=ns, registry=r
        )
        self.broker_up = Gauge(
            "broker_up", "1 while the sink is connected to its broker, else 0.", ["sink"], namespace=ns, registry=r
        )
        self.prompt = Info("prompt", "The prompt checkpoint in use.", namespace=ns, registry=r)
        self.triggers_refused = Counter(
            "triggers_refused",
            "Triggers not accepted (malformed, bad_part_id, retained, repeated, not_triggered, unknown_camera, "
            "not_running, queue_full, stopping): nothing is answered; the PLC rejects the part on silence.",
            ["camera", "reason"],
            namespace=ns,
            registry=r,
        )
        self.page_viewers = Gauge(
            "page_viewers",
            "Open live streams (MJPEG) of each camera on the live page; 0: nothing is encoded for it.",
            ["camera"],
            namespace=ns,
            registry=r,
        )
        self.page_frames_encoded = Counter(
            "page_frames_encoded",
            "Frames encoded as JPEG for the live page's viewers (off the engine and result threads).",
            ["camera"],
            namespace=ns,
            registry=r,
        )
        self.page_event_clients = Gauge(
            "page_event_clients", "Open server-sent event streams of the live page.", namespace=ns, registry=r
        )
        self._stats = _StatsCollector()
        r.register(self._stats)
        self._triggers = _TriggerCollector()
        r.register(self._triggers)
        self._grab_errors = _GrabErrorCollector()
        r.register(self._grab_errors)

    def add_camera(self, camera: str) -> None:
        """Create the camera's series at zero so rate() and alerts see them before the first event."""
        for counter in (self.frames_captured, self.frames_processed, self.frame_errors):
            counter.labels(camera=camera)
        for reason in DROP_REASONS:
            self.frames_dropped.labels(camera=camera, reason=reason)
            self.frames_answered.labels(camera=camera, reason=reason)
        self.camera_up.labels(camera=camera).set(0)
        self.page_viewers.labels(camera=camera).set(0)
        self.page_frames_encoded.labels(camera=camera)

    def dropped(self, camera: str, reason: str, n: int = 1) -> None:
        """Count dropped frames (the ledger's listener); an unknown reason is a programming error."""
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; expected one of {', '.join(DROP_REASONS)}")
        self.frames_dropped.labels(camera=camera, reason=reason).inc(n)

    def watch_queue(self, queue: str, size: Callable[[], int]) -> None:
        """Read a queue's depth at scrape time instead of setting it on every put and get."""
        self.queue_depth.labels(queue=queue).set_function(lambda: float(size()))

    def watch_camera(self, camera: str, status: Callable[[], SourceStatus]) -> None:
        """camera_up reads the camera's state at scrape time: 1 while healthy."""
        self.camera_up.labels(camera=camera).set_function(lambda: 1.0 if status().healthy else 0.0)

    def watch_sink(self, sink: str, health: Callable[[], tuple[bool, str]]) -> None:
        """broker_up reads the sink's link at scrape time: 1 while connected."""
        self.broker_up.labels(sink=sink).set_function(lambda: 1.0 if health()[0] else 0.0)

    def set_prompt(self, version: str, backbone: str, path: str) -> None:
        self.prompt.info({"version": version, "backbone": backbone, "path": path})

    def watch_triggers(self, camera: str, read: TriggerReader) -> None:
        """Export a triggered camera's accepted and missed triggers, read at scrape time."""
        self._triggers.add(camera, read)

    def watch_grab_errors(self, camera: str, read: GrabErrorReader) -> None:
        """Export a GenICam camera's broken frames by kind, read at scrape time."""
        self._grab_errors.add(camera, read)

    def add_stats_source(self, name: str, read: StatsReader) -> None:
        """Export `read()` -> `{kind: {outcome: count}}` as genclip_messages_total{sink=name,kind,outcome}.

        `read` is called on every scrape, from the HTTP thread: it must be cheap and thread-safe.
        """
        self._stats.add(name, read)

    def camera_counts(self, camera: str) -> CameraCounts:
        """The camera's counters so far: parts by verdict and frames dropped by reason."""
        verdicts = _totals(self.results_published, "verdict", camera)
        return CameraCounts(
            parts=sum(verdicts.values()),
            verdicts={v: verdicts.get(v, 0) for v in ("OK", "NG", "ERROR")},
            dropped=_totals(self.frames_dropped, "reason", camera),
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
