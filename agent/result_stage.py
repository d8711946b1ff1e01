"""The result thread: launched batches in, Inspections published, off the engine thread.

The worker hands each launched batch here; this thread waits for its outcomes (maps,
defect regions), builds every frame's Inspection and hands it to the publishers. Its
queue is short on purpose: when publishing falls behind, the worker waits, and frames
wait (or expire) in their camera queues, where each camera's policy decides what to
keep. Every frame leaves through the ledger: published, or dropped as "invalid" (its
result could not be built) or "shutdown" (still queued when the stop's time ran out).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable

from agent.frames import Frame
from agent.ledger import FrameLedger
from agent.logs import get_logger
from agent.metrics import AgentMetrics
from agent.outcomes import Outcome
from agent.worker import LaunchedBatch

log = get_logger(__name__)

Publish = Callable[[Frame, Outcome], object]  # builds and publishes one frame's Inspection; counts it as published


class ResultStage:
    """A bounded queue of launched batches and the one thread that publishes their results."""

    def __init__(self, publish: Publish, ledger: FrameLedger, metrics: AgentMetrics, capacity: int) -> None:
        self._publish = publish
        self.ledger = ledger
        self.metrics = metrics
        self._queue: queue.Queue[LaunchedBatch | None] = queue.Queue(capacity)
        self._closing = threading.Event()
        self._progress = time.monotonic()  # the last batch finished
        self._thread = threading.Thread(target=self._run, name="results", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, scored: LaunchedBatch) -> None:
        """Queue a batch; waits while the queue is full (publishing fell behind)."""
        self._queue.put(scored)

    def depth(self) -> int:
        return self._queue.qsize()

    def quiet_for(self) -> float:
        """Seconds since the thread last finished a batch: long while the queue is full means it hangs."""
        return time.monotonic() - self._progress

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, until: float) -> int:
        """Publish what is queued until the monotonic time `until`, then drop (counted) what is left.

        Returns how many frames were dropped. A batch being built when the time runs out is finished
        by the thread, which then ends.
        """
        if self._thread.ident is None:  # never started: start() failed before it
            return 0
        with contextlib.suppress(queue.Full):  # full: the thread is busy; it ends after its batch (below)
            self._queue.put(None, timeout=max(0.0, until - time.monotonic()))
        self._thread.join(max(0.0, until - time.monotonic()))
        self._closing.set()
        dropped = 0
        while True:
            try:
                scored = self._queue.get_nowait()
            except queue.Empty:
                return dropped
            for frame in scored.frames if scored is not None else ():
                self.ledger.dropped(frame, "shutdown")
                dropped += 1

    def _run(self) -> None:
        while not self._closing.is_set():
            scored = self._queue.get()
            if scored is None:
                return
            self._handle(scored)
            self._progress = time.monotonic()

    def _handle(self, scored: LaunchedBatch) -> None:
        try:
            outcomes = scored.outcomes()  # maps and regions, while the worker launches the next batch
            if len(outcomes) != len(scored.frames):
                raise RuntimeError(f"{len(outcomes)} outcomes for {len(scored.frames)} frames")
            if scored.seconds is not None:  # a batch the engine ran (not one of unreadable pictures)
                self.metrics.batch_size.observe(len(scored.frames))
                self.metrics.inference_seconds.observe(scored.seconds)
        except Exception:  # never lose the thread; every frame is still accounted for
            log.exception("the batch's results could not be built", frames=len(scored.frames))
            for frame in scored.frames:
                self.ledger.dropped(frame, "invalid")
            return
        for frame, outcome in zip(scored.frames, outcomes, strict=True):
            try:
                self._publish(frame, outcome)
            except Exception:
                log.exception("result could not be built", camera=frame.camera, seq=frame.seq)
                self.ledger.dropped(frame, "invalid")
