"""The outbox between the pipeline and a publisher's sender thread, and the delivery counters.

The pipeline must never wait for a broker, so it only appends here; a bounded
FIFO keeps memory flat during a long outage by dropping the oldest entries,
which are the least useful to a line that has moved on.

`LaneOutbox` is two such FIFOs behind one lock: an urgent lane (MQTT rejects and decisions,
status, heartbeat) that the sender always drains first, and a bulk lane (results). Each lane
has its own bound and drops its own oldest entries, so a results backlog can neither delay
nor evict an urgent message.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


class Outbox(Generic[T]):
    """A bounded, thread-safe FIFO: `put` never blocks and drops the oldest entry when full.

    All methods take the condition's lock, so a publisher that shares the condition
    (`cond=`) can wait for its own state and the outbox together.
    """

    def __init__(
        self,
        capacity: int,
        on_drop: Callable[[T], None] | None = None,
        cond: threading.Condition | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.cond = cond if cond is not None else threading.Condition()
        self._items: deque[T] = deque()
        self._on_drop = on_drop

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> None:
        """Append; when full, the oldest entry is dropped and reported to `on_drop`."""
        with self.cond:
            self._items.append(item)
            while len(self._items) > self.capacity:
                dropped = self._items.popleft()
                if self._on_drop is not None:
                    self._on_drop(dropped)
            self.cond.notify_all()

    def put_front(self, items: Iterable[T], *, trim: bool = True) -> None:
        """Give entries back in their order, ahead of the rest (a failed send).

        With trim, the capacity holds as for `put`: entries taken out for a send that
        failed count as still queued, so the oldest go first. Without it nothing is
        dropped, for the few messages that must lead a new connection.
        """
        with self.cond:
            self._items.extendleft(reversed(list(items)))
            while trim and len(self._items) > self.capacity:
                dropped = self._items.popleft()
                if self._on_drop is not None:
                    self._on_drop(dropped)
            self.cond.notify_all()

    def pop(self) -> T | None:
        with self.cond:
            return self._items.popleft() if self._items else None

    def pop_batch(self, limit: int) -> list[T]:
        with self.cond:
            return [self._items.popleft() for _ in range(min(limit, len(self._items)))]

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out every entry matching predicate (kept order), e.g. stale QoS 0 results after a disconnect."""
        with self.cond:
            removed = [i for i in self._items if predicate(i)]
            if removed:
                self._items = deque(i for i in self._items if not predicate(i))
            return removed

    def clear(self) -> list[T]:
        with self.cond:
            items = list(self._items)
            self._items.clear()
            return items


class LaneOutbox(Generic[T]):
    """Two bounded FIFOs sharing one condition: `urgent(item)` picks the lane; the urgent lane pops first.

    Same methods as `Outbox`; order is kept within each lane (not across them).
    """

    def __init__(
        self,
        capacity: int,
        urgent: Callable[[T], bool],
        on_drop: Callable[[T], None] | None = None,
        cond: threading.Condition | None = None,
    ) -> None:
        self.cond = cond if cond is not None else threading.Condition()
        self.urgent_lane: Outbox[T] = Outbox(capacity, on_drop, self.cond)
        self.bulk_lane: Outbox[T] = Outbox(capacity, on_drop, self.cond)
        self._urgent = urgent

    def __len__(self) -> int:
        return len(self.urgent_lane) + len(self.bulk_lane)

    def _lane(self, item: T) -> Outbox[T]:
        return self.urgent_lane if self._urgent(item) else self.bulk_lane

    def put(self, item: T) -> None:
        self._lane(item).put(item)

    def put_front(self, items: Iterable[T], *, trim: bool = True) -> None:
        """Give entries back ahead of the rest of their lane, in their order."""
        items = list(items)
        with self.cond:
            self.urgent_lane.put_front([i for i in items if self._urgent(i)], trim=trim)
            self.bulk_lane.put_front([i for i in items if not self._urgent(i)], trim=trim)

    def pop(self, *, bulk: bool = True) -> T | None:
        """The oldest urgent entry; else, when `bulk`, the oldest bulk entry."""
        with self.cond:
            item = self.urgent_lane.pop()
            return item if item is not None or not bulk else self.bulk_lane.pop()

    def remove_if(self, predicate: Callable[[T], bool]) -> list[T]:
        with self.cond:
            return self.urgent_lane.remove_if(predicate) + self.bulk_lane.remove_if(predicate)

    def clear(self) -> list[T]:
        with self.cond:
            return self.urgent_lane.clear() + self.bulk_lane.clear()


@dataclass
class KindCounts:
    """Delivery outcome of one message kind since start; every message ends in exactly one of these."""

    sent: int = 0  # acknowledged by the broker (QoS >= 1) or written to the socket (QoS 0)
    dropped: int = 0  # outbox full, QoS 0 while disconnected, refused by the broker, or unsent at stop
    expired: int = 0  # past its deadline before it could be sent


class DeliveryStats:
    """Counters a publisher keeps per message kind; the service reads them at scrape time."""

    def __init__(self, kinds: Iterable[str], depth: Callable[[], int]) -> None:
        self.kinds: dict[str, KindCounts] = {k: KindCounts() for k in kinds}
        self.connected = False
        self._depth = depth
        self._lock = threading.Lock()

    def __getitem__(self, kind: str) -> KindCounts:
        return self.kinds[kind]

    @property
    def queued(self) -> int:
        """Entries waiting in the outbox now."""
        return self._depth()

    def count(self, kind: str, outcome: str, n: int = 1) -> None:
        with self._lock:
            counts = self.kinds[kind]
            setattr(counts, outcome, getattr(counts, outcome) + n)

    def counts(self) -> dict[str, dict[str, int]]:
        """{"<kind>": {"sent", "dropped", "expired"}} alone: what /metrics exports as genclip_messages_total."""
        with self._lock:
            return {k: asdict(c) for k, c in self.kinds.items()}

    def snapshot(self) -> dict[str, object]:
        """Plain data: {"connected": bool, "queued": int, "<kind>": {"sent", "dropped", "expired"}}."""
        return {"connected": self.connected, "queued": self.queued, **self.counts()}


def link_health(closed: bool, started: bool, connected: bool, problem: str) -> tuple[bool, str]:
    """A publisher's (healthy, why): the one rule both sinks report by."""
    if closed:
        return False, "stopped"
    if not started:
        return False, "not started"
    if connected:
        return True, "connected"
    return False, problem
