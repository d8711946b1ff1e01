"""Frame accounting: every frame the agent accepts ends exactly once as published, dropped or expired.

accepted = published + dropped (by reason) + expired + in_flight holds at every moment, and
after a clean shutdown in_flight is 0. Tests check it after every scenario; the agent logs it
when it stops and /metrics exports the drops (`genclip_frames_dropped_total`, expired frames
under the reason "stale"). Ending a frame here also tells its source how it ended
(`Frame.end`), so a folder source clears a file away only once the file's result is out, and
hands every dropped or expired frame to `on_dropped_frame(frame, reason)` (the fail-safe answer,
agent/failsafe.py): a dropped frame stays counted as dropped, its answer is counted apart.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from agent.frames import Frame
from agent.logs import get_logger

log = get_logger(__name__)

DropReason = Literal["queue_full", "shutdown", "paused", "invalid"]
STALE = "stale"  # how an expired frame is reported to drop listeners (and to /metrics)


@dataclass
class LedgerSnapshot:
    accepted: int
    published: int
    expired: int  # older than the camera's staleness budget before the engine got to it
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def in_flight(self) -> int:
        return self.accepted - self.published - self.expired - sum(self.dropped.values())

    def as_dict(self) -> dict[str, object]:
        return {
            "accepted": self.accepted,
            "published": self.published,
            "expired": self.expired,
            "dropped": dict(self.dropped),
            "in_flight": self.in_flight,
        }


class FrameLedger:
    """Thread-safe per-camera counts of where frames went; `on_drop(camera, reason)` hears every drop."""

    def __init__(
        self,
        on_drop: Callable[[str, str], None] | None = None,
        on_dropped_frame: Callable[[Frame, str], None] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._on_drop = on_drop
        self._on_dropped_frame = on_dropped_frame  # must not block: it may be called under the batcher's lock
        self._accepted: Counter[str] = Counter()
        self._published: Counter[str] = Counter()
        self._expired: Counter[str] = Counter()
        self._dropped: Counter[tuple[str, str]] = Counter()

    def accepted(self, camera: str) -> None:
        with self._lock:
            self._accepted[camera] += 1

    def published(self, frame: Frame) -> None:
        with self._lock:
            self._published[frame.camera] += 1
        self._end(frame, "published")

    def expired(self, frame: Frame) -> None:
        with self._lock:
            self._expired[frame.camera] += 1
        self._tell(frame.camera, STALE)
        self._end(frame, STALE)
        self._answer(frame, STALE)

    def dropped(self, frame: Frame, reason: DropReason) -> None:
        with self._lock:
            self._dropped[frame.camera, reason] += 1
        self._tell(frame.camera, reason)
        self._end(frame, reason)
        self._answer(frame, reason)

    def _answer(self, frame: Frame, reason: str) -> None:
        if self._on_dropped_frame is None:
            return
        try:
            self._on_dropped_frame(frame, reason)
        except Exception:  # the answer must never break the count
            log.exception("dropped frame not answered", camera=frame.camera, seq=frame.seq, reason=reason)

    def _tell(self, camera: str, reason: str) -> None:
        if self._on_drop is not None:
            self._on_drop(camera, reason)

    @staticmethod
    def _end(frame: Frame, how: str) -> None:
        try:
            frame.end(how)
        except Exception:  # the source's bookkeeping must never break the count
            log.exception("frame end hook failed", camera=frame.camera, seq=frame.seq, how=how)

    def snapshot(self, camera: str | None = None) -> LedgerSnapshot:
        with self._lock:

            def pick(counter: Counter) -> int:
                return sum(v for k, v in counter.items() if camera is None or k == camera)

            dropped: Counter[str] = Counter()
            for (cam, reason), n in self._dropped.items():
                if camera is None or cam == camera:
                    dropped[reason] += n
            return LedgerSnapshot(pick(self._accepted), pick(self._published), pick(self._expired), dict(dropped))
