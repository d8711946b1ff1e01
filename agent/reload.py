"""Load new prompt checkpoints without a restart: watch a file or a publish folder.

The operating system reports changes (inotify through `watchdog`); a single
worker thread debounces them and calls `on_change`, so a burst of publishes is
one reload and two reloads never run at once. Checkpoints are published
atomically (a hidden temp file renamed into place, see `model.checkpoint`), so
temp files are ignored and the rename is the signal.

A target whose folder does not exist yet is not an error and nothing is
created: the nearest existing ancestor is watched until the folder appears (a
line may start before its first training run has published anything).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler, FileSystemMovedEvent
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch

from agent.logs import get_logger
from model.checkpoint_files import (
    CHECKPOINT_SUFFIX,
    is_unpublished,
    newest_checkpoint,
    resolve_checkpoint,
)

log = get_logger(__name__)

# Events that can mean "a checkpoint is now in place"; deletions never trigger a load.
TRIGGERS = ("created", "modified", "moved", "closed")
# A stream of events never postpones a reload by more than this many debounce periods.
MAX_WAIT_FACTOR = 5


def checkpoint_signature(target: Path | None) -> tuple[Path, int, int] | None:
    """(path, size, mtime) of the checkpoint `target` resolves to (a file, or a folder's newest), or None."""
    path = resolve_checkpoint(target) if target is not None else None
    try:
        st = path.stat() if path is not None else None
    except OSError:
        return None
    return (path, st.st_size, st.st_mtime_ns) if path is not None and st is not None else None


class CheckpointWatcher:
    """Calls `on_change(path)` when the checkpoint at `target` is (re)published.

    `target` is a file (it exists, or its name ends in .safetensors): fire when that
    file is created, written or renamed into place. Otherwise it is a folder: fire with
    the newest checkpoint in it when one appears or is replaced. The same file
    (inode, size, mtime) is not reported twice in a row. Call start() before loading
    the newest checkpoint at start-up, so nothing published in between is missed.
    """

    def __init__(self, target: Path, on_change: Callable[[Path], None], debounce_s: float = 0.5) -> None:
        self.target = Path(target).absolute()
        self.single_file = self.target.is_file() or self.target.suffix == CHECKPOINT_SUFFIX
        self.folder = self.target.parent if self.single_file else self.target
        self._on_change = on_change
        self._debounce_s = max(0.0, debounce_s)
        self._cond = threading.Condition()
        self._first_event: float | None = None
        self._last_event = 0.0
        self._rearm = False
        self._stopping = False
        self._observer: BaseObserver | None = None
        self._watch: ObservedWatch | None = None
        self._watched: Path | None = None
        self._worker: threading.Thread | None = None
        self._last_fired: tuple[Path, int, int, int] | None = None

    def start(self) -> None:
        if self._worker is not None:
            raise RuntimeError("checkpoint watcher already started")
        self._stopping = False
        self._observer = Observer()
        self._arm(initial=True)
        self._observer.start()
        self._worker = threading.Thread(target=self._run, name="checkpoint-watcher", daemon=True)
        self._worker.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop watching; waits up to `timeout` s (None: as long as it takes) for an `on_change` call in
        progress to return (a service stopping does not wait minutes for a reload to finish)."""
        if self._worker is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        assert self._observer is not None
        self._observer.stop()
        self._observer.join(timeout)
        self._worker.join(timeout)
        self._worker = self._observer = self._watch = self._watched = None

    # -- event side (watchdog's thread): only record what happened --

    def _event(self, event: FileSystemEvent) -> None:
        paths = [Path(os.fsdecode(event.src_path))]
        if isinstance(event, FileSystemMovedEvent) and event.dest_path:
            paths.append(Path(os.fsdecode(event.dest_path)))
        if event.is_directory:
            # Our folder (or one on the way to it) appeared, moved or vanished: choose the watch again.
            if event.event_type in ("created", "deleted", "moved") and any(
                p == self.folder or p in self.folder.parents for p in paths
            ):
                with self._cond:
                    self._rearm = True
                    self._cond.notify_all()
            return
        if event.event_type in TRIGGERS and any(self._wanted(p) for p in paths):
            self._pending()

    def _wanted(self, path: Path) -> bool:
        if self.single_file:
            return path == self.target
        return path.parent == self.folder and path.name.endswith(CHECKPOINT_SUFFIX) and not is_unpublished(path.name)

    def _pending(self) -> None:
        with self._cond:
            now = time.monotonic()
            if self._first_event is None:
                self._first_event = now
            self._last_event = now
            self._cond.notify_all()

    # -- worker side: re-arm the watch, debounce, call back one at a time --

    def _due(self) -> float | None:
        """Seconds until the pending reload is due (<= 0: now); None when nothing is pending."""
        if self._first_event is None:
            return None
        due = min(self._last_event + self._debounce_s, self._first_event + MAX_WAIT_FACTOR * self._debounce_s)
        return due - time.monotonic()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._rearm and ((wait := self._due()) is None or wait > 0):
                    self._cond.wait(wait)
                if self._stopping:
                    return
                rearm, self._rearm = self._rearm, False
                wait = self._due()
                fire = wait is not None and wait <= 0
                if fire:
                    self._first_event = None
            if rearm:
                try:
                    self._arm()
                except OSError:  # e.g. out of inotify watches; the next folder event tries again
                    log.exception("cannot watch the checkpoint folder", folder=str(self.folder))
            if fire:
                self._fire()

    def _arm(self, initial: bool = False) -> None:
        """Watch the checkpoint folder, or while it is missing its nearest existing ancestor."""
        assert self._observer is not None
        while True:
            where = next((p for p in (self.folder, *self.folder.parents) if p.is_dir()), None)
            if where is None or where == self._watched:
                return
            if self._watch is not None:
                self._observer.unschedule(self._watch)
            self._watch = self._observer.schedule(_Handler(self._event), str(where), recursive=False)
            self._watched = where
            if where == self.folder:
                break
            log.warning(
                "checkpoint folder does not exist yet; waiting for it", folder=str(self.folder), watching=str(where)
            )
            # Look again: a deeper folder may have appeared before this watch existed (mkdir -p).
            initial = False
        log.info("watching for prompt checkpoints", target=str(self.target), folder=str(self.folder))
        # The folder appeared after start(), perhaps with a checkpoint already in it: that one is new.
        if not initial and self._resolve() is not None:
            self._pending()

    def _resolve(self) -> Path | None:
        if self.single_file:
            return self.target if self.target.is_file() else None
        return newest_checkpoint(self.folder)

    def _fire(self) -> None:
        path = self._resolve()
        if path is None:
            return
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        signature = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        if signature == self._last_fired:
            return
        # Recorded before the call: a checkpoint the callback refuses is not retried until it changes.
        self._last_fired = signature
        log.info("prompt checkpoint changed", path=str(path))
        try:
            self._on_change(path)
        except Exception:
            log.exception("reloading the prompt checkpoint failed; still watching", path=str(path))


class _Handler(FileSystemEventHandler):
    def __init__(self, callback: Callable[[FileSystemEvent], None]) -> None:
        self._callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._callback(event)
