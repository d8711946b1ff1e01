"""Helpers for the frame-source tests: a thread-safe emit that records frames, and waiting on conditions."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from agent.frames import Frame
from agent.sources import FrameSource


class Collector:
    """An `emit` that keeps every frame; `fail` makes chosen calls raise, like a broken pipeline.

    Each kept frame is ended at once as `end` says ("published": as if its result went out at once;
    None: left in flight, for the test to end).
    """

    def __init__(self, fail: Callable[[Frame], bool] | None = None, end: str | None = "published") -> None:
        self.frames: list[Frame] = []
        self.calls = 0
        self.fail = fail
        self.end = end
        self._lock = threading.Lock()

    def __call__(self, frame: Frame) -> None:
        with self._lock:
            self.calls += 1
        if self.fail is not None and self.fail(frame):
            raise RuntimeError("pipeline refused the frame")
        with self._lock:
            self.frames.append(frame)
        if self.end is not None:
            frame.end(self.end)

    def __len__(self) -> int:
        with self._lock:
            return len(self.frames)

    def snapshot(self) -> list[Frame]:
        with self._lock:
            return list(self.frames)


def wait_until(condition: Callable[[], object], timeout: float = 5.0, every: float = 0.005) -> bool:
    """Poll `condition` until it is true or `timeout` s pass; returns whether it came true."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


def stop_promptly(source: FrameSource, limit: float = 2.0) -> float:
    """Stop the source, check that its thread ended within `limit` s; returns the time taken."""
    start = time.monotonic()
    source.stop(timeout=limit + 1)
    took = time.monotonic() - start
    assert not source.alive, f"thread of {source.camera.id} still running after stop()"
    assert took < limit, f"stop() took {took:.2f} s"
    return took
