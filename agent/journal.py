"""The part journal: ids of parts accepted but not yet answered, on disk, so the next start can name them.

A process that is killed (SIGKILL, OOM, a hung device and the watchdog) cannot answer the parts it
held; the PLC rejects them on silence past their deadline, and the next start reports them in a
retained `<prefix>/<line>/lost` message (agent/service.py). The contract:
- `opened(frame)` when the agent accepts a frame, `closed(frame)` when its one decision is handed to
  the publishers (an inspected result, or a fail-safe ERROR answer). Frames whose source offers the
  part again after a drop (folder files: `Frame.redelivered_on`) are not journaled: the file is its
  own journal and is inspected at the next start.
- Each record is one line ("+" or "-", camera, part id, tab-separated) written with one `os.write`
  on an O_APPEND descriptor: what was written survives a SIGKILL (not a power loss: no fsync).
- `recover()` at start returns the previous run's open parts in the order they were accepted and
  starts the file afresh; the file is rewritten with only the open parts every COMPACT_EVERY records.
- `journal_path()` says where the file lives: `parts.journal` in the line's `[agent].state_dir`, beside the
  lock that keeps a second agent of the line (which would read it) from starting.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from agent.frames import Frame
from agent.logs import get_logger

log = get_logger(__name__)
COMPACT_EVERY = 20_000

JOURNAL_NAME = "parts.journal"


def journal_path(state_dir: Path) -> Path:
    """The journal in the line's state directory ([agent].state_dir, agent/instance_lock.py)."""
    return state_dir / JOURNAL_NAME


@dataclass(frozen=True, slots=True)
class LostPart:
    """A part the previous run accepted and never answered."""

    camera: str
    part_id: str


def _key(frame: Frame) -> tuple[str, str]:
    return frame.camera, frame.part_id


def _clean(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ")


class PartJournal:
    """Append-only records of opened and closed parts; thread-safe (camera, result and fail-safe threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._open: dict[tuple[str, str], None] = {}  # insertion-ordered set
        self._records = 0
        self._fd: int | None = None

    def recover(self) -> list[LostPart]:
        """The parts the last run left open, then a fresh file; [] when there was none."""
        lost: dict[tuple[str, str], None] = {}
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            text = ""
        for line in text.splitlines():
            fields = line.split("\t")
            if len(fields) != 3 or fields[0] not in "+-":
                continue  # a torn last line
            if fields[0] == "+":
                lost[fields[1], fields[2]] = None
            else:
                lost.pop((fields[1], fields[2]), None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._rewrite()
        return [LostPart(camera, part) for camera, part in lost]

    def opened(self, frame: Frame) -> None:
        if not frame.redelivered_on:
            self.opened_part(frame.camera, frame.part_id)

    def opened_part(self, camera: str, part_id: str) -> None:
        """A part accepted before it has a frame (a PLC trigger); opening an open part again changes nothing."""
        with self._lock:
            if (camera, part_id) in self._open:
                return
            self._open[camera, part_id] = None
            self._write("+", camera, part_id)

    def closed(self, frame: Frame) -> None:
        with self._lock:
            if _key(frame) not in self._open:  # not journaled (a folder file)
                return
            del self._open[_key(frame)]
            self._write("-", frame.camera, frame.part_id)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def _write(self, sign: str, camera: str, part_id: str) -> None:
        if self._fd is None:
            return
        record = f"{sign}\t{_clean(camera)}\t{_clean(part_id)}\n".encode()
        try:
            os.write(self._fd, record)
        except OSError as exc:  # a full disk must not stop the line; the PLC still rejects on silence
            log.warning("part journal not written", path=str(self.path), error=str(exc))
        self._records += 1
        if self._records >= COMPACT_EVERY:
            self._rewrite()

    def _rewrite(self) -> None:
        """The file anew with only the open parts (under the lock)."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        body = "".join(f"+\t{_clean(c)}\t{_clean(p)}\n" for c, p in self._open)
        try:
            temporary.write_text(body, encoding="utf-8")
            os.replace(temporary, self.path)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        except OSError as exc:
            log.warning("part journal cannot be written; lost parts will not be reported", error=str(exc))
            return
        if self._fd is not None:
            os.close(self._fd)
        self._fd = fd
        self._records = 0


def lost_report(journal: PartJournal, line: str) -> dict[str, object] | None:
    """The retained `lost` message for the parts the previous run accepted and never answered (it was
    killed), or None when there are none or the journal cannot be read (logged)."""
    try:
        lost = journal.recover()
    except OSError as exc:
        log.warning("part journal cannot be read; lost parts are not reported", error=str(exc))
        return None
    if not lost:
        return None
    log.warning("parts the previous run never answered", count=len(lost), path=str(journal.path))
    parts = [{"camera": p.camera, "part_id": p.part_id} for p in lost]
    reported_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return {"schema": 1, "line": line, "reported_at": reported_at, "parts": parts}
