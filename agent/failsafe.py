"""Fail-safe answers: every part the agent accepted gets exactly one decision.

The contract (docs/integration.md, "Fail-safe rule"):
- A frame the ledger drops or expires (queue_full, paused, stale, shutdown, invalid) is answered
  with an ERROR Inspection (`build_uninspected`: `error` "not inspected: <reason>", score null),
  handed to every publisher like an inspected part: a result (MQTT and the Redis stream), a
  decision, and a reject unless `[mqtt].reject_uninspected` is false. The ledger still counts
  the frame as dropped; the answer is counted apart (`genclip_frames_answered_total`).
- Not answered: a frame whose decision was already handed to the publishers (its `Frame.decided`
  latch is claimed by the result path first, so a frame dropped as invalid after a partial
  publish gets no second decision), and a frame whose source offers the same part again after
  this drop (`Frame.redelivered_on`: a folder file stays in its folder and is tried again; that
  try answers it, so the PLC never gets two decisions for one file).
- `submit` never blocks and takes no lock but the queue's: the ledger calls it under the batcher's
  lock and on camera threads. The answers are built and published on the "failsafe" thread.
- `stop(until)` answers everything queued before it returns (on the caller's thread for what the
  thread did not get to by `until`; a drop after it is answered at once). The service calls it after
  the result stage has stopped and before the publishers stop, so every answer is queued before
  `stopped` is published.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.frames import Frame
from agent.logs import get_logger
from agent.metrics import AgentMetrics
from agent.publish.publisher import Publisher
from agent.results import Inspection, build_uninspected

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Dropped:
    """A frame the ledger dropped, and the reason it was dropped for."""

    frame: Frame
    reason: str


@dataclass(frozen=True, slots=True)
class AnswerSettings:
    """What every uninspected part's Inspection needs from the configuration."""

    line: str
    window_s: float  # [mqtt].decision_window_ms in seconds
    reject: bool  # [mqtt].reject_uninspected


def answers(frame: Frame, reason: str) -> bool:
    """Whether a dropped frame gets an ERROR decision now: not when decided already or offered again."""
    return not frame.decided.claimed and reason not in frame.redelivered_on


class FailSafe:
    """The queue of dropped frames and the one thread that answers them."""

    def __init__(
        self,
        settings: AnswerSettings,
        publishers: tuple[Publisher, ...],
        metrics: AgentMetrics,
        model: Callable[[], Mapping[str, str]],
        on_decided: Callable[[Frame], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_decided = on_decided  # hears each answered frame (the part journal closes it)
        self._publishers = publishers
        self._metrics = metrics
        self._model = model
        self._queue: queue.SimpleQueue[Dropped | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="failsafe", daemon=True)
        self._answered = 0
        self._stopped = threading.Event()  # from now on `submit` answers on the caller's thread
        self._count_lock = threading.Lock()

    @property
    def answered(self) -> int:
        """Dropped frames answered with an ERROR decision so far."""
        with self._count_lock:
            return self._answered

    def start(self) -> None:
        self._thread.start()

    def submit(self, frame: Frame, reason: str) -> None:
        """The ledger's `on_dropped_frame`: queue the frame for its answer; never blocks. After `stop` (a
        camera that let go late) it is answered at once: publishers still open take it, closed ones count it."""
        if reason in frame.redelivered_on:
            return
        if self._stopped.is_set():
            self.answer(Dropped(frame, reason))
        else:
            self._queue.put(Dropped(frame, reason))

    def stop(self, until: float) -> None:
        """Answer what is queued: on the thread until the monotonic time `until`, then on this one."""
        self._stopped.set()
        if self._thread.ident is not None:
            self._queue.put(None)
            self._thread.join(max(0.0, until - time.monotonic()))
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                self.answer(item)

    def answer(self, item: Dropped) -> Inspection | None:
        """Build and publish one dropped frame's ERROR Inspection; None when it is not to be answered."""
        frame, reason = item.frame, item.reason
        if not answers(frame, reason) or not frame.decided.claim():
            return None
        s = self.settings
        inspection = build_uninspected(
            frame, reason, line=s.line, window_s=s.window_s, model=self._model(), signal_reject=s.reject
        )
        for publisher in self._publishers:
            publisher.publish_inspection(inspection)
        self._metrics.frames_answered.labels(camera=frame.camera, reason=reason).inc()
        if self._on_decided is not None:
            self._on_decided(frame)
        with self._count_lock:
            self._answered += 1
        return inspection

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self.answer(item)
            except Exception:  # never lose the thread; the PLC rejects the part on silence past its deadline
                log.exception("dropped frame could not be answered", camera=item.frame.camera, seq=item.frame.seq)
