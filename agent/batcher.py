"""Camera queues and the `FrameBatcher` that forms engine batches from all of them.

Each camera has a bounded queue with its own policy: `drop_oldest` for live streams
(the newest frame matters, the oldest is dropped and counted) or `block` for files
and folders (the source waits, nothing is lost; a paused one waits until resumed, and a folder part
handed over while paused is stamped again when it is queued: its deadline starts at the resume).
The batcher takes frames from all queues in turn, up to the batch size or until the first frame of the batch
has waited `max_wait_ms`, and drops frames older than their camera's staleness
budget (counted as expired).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.frames import Frame
from agent.ledger import DropReason, FrameLedger
from agent.sources.config import QueuePolicy


@dataclass
class CameraLane:
    """One camera's queue and settings, guarded by the batcher's lock."""

    camera: str
    capacity: int
    policy: QueuePolicy
    max_age_s: float  # 0: no limit
    frames: deque[Frame]
    paused: bool = False


class FrameBatcher:
    """Bounded per-camera queues in, mixed-camera batches out; one consumer (the engine worker)."""

    def __init__(
        self,
        ledger: FrameLedger,
        batch_size: int,
        max_wait_ms: float,
    ) -> None:
        self.ledger = ledger
        self.batch_size = batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._lanes: dict[str, CameraLane] = {}
        self._order: list[str] = []
        self._next = 0
        self._cond = threading.Condition()
        self._closed = False

    def add_camera(self, camera: str, capacity: int, policy: QueuePolicy, max_age_ms: float) -> None:
        with self._cond:
            self._lanes[camera] = CameraLane(camera, capacity, policy, max_age_ms / 1000.0, deque())
            self._order.append(camera)

    def emitter(self, camera: str) -> Callable[[Frame], None]:
        """The `emit` a source calls with each frame it captured."""
        return lambda frame: self.put(camera, frame)

    def depth(self, camera: str | None = None) -> int:
        with self._cond:
            return sum(len(lane.frames) for name, lane in self._lanes.items() if camera in (None, name))

    def set_paused(self, camera: str | None, paused: bool) -> list[str]:
        """Pause or resume one camera or all; returns the cameras changed.

        A paused 'drop_oldest' camera (a live stream) drops its frames as 'paused'; a paused 'block' camera
        (files, folders) keeps what is queued and holds its source in `put` until it is resumed: no part
        of a folder is skipped, and none is read again and again while the line waits.
        """
        with self._cond:
            names = [camera] if camera else list(self._lanes)
            unknown = [n for n in names if n not in self._lanes]
            if unknown:
                raise KeyError(f"unknown camera {unknown[0]!r}; cameras: {', '.join(self._lanes)}")
            for name in names:
                lane = self._lanes[name]
                lane.paused = paused
                if paused and lane.policy != "block":
                    while lane.frames:
                        self._drop(lane.frames.popleft(), "paused")
            self._cond.notify_all()
            return names

    def paused(self) -> list[str]:
        with self._cond:
            return [n for n, lane in self._lanes.items() if lane.paused]

    def is_paused(self, camera: str) -> bool:
        """Whether `camera` is paused now (a folder source asks before it reads a new file)."""
        with self._cond:
            lane = self._lanes.get(camera)
            return lane is not None and lane.paused

    def put(self, camera: str, frame: Frame) -> None:
        """Accept a frame (counted), then queue it by the camera's policy; with 'block' it may wait for room,
        or for the camera to be resumed."""
        self.ledger.accepted(camera)
        with self._cond:
            lane = self._lanes[camera]
            if self._closed:
                self._drop(frame, "shutdown")
                return
            if lane.policy == "block":
                taken_while_paused = lane.paused
                while (len(lane.frames) >= lane.capacity or lane.paused) and not self._closed:
                    self._cond.wait(0.5)
                if self._closed:
                    self._drop(frame, "shutdown")
                    return
                if taken_while_paused and "paused" in frame.redelivered_on:
                    frame = retaken(frame)
            elif lane.paused:
                self._drop(frame, "paused")
                return
            elif len(lane.frames) >= lane.capacity:
                self._drop(lane.frames.popleft(), "queue_full")
            lane.frames.append(frame)
            self._cond.notify_all()

    def _drop(self, frame: Frame, reason: DropReason) -> None:
        self.ledger.dropped(frame, reason)

    def _take_one(self, now: float) -> Frame | None:
        """The next frame, cameras in turn; stale frames on the way are counted as expired."""
        for _ in range(len(self._order)):
            lane = self._lanes[self._order[self._next % len(self._order)]]
            self._next += 1
            while lane.frames and not lane.paused:
                frame = lane.frames.popleft()
                if lane.max_age_s and frame.age_s(now) > lane.max_age_s:
                    self.ledger.expired(frame)
                    continue
                return frame
        return None

    def next_batch(self, timeout: float) -> list[Frame]:
        """Up to batch_size frames, waiting at most `timeout` for the first, and for the rest until the first
        is `max_wait_ms` old (a frame that already waited in its queue does not wait again for company)."""
        deadline = time.monotonic() + timeout
        batch: list[Frame] = []
        with self._cond:
            while True:
                now = time.monotonic()
                while len(batch) < self.batch_size:
                    frame = self._take_one(now)
                    if frame is None:
                        break
                    batch.append(frame)
                    if len(batch) == 1:
                        deadline = min(now, frame.captured_mono) + self.max_wait_s
                self._cond.notify_all()  # room for blocked sources
                if len(batch) >= self.batch_size or now >= deadline or (self._closed and not batch):
                    return batch
                if self._closed and self._takeable() == 0:
                    return batch
                self._cond.wait(max(0.0, deadline - now))

    def _takeable(self) -> int:
        return sum(len(lane.frames) for lane in self._lanes.values() if not lane.paused)

    def takeable(self) -> int:
        """Frames the engine could take now (those of paused cameras wait)."""
        with self._cond:
            return self._takeable()

    def close(self) -> None:
        """No more frames are accepted (they are dropped as 'shutdown'); queued ones can still be taken."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self, reason: DropReason = "shutdown") -> int:
        """Drop everything still queued, counted; returns how many."""
        with self._cond:
            count = 0
            for lane in self._lanes.values():
                while lane.frames:
                    self._drop(lane.frames.popleft(), reason)
                    count += 1
            self._cond.notify_all()
            return count


def retaken(frame: Frame) -> Frame:
    """The frame stamped now: a part its source handed over while its camera was paused is taken at resume.

    Only for frames whose source offers the part again after a 'paused' drop (a folder file, which stays in
    the folder until its result is out): such a part was not taken while paused, so its capture time, and
    the decision window the PLC waits for (its deadline), start when it is queued. Same part, seq and latch.
    """
    return dataclasses.replace(frame, captured_at=datetime.now(UTC), captured_mono=time.monotonic())
