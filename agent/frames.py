"""The `Frame`: one picture of one part, stamped where it was taken.

Every source makes these and nothing else travels down the pipeline, so a frame
can always be traced back to its camera, sequence number and part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np


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
    run_id: str = ""  # the agent's run (agent/identity.py): (run_id, camera, seq) never repeats

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
