"""Part identity: the run id that changes at every start, and the part ids made from it.

Contract:
- `new_run_id()` is 12 characters of [0-9a-z]: 6 for the start second (base 36, seconds since
  2020-01-01 UTC, so run ids sort by start time until 2088) and 6 random ones (2.2 billion values), so
  two starts share a run id only if they fall in the same second (or the clock was set back onto an
  earlier start's second) and draw the same random part: 1 in 2.2 billion. It needs no writable
  state: a line whose state directory was wiped still gets a new one.
- `camera_part_id(camera, run_id, seq)` is the id of a part the camera numbered itself:
  `<camera>-<run id>-<seq>`; it never repeats across restarts because the run id does not.
- `repeat_part_id(name, uses)`: a part id taken from outside (a folder file's name) that was already
  used `uses` times gets `<name>~<uses + 1>` (`part-000`, `part-000~2`, `part-000~3` ...).
"""

from __future__ import annotations

import re
import secrets
import time

ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
EPOCH = 1_577_836_800  # 2020-01-01T00:00:00Z
TIME_CHARS = 6
RANDOM_CHARS = 6
RUN_ID = re.compile(rf"[0-9a-z]{{{TIME_CHARS + RANDOM_CHARS}}}")


def _base36(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, digit = divmod(value, 36)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))


def new_run_id(now: float | None = None) -> str:
    """A new run id for a start at `now` (time.time() when None); see the module docstring."""
    seconds = max(0, int(time.time() if now is None else now) - EPOCH)
    return _base36(seconds % 36**TIME_CHARS, TIME_CHARS) + "".join(
        secrets.choice(ALPHABET) for _ in range(RANDOM_CHARS)
    )


def camera_part_id(camera: str, run_id: str, seq: int) -> str:
    """The id of a part numbered by the agent: `<camera>-<run id>-<seq>` (`<camera>-<seq>` without a run id)."""
    return f"{camera}-{run_id}-{seq}" if run_id else f"{camera}-{seq}"


def repeat_part_id(name: str, uses: int) -> str:
    """`name` the first time (`uses` 0), `<name>~<uses + 1>` when parts were already published under it."""
    return name if uses <= 0 else f"{name}~{uses + 1}"
