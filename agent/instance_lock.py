"""One agent per line: a lock file in the line's state directory, held for the life of the process.

Contract:
- `state_dir_for(configured, line)`: `[agent].state_dir` when set; else, under systemd, the unit's
  `StateDirectory=` (`$STATE_DIRECTORY`, `/var/lib/genclip/<line>`); else `$XDG_STATE_HOME/genclip/<line>`
  (`~/.local/state/genclip/<line>`) for a checkout.
- `LineLock.acquire()` creates the directory, opens `<state dir>/agent.lock` and takes an exclusive
  `fcntl.flock` without waiting, then writes its pid into the file. A second process for the same
  state directory gets `LineLockedError` naming the holder's pid and the lock path. It must run before
  any broker is touched (`InspectionService.run`), so a double start never shows on the line's status.
- The OS drops the lock when the process dies, however it dies (SIGKILL too): there is no stale lock
  to clean up; the pid left in the file is only a hint and is overwritten by the next holder.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "agent.lock"


class LineLockedError(RuntimeError):
    """Another agent holds the line's lock (or the lock cannot be taken); the message says which and where."""


def state_dir_for(configured: Path | None, line: str) -> Path:
    """The line's state directory (see the module docstring)."""
    if configured is not None:
        return Path(os.path.expanduser(configured))
    systemd = [Path(p) for p in os.environ.get("STATE_DIRECTORY", "").split(":") if p]
    if systemd:
        own = [p for p in systemd if p.name == line]
        return own[0] if own else systemd[0] / line
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(xdg) / "genclip" / line


class LineLock:
    """The exclusive lock of one line's state directory; `acquire` once, `release` (or process exit) frees it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise LineLockedError; never waits."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise LineLockedError(
                f"cannot create the line's lock {self.path}: {exc.strerror or exc} (set [agent].state_dir)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder else "another process"
            raise LineLockedError(
                f"another agent for this line is running ({who}; lock {self.path}): one agent per line"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Free the lock (the file stays; the next holder overwrites the pid)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
