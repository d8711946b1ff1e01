"""One camera's result buffer and the ResultValid/ResultAck handshake a PLC runs with it (no asyncua here).

Like a smart camera's result buffer: results wait, oldest first, until the PLC has taken them.

With `[opcua].handshake = true` (the default), a four-phase handshake, one result at a time:

1. the server writes the oldest unacknowledged result into the result variables, then sets
   `ResultValid` = true;
2. the PLC reads them and writes `ResultAck` = true;
3. the server drops that result from the buffer and sets `ResultValid` = false;
4. the PLC writes `ResultAck` = false; the server presents the next buffered result (step 1), if any.

The buffer holds `[opcua].result_buffer` unacknowledged results, the presented one included. A result
that comes when it is full is **discarded** (the newest is lost, the buffered ones stay: the PLC gets
its parts in order, and the discarded part gets no answer here, so the PLC's silence rule rejects it):
`DiscardedResults` counts it, it still uses up its `ResultCounter` number (the PLC sees a gap), and
`Overrun` becomes true. The buffer drains by one result per acknowledgement (phase 3); `Overrun` goes
back to false with the acknowledgement that empties it.

With `handshake = false` every result is presented as it comes (`ResultValid` true from the first),
nothing is buffered or discarded, and `ResultAck` is ignored: for clients that only watch.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from agent.opcua.nodes import PlcResult


@dataclass(frozen=True, slots=True)
class HandshakeState:
    """What the handshake variables show, and the presented result (None before the first)."""

    presented: PlcResult | None
    valid: bool
    overrun: bool
    buffered: int
    discarded: int

    def values(self) -> dict[str, object]:
        return {
            "ResultValid": self.valid,
            "Overrun": self.overrun,
            "BufferedResults": self.buffered,
            "DiscardedResults": self.discarded,
        }


class ResultHandshake:
    """One camera's buffer; not thread-safe (the server's loop owns it)."""

    def __init__(self, capacity: int, *, handshake: bool = True) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.handshake = handshake
        self._waiting: deque[PlcResult] = deque()  # unacknowledged, oldest first; [0] is presented when valid
        self._presented: PlcResult | None = None
        self._valid = False
        self._ack = False  # the PLC's last ResultAck
        self._overrun = False
        self._numbered = 0
        self._discarded = 0

    @property
    def numbered(self) -> int:
        """Results numbered so far (the last ResultCounter given)."""
        return self._numbered

    def state(self) -> HandshakeState:
        return HandshakeState(self._presented, self._valid, self._overrun, len(self._waiting), self._discarded)

    def add(self, result: PlcResult) -> PlcResult | None:
        """Number a new result and buffer it; the result now presented when that changed, else None."""
        self._numbered += 1
        result = replace(result, number=self._numbered)
        if not self.handshake:
            self._presented, self._valid = result, True
            return result
        if len(self._waiting) >= self.capacity:
            self._discarded += 1
            self._overrun = True
            return None
        self._waiting.append(result)
        return self._present()

    def acknowledge(self, ack: bool) -> PlcResult | None:
        """The PLC wrote ResultAck; the result now presented when that changed, else None."""
        if not self.handshake:
            return None
        previous, self._ack = self._ack, ack
        if ack and not previous and self._valid:
            self._waiting.popleft()
            self._valid = False
            if not self._waiting:
                self._overrun = False
            return None
        return self._present()

    def _present(self) -> PlcResult | None:
        """Phase 1: the oldest buffered result, when none is presented and the PLC's ack is back to false."""
        if self._valid or self._ack or not self._waiting:
            return None
        self._presented, self._valid = self._waiting[0], True
        return self._presented
