"""The `Frame`: one picture of one part, stamped where it was taken.

Every source makes these and nothing else travels down the pipeline, so a frame
can always be traced back to its camera, sequence number and part. Its `decided` latch is
claimed once, when the part's one decision goes to the publishers (agent/failsafe.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from agent.triggers import Trigger


class DecisionLatch:
    """Set once when the part's decision is handed to the publishers: a part never gets two decisions."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def claim(self) -> bool:
        """True the first time only (an atomic test-and-set: the lock is taken and never released)."""
        return self._lock.acquire(blocking=False)

    @property
    def claimed(self) -> bool:
        return self._lock.locked()


@dataclass(frozen=True, slots=True, eq=False)
class Frame:
    """One captured image with its provenance; `image` is uint8/uint16, BGR HxWx3 or gray HxW."""

    camera: str
    seq: int  # per camera, from 1, never reused while the agent runs (the acquisition counter)
    part_id: str  # the part's identity: a file name, a PLC part number, or "<camera>-<run id>-<seq>"
    product_class: str
    image: np.ndarray
    captured_at: datetime = field(default_factory=lambda: datetime.now(UTC))  # wall clock, UTC
    captured_mono: float = field(default_factory=time.monotonic)  # for latency and staleness
    on_end: Callable[[str], None] | None = field(default=None, repr=False)  # see `end`
    error: str | None = None  # the part was seen but its picture cannot be read: published as ERROR, no engine
    # drop reasons after which the source offers the same part again (a folder keeps the file and retries it):
    # such a drop is not answered with an ERROR decision, the retry is (see agent/failsafe.py)
    redelivered_on: frozenset[str] = frozenset()
    decided: DecisionLatch = field(default_factory=DecisionLatch, repr=False, compare=False)  # see DecisionLatch
    run_id: str = ""  # the agent's run (agent/identity.py): (run_id, camera, seq) never repeats
    trigger: Trigger | None = None  # the PLC's trigger this frame answers (a camera triggered over MQTT)
    missed_triggers: int | None = None  # the camera's missed triggers so far (None: not a triggered camera)
    # why this part is answered without a picture (a missed trigger): published as an uninspected ERROR
    not_inspected: str | None = None
    # a GenICam camera's own numbering of the frame (GigE Vision block id, USB3 Vision frame id) and its
    # timestamp (camera ticks, ns on most cameras), when it gives them; None for other sources
    camera_frame_id: int | None = None
    camera_timestamp: int | None = None

    @property
    def answer_only(self) -> bool:
        """No picture to score: answered as ERROR without the engine (unreadable, or not inspected)."""
        return self.error is not None or self.not_inspected is not None

    @property
    def decided_from(self) -> tuple[datetime, float]:
        """When the part's decision window starts (wall, monotonic): its trigger's arrival, else its capture."""
        if self.trigger is not None:
            return self.trigger.received_at, self.trigger.received_mono
        return self.captured_at, self.captured_mono

    def age_s(self, now: float | None = None) -> float:
        """Seconds since capture, on the monotonic clock."""
        return (time.monotonic() if now is None else now) - self.captured_mono

    def end(self, how: str) -> None:
        """Tell the frame's source how its frame ended: "published" or the drop reason.

        The ledger calls it exactly once per accepted frame; a folder source clears a file away
        only once its result is published, and keeps it for another try otherwise.
        """
        if self.on_end is not None:
            self.on_end(how)
