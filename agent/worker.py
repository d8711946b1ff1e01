"""The engine worker: the one thread that owns the engine and its device.

It builds the engine, sets the line's classes up and warms every batch shape on
its own thread (CUDA graphs are per thread), then loops: take a batch from the
`FrameBatcher`, launch it on the engine, hand it on. The result thread builds a
batch's results (maps, defect regions) while this thread launches the next one;
at most two batches are queued on the device at once. Work that must touch the device
(installing new prompts, recalibrating) is queued with `submit` and runs between
batches, so a batch never sees a half-applied change. `busy()` says what the thread
is doing and for how long (a batch, a device task, handing a batch on); the service
judges from it whether the thread hangs and stops the systemd watchdog then.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Protocol, TypeVar

from agent.batcher import FrameBatcher
from agent.frames import Frame
from agent.logs import get_logger
from agent.outcomes import BatchFailure, Outcome
from model.outcomes import FrameError, Prediction

if TYPE_CHECKING:
    from model.engine import Engine

log = get_logger("agent.worker")

T = TypeVar("T")


class PendingOutcomes(Protocol):
    """What the worker needs of a batch launched on the engine (`Engine.launch` returns one)."""

    @property
    def seconds(self) -> float | None:
        """Launch to results on the host, once known."""

    def wait(self) -> None:
        """Until the device has finished the batch."""

    def outcomes(self) -> list[Prediction | FrameError]:
        """One outcome per frame, in order (built once)."""


class LaunchedBatch:
    """A launched batch handed on by the worker: its frames and, once built, one outcome per frame.

    `pending` scores the frames that have a picture (`not f.answer_only`), in order; the others (an
    unreadable picture, a missed trigger) get their own reason in their place, so outcomes keep the
    frames' (capture) order.
    """

    def __init__(self, frames: list[Frame], pending: PendingOutcomes | None = None, error: str | None = None) -> None:
        self.frames = frames
        self._pending = pending
        self._error = error

    def wait(self) -> None:
        """Until the device has finished it; a device fault becomes every frame's error."""
        if self._pending is not None and self._error is None:
            try:
                self._pending.wait()
            except Exception as exc:
                log.exception("batch failed on the device", frames=len(self.frames))
                self._error = f"engine failure: {exc}"

    def outcomes(self) -> Sequence[Outcome]:
        """One outcome per frame; never raises (a failed batch gives every frame the failure, a frame without
        a picture its own reason)."""
        self.wait()
        if self._error is None and self._pending is not None:
            try:
                scored = iter(self._pending.outcomes())
                return [self._failure(f) if f.answer_only else next(scored) for f in self.frames]
            except Exception as exc:
                log.exception("batch failed", frames=len(self.frames))
                self._error = f"engine failure: {exc}"
        return [self._failure(f) for f in self.frames]

    def _failure(self, frame: Frame) -> BatchFailure:
        return BatchFailure(frame.product_class, frame.error or frame.not_inspected or self._error or "not scored")

    @property
    def seconds(self) -> float | None:
        """Launch to results on the host (None for a batch that failed to launch)."""
        return None if self._pending is None else self._pending.seconds


Deliver = Callable[[LaunchedBatch], None]


class InferenceWorker:
    """Owns the engine; scores batches; runs device tasks between batches."""

    def __init__(
        self,
        build: Callable[[], Engine],
        setup: Callable[[Engine], None],
        batcher: FrameBatcher,
        deliver: Deliver,
        *,
        pipeline: str = "auto",
    ) -> None:
        self._build = build
        self._setup = setup
        self.batcher = batcher
        self._deliver = deliver
        self._pipeline_setting = pipeline
        self.pipeline = pipeline == "on"  # "auto" is decided once the engine's device is known
        self._in_flight: LaunchedBatch | None = None
        self._tasks: queue.SimpleQueue[Callable[[Engine], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._drain_until: float | None = None
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.engine: Engine | None = None  # set on the worker thread before `ready`
        self.heartbeat = time.monotonic()  # each turn of the loop
        self.busy_since: float | None = None
        self.busy_with: str | None = None  # "batch", "task" (prompts, recalibration) or "deliver"
        self._thread = threading.Thread(target=self._run, name="engine-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, task: Callable[[Engine], T]) -> Future[T]:
        """Run task(engine) on the worker thread between batches; the future has its result or error."""
        future: Future[T] = Future()

        def run(engine: Engine) -> None:
            if not future.set_running_or_notify_cancel():
                return
            self._busy("task")
            try:
                future.set_result(task(engine))
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                self._busy(None)

        self._tasks.put(run)
        return future

    def stop(self, until: float, grace_s: float) -> None:
        """Score what is queued until the monotonic time `until`, then stop; wait `grace_s` more for the
        batch running then (a forward pass cannot be interrupted)."""
        self._drain_until = until
        self._stop.set()
        self._thread.join(max(0.0, until - time.monotonic()) + grace_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def busy(self) -> tuple[str | None, float]:
        """What the thread is doing ("batch", "task", "deliver" or None when between them) and for how long."""
        what, since = self.busy_with, self.busy_since
        return (what, time.monotonic() - since) if what is not None and since is not None else (None, 0.0)

    def _busy(self, what: str | None) -> None:
        now = time.monotonic()
        self.heartbeat = now
        self.busy_since = now if what is not None else None
        self.busy_with = what

    def _run(self) -> None:
        try:
            engine = self.engine = self._build()
            self._setup(engine)
            seconds = engine.warmup()
            if self._pipeline_setting == "auto":
                self.pipeline = engine.device.type == "cuda"
            log.info("engine warm", seconds=round(seconds, 2), batch_sizes=engine.batch_sizes, pipeline=self.pipeline)
        except BaseException as exc:  # reported by the service, which exits with the reason
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        while True:
            self.heartbeat = time.monotonic()
            self._run_tasks(engine)
            if self._stop.is_set():
                if self._drain_until is None or time.monotonic() >= self._drain_until:
                    break
                if self.batcher.takeable() == 0:
                    break
            batch = self.batcher.next_batch(timeout=0.2)
            if batch:
                self._score(engine, batch)
        self._run_tasks(engine)

    def _run_tasks(self, engine: Engine) -> None:
        while True:
            try:
                run = self._tasks.get_nowait()
            except queue.Empty:
                return
            run(engine)

    def _score(self, engine: Engine, batch: list[Frame]) -> None:
        """Launch the frames that have a picture; those without (unreadable, a missed trigger) keep their place."""
        pictured = [f for f in batch if not f.answer_only]
        self._busy("batch")
        try:
            try:
                images, classes = [f.image for f in pictured], [f.product_class for f in pictured]
                pending = engine.launch(images, classes) if pictured else None
                scored = LaunchedBatch(batch, pending)
            except Exception as exc:  # a device fault: every frame of the batch gets the error, none is lost
                log.exception("batch failed", frames=len(batch))
                scored = LaunchedBatch(batch, error=f"engine failure: {exc}")
            previous, self._in_flight = self._in_flight, scored
            if previous is not None:
                previous.wait()  # at most two batches queued on the device: frames age in the batcher, not there
            if not self.pipeline:
                scored.outcomes()  # results built here, before the next batch starts
            self._busy("deliver")  # may wait for room in the result queue
            self._deliver(scored)
        finally:
            self._busy(None)
