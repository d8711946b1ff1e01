"""The live feed: what the result thread hands the page for every part, kept bounded and cheap.

`LiveFeed.offer` runs on the result thread once per published part (agent/service.py `publish`). It
only stores references, under a lock held for a few dict and deque operations: no copy, no encoding,
no I/O, whether anybody watches or not. What it keeps is bounded: the latest part of each camera
(with its picture and prediction; a newer part replaces it, so an unwatched frame is simply dropped),
the last `ng_parts` NG parts (with pictures, for the thumbnails), the last `RECENT` parts without
pictures (what an operator may mark good or defect), and the last `EVENTS` parts for the server-sent
events. Every part gets a number, unique in this run, which the page uses as its key.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

import numpy as np

from agent.frames import Frame
from agent.outcomes import Outcome, Prediction
from agent.results import Inspection

RECENT = 512
EVENTS = 512


@dataclass(frozen=True, slots=True, eq=False)
class LivePart:
    """One published part as the page sees it; `image` and `prediction` are references, not copies."""

    number: int
    inspection: Inspection
    image: np.ndarray | None  # the frame's pixels; None for a part answered without a picture
    prediction: Prediction | None  # None for an ERROR part


class LiveFeed:
    """Latest part per camera, last NG parts, recent parts and events; filled by the result thread."""

    def __init__(self, ng_parts: int) -> None:
        self._lock = threading.Lock()
        self._number = 0
        self._latest: dict[str, LivePart] = {}
        self._ng: deque[LivePart] = deque(maxlen=ng_parts)
        self._recent: OrderedDict[int, Inspection] = OrderedDict()
        self._events: deque[LivePart] = deque(maxlen=EVENTS)

    def offer(self, frame: Frame, outcome: Outcome, inspection: Inspection) -> None:
        """Keep a published part (result thread; never blocks for long, never fails on a bad picture)."""
        prediction = outcome if isinstance(outcome, Prediction) else None
        image = frame.image if frame.not_inspected is None and frame.error is None else None
        with self._lock:
            self._number += 1
            part = LivePart(self._number, inspection, image, prediction)
            if image is not None:
                self._latest[inspection.camera] = part
            if inspection.verdict == "NG" and image is not None:
                self._ng.append(part)
            self._recent[part.number] = inspection
            if len(self._recent) > RECENT:
                self._recent.popitem(last=False)
            self._events.append(part)

    def latest(self, camera: str) -> LivePart | None:
        with self._lock:
            return self._latest.get(camera)

    def ng_parts(self) -> list[LivePart]:
        """The last NG parts with pictures, newest first."""
        with self._lock:
            return list(reversed(self._ng))

    def picture(self, number: int) -> LivePart | None:
        """A part whose picture is still kept (an NG thumbnail or a camera's latest), or None."""
        with self._lock:
            found = next((p for p in self._ng if p.number == number), None)
            return found or next((p for p in self._latest.values() if p.number == number), None)

    def recent(self, number: int) -> Inspection | None:
        """One of the last RECENT parts (with or without a picture), or None."""
        with self._lock:
            return self._recent.get(number)

    def since(self, number: int) -> tuple[int, list[LivePart]]:
        """The parts after `number` still held (oldest first), and the newest number."""
        with self._lock:
            newest = self._number
            if newest == number:
                return newest, []
            return newest, [p for p in self._events if p.number > number]
