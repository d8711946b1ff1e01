"""Triggers: the PLC's "a part is in front of camera X, its id is P" and what the agent does with it.

A camera with `acquisition = "triggered"` and `trigger = "mqtt"` takes one frame per trigger. The PLC
publishes on `<prefix>/<line>/<camera>/trigger` (QoS 1, not retained) a JSON object `{"part_id": "P-1"}`,
plain text (the part id), or nothing (the agent makes the id). `parse_trigger` reads the payload;
`TriggerQueue.accept` numbers the trigger (the camera's trigger counter, from 1 at every start) and
queues it for the camera's thread, which binds it to the next frame the camera delivers.

The contract (docs/integration.md, "Acquisition modes"):
- Every accepted trigger gets exactly one decision: the frame bound to it, or a missed-trigger answer
  (ERROR) when no frame came within `trigger_timeout_ms`, or a not-inspected answer at shutdown. The
  camera's thread emits both down the pipeline in trigger order, so decisions keep that order.
- `accept` never blocks (it runs on paho's network thread); it refuses (raises `TriggerRefusedError`, the
  reason a metric label) a payload it cannot read and a trigger beyond MAX_WAITING waiting ones.
- The deadline of a triggered part starts when its trigger arrived (`Trigger.received_*`), the earliest
  moment the agent knows of the part.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

MAX_WAITING = 64  # triggers waiting for a frame, per camera
RECENT_IDS = 256  # a PLC part id seen among a camera's last this many triggers is a repeat (a QoS 1 redelivery)
MAX_PART_ID = 128


class TriggerRefusedError(ValueError):
    """A trigger the agent does not accept; `reason` is short (a metric label), the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Trigger:
    """One accepted trigger: the camera's counter, the PLC's part id (None: the agent makes one), when it came."""

    count: int  # the camera's trigger counter, from 1 at every start; also the part's `seq`
    part_id: str  # the PLC's, or `<camera>-<run id>-<count>` when the trigger named none
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    received_mono: float = field(default_factory=time.monotonic)


def parse_trigger(payload: bytes) -> str | None:
    """The part id a trigger payload names, or None (empty payload, or an object without `part_id`)."""
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TriggerRefusedError("malformed", "trigger payload is not UTF-8 text") from None
    if not text:
        return None
    if text.startswith("{"):
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TriggerRefusedError("malformed", f"trigger payload is not valid JSON: {exc.msg}") from None
        if not isinstance(body, dict) or set(body) - {"part_id"}:
            raise TriggerRefusedError("malformed", 'a trigger object has one optional key, "part_id"')
        value = body.get("part_id")
        if value is None:
            return None
        if not isinstance(value, str):
            raise TriggerRefusedError("malformed", '"part_id" must be a string')
        text = value
    return checked_part_id(text)


def checked_part_id(text: str) -> str:
    """`text` when it is a usable part id: 1 to 128 characters, no control characters."""
    if not text or len(text) > MAX_PART_ID:
        raise TriggerRefusedError("bad_part_id", f"a part id has 1 to {MAX_PART_ID} characters (got {len(text)})")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise TriggerRefusedError("bad_part_id", "a part id must not contain control characters")
    return text


class TriggerQueue:
    """One camera's accepted triggers waiting for a frame, oldest first; thread-safe, `accept` never blocks."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self._waiting: deque[Trigger] = deque()
        self._count = 0
        self._missed = 0
        self._closed = False
        self._recent: deque[str] = deque(maxlen=RECENT_IDS)

    @property
    def count(self) -> int:
        """Triggers accepted since the start."""
        with self._cond:
            return self._count

    @property
    def missed(self) -> int:
        """Accepted triggers that got no frame in time."""
        with self._cond:
            return self._missed

    def counts(self) -> tuple[int, int]:
        """(triggers accepted, missed) since the start, read together."""
        with self._cond:
            return self._count, self._missed

    def accept(
        self, part_id: str | None, make_id: Callable[[int], str], on_accepted: Callable[[Trigger], None] | None = None
    ) -> Trigger:
        """Number and queue a trigger (`make_id(count)` names a part the PLC did not); TriggerRefusedError when
        MAX_WAITING are waiting or the camera stopped. `on_accepted` hears it before the camera can take it
        (the part journal opens it there, so its close can never come first)."""
        with self._cond:
            if self._closed:
                raise TriggerRefusedError("stopping", "the camera is stopping")
            if len(self._waiting) >= MAX_WAITING:
                raise TriggerRefusedError("queue_full", f"{MAX_WAITING} triggers are waiting for a frame already")
            if part_id is not None and part_id in self._recent:
                raise TriggerRefusedError("repeated", f"part {part_id} was triggered already (a redelivered trigger)")
            if part_id is not None:
                self._recent.append(part_id)
            self._count += 1
            trigger = Trigger(self._count, part_id if part_id is not None else make_id(self._count))
            if on_accepted is not None:
                on_accepted(trigger)
            self._waiting.append(trigger)
            self._cond.notify_all()
            return trigger

    def next(self, timeout: float) -> Trigger | None:
        """The oldest waiting trigger, waiting up to `timeout` s for one; None when none came."""
        with self._cond:
            if not self._waiting:
                self._cond.wait(timeout)
            return self._waiting.popleft() if self._waiting else None

    def take_before(self, moment: float) -> Trigger | None:
        """The oldest trigger that arrived before the monotonic time `moment` (a frame grabbed then answers it)."""
        with self._cond:
            if self._waiting and self._waiting[0].received_mono <= moment:
                return self._waiting.popleft()
            return None

    def overdue(self, now: float | None = None) -> list[Trigger]:
        """The waiting triggers older than the timeout, removed and counted as missed, oldest first."""
        now = time.monotonic() if now is None else now
        late: list[Trigger] = []
        with self._cond:
            while self._waiting and now - self._waiting[0].received_mono >= self.timeout_s:
                late.append(self._waiting.popleft())
            self._missed += len(late)
        return late

    def missed_one(self) -> None:
        """Count a trigger the camera's thread took and could not answer with a frame."""
        with self._cond:
            self._missed += 1

    def close(self) -> list[Trigger]:
        """Refuse new triggers; the ones still waiting, to be answered as not inspected."""
        with self._cond:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
            return left
