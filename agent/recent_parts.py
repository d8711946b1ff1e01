"""The last parts the line scored, by part id: what `confirm-good` can add to a class's patch memory.

Features are not kept anywhere (a ViT-L-14-336 at 518 px holds 22 MB of them per image, more than the
picture), so the agent keeps the pictures of the last `capacity` scored parts (`[agent].confirm_good_parts`),
oldest dropped first, only while `[agent].confirm_good` is on. Thread-safe: the result thread adds, the
command thread reads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class RecentPart:
    """A scored part's picture and class."""

    part_id: str
    product_class: str
    image: np.ndarray


class RecentParts:
    """A bounded map part id -> `RecentPart`, in the order the parts were scored."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._parts: OrderedDict[str, RecentPart] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, part_id: str, product_class: str, image: np.ndarray) -> None:
        with self._lock:
            self._parts.pop(part_id, None)
            self._parts[part_id] = RecentPart(part_id, product_class, image)
            while len(self._parts) > self.capacity:
                self._parts.popitem(last=False)

    def find(self, part_ids: Sequence[str]) -> tuple[dict[str, list[RecentPart]], list[str]]:
        """The parts kept, grouped by class (in the order asked), and the ids not kept."""
        found: dict[str, list[RecentPart]] = {}
        missing = []
        with self._lock:
            for part_id in dict.fromkeys(part_ids):
                part = self._parts.get(part_id)
                if part is None:
                    missing.append(part_id)
                else:
                    found.setdefault(part.product_class, []).append(part)
        return found, missing

    def __len__(self) -> int:
        with self._lock:
            return len(self._parts)
