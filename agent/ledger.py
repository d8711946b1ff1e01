"""Frame accounting: every frame the agent accepts ends exactly once as published, dropped or expired.

accepted = published + dropped (by reason) + expired + in_flight holds at every moment, and
after a clean shutdown in_flight is 0. Tests check it after every scenario; /metrics exports it.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

DropReason = Literal["queue_full", "shutdown", "paused", "invalid"]


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
    """Thread-safe per-camera counts of where frames went."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accepted: Counter[str] = Counter()
        self._published: Counter[str] = Counter()
        self._expired: Counter[str] = Counter()
        self._dropped: Counter[tuple[str, str]] = Counter()

    def accepted(self, camera: str) -> None:
        with self._lock:
            self._accepted[camera] += 1

    def published(self, camera: str) -> None:
        with self._lock:
            self._published[camera] += 1

    def expired(self, camera: str) -> None:
        with self._lock:
            self._expired[camera] += 1

    def dropped(self, camera: str, reason: DropReason) -> None:
        with self._lock:
            self._dropped[camera, reason] += 1

    def snapshot(self, camera: str | None = None) -> LedgerSnapshot:
        with self._lock:

            def pick(counter: Counter) -> int:
                return sum(v for k, v in counter.items() if camera is None or k == camera)

            dropped: Counter[str] = Counter()
            for (cam, reason), n in self._dropped.items():
                if camera is None or cam == camera:
                    dropped[reason] += n
            return LedgerSnapshot(pick(self._accepted), pick(self._published), pick(self._expired), dict(dropped))
