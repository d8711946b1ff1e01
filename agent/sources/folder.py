"""A folder a frame grabber drops images into: each file is one part, named by its file name.

watchdog reports new and moved-in files; one scan at start takes what is already there. A
file is read only after its size and mtime held for `settle_ms` since the last event about
it, and it must decode (a failure right after settling gets a short retry, then the file
is rejected). Files are taken oldest first (mtime, then name).

A file stays where it is until its frame has ended (`Frame.end`): once its result is
published (handed to the publishers) it moves to `done_dir` (or is deleted); a frame the agent
dropped (too old) leaves the file to be tried again after a backoff, one dropped at shutdown
leaves it for the next start, and one whose result could not be built moves it to
`rejected_dir`. An image file that cannot be read is emitted as an error frame (published as
an ERROR result, a reject) and then moves to `rejected_dir` with a `<name>.reason.txt`; a file
that is no image at all goes there at once. When a file cannot be moved, the source stops
taking files, leaves them where they are, shows 'failed' and retries with the backoff. So a
file is never lost, and it is inspected again only when the agent stopped before its result
was handed over (at least once, never zero times).

Paused: a folder camera that is paused (`pause` command; `paused` asks the batcher, see
`open_source`) reads, decodes and stamps no new file: files stay in the folder, untouched, and the
next is read when the camera is resumed, so its part's capture time and deadline start then. Files
whose frames were out before the pause are still cleared away. A file read just as the pause came
waits in the batcher, and is stamped again when it is queued at resume (agent/batcher.py).

Sub-folders: with `recursive = false` (the default) only the folder itself is read. Images in its
sub-folders (not done/, rejected/, the configured done_dir/rejected_dir, nor hidden ones) are counted
every `SUBFOLDERS_CHECK_S`: each sub-folder that holds some is warned about once (again only after it
was emptied) and listed in the camera's status detail, so a grabber writing one level too deep is seen,
not silently ignored. With `recursive = true` they are parts too: the part id is the path below the
folder without the extension (`lot-7/part-000`), and done/ and rejected/ keep the sub-folder
(`done/lot-7/part-000.png`).

Part ids: a file's part id is its name without the extension (`part-000.png` -> `part-000`). A
name that parts were already published under is a new part, not a repeat: the second part from a
file of that name gets `part-000~2`, the third `part-000~3` (agent/identity.py). Earlier uses are
counted in this run and, at the first sight of a name in a run, from the copies `move_into` left in
`done_dir` (with `after = "move"`) and `rejected_dir` (`part-000.png`, `part-000-1.png` ...). A file
tried again after its frame was dropped, or left for the next start, keeps its id (the same part).
"""

from __future__ import annotations

import errno
import heapq
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from agent.identity import repeat_part_id
from agent.images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, UnreadableImageError, read_frame
from agent.logs import get_logger
from agent.sources.base import Emit, FrameSource, SourceError
from agent.sources.config import TEMP_SUFFIXES, CameraConfig

DECODE_RETRIES = 2
DECODE_RETRY_S = 0.2  # at least this long between decode attempts of a settled file
IDLE_CHECK_S = 1.0  # how often an idle source checks that its folder and observer are still there
SUBFOLDERS_CHECK_S = 10.0  # how often a non-recursive source counts the images in sub-folders it does not read
COUNT_LIMIT = 10_000  # directory entries looked at per sub-folder count; beyond it the count reads "at least"
PAUSED_CHECK_S = 0.05  # how often a paused source with a file waiting looks whether it was resumed
DONE = "done"  # a pending action: clear the file away (to done_dir, or delete it); any other action is a reject reason
# A dropped file stays in the folder and is tried again (at the next start after "shutdown"): its part is
# answered by that try, never with an ERROR now (the PLC would get two decisions). Only "invalid" ends the file.
RETRIED_DROPS = frozenset({"queue_full", "paused", "stale", "shutdown"})
UNBUILDABLE = "inspected, but its result could not be built (see the agent's log)"

log = get_logger(__name__)


class _BlockedError(SourceError):
    """A file could not be moved out of the way (done/ or rejected/ unwritable): stop taking files."""


@dataclass
class _Unsettled:
    due: float  # monotonic: when to look at the file again
    size: int = -1
    mtime_ns: int = -1


def is_ignored(name: str) -> bool:
    """Hidden files and the temporary names writers use before renaming into place."""
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


class _Handler(FileSystemEventHandler):
    def __init__(self, source: FolderSource) -> None:
        self.source = source

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            if self.source.camera.recursive and event.event_type in (EVENT_TYPE_CREATED, EVENT_TYPE_MOVED):
                moved = event.event_type == EVENT_TYPE_MOVED
                self.source._note_tree(Path(os.fsdecode(event.dest_path if moved else event.src_path)))
            return
        if event.event_type in (EVENT_TYPE_DELETED, EVENT_TYPE_MOVED):
            self.source._forget(Path(os.fsdecode(event.src_path)))
        if event.event_type == EVENT_TYPE_MOVED:
            self.source._note(Path(os.fsdecode(event.dest_path)))
        elif event.event_type in (EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_CLOSED):
            self.source._note(Path(os.fsdecode(event.src_path)))


class FolderSource(FrameSource):
    """Watches `camera.source` (its sub-folders too when `recursive`) and emits each settled image file once."""

    def __init__(
        self,
        camera: CameraConfig,
        emit: Emit,
        *,
        line_id: str = "",
        max_frame_pixels: int | None = DEFAULT_MAX_PIXELS,
        run_id: str | None = None,
        paused: Callable[[], bool] | None = None,
    ) -> None:
        super().__init__(camera, emit, line_id=line_id, run_id=run_id)
        self._paused = paused  # whether the camera is paused now (the batcher's word); None: never
        self.max_frame_pixels = max_frame_pixels  # larger images are rejected from their header, undecoded
        self.folder = self.camera.folder
        self._settle_s = self.camera.settle_ms / 1000
        self._guard = threading.Lock()
        self._wake = threading.Event()
        self._unsettled: dict[Path, _Unsettled] = {}  # guarded by _guard; written by the observer thread
        self._ready: list[tuple[int, str, Path]] = []  # heap of (mtime_ns, name, path); capture thread only
        self._decode_failures: dict[Path, int] = {}
        self._in_flight: set[Path] = set()  # guarded: emitted, its frame not ended yet (still in the pipeline)
        # guarded: how in-flight frames ended, (path, unreadable, how), for the capture thread
        self._ended: deque[tuple[Path, str | None, str]] = deque()
        self._late = threading.Lock()  # ends carried out after the capture thread ended
        self._closed = False  # guarded: the capture thread is gone; ends are carried out where they happen
        self._pending: dict[Path, str] = {}  # capture thread: DONE or a reject reason, not carried out yet
        self._drops: dict[Path, int] = {}  # capture thread: how often a file's frame was dropped (its backoff)
        self._uses: dict[str, int] = {}  # capture thread: relative path -> parts published under it (see part ids)
        own = (self.folder / "done", self.folder / "rejected", camera.resolved_done_dir, camera.resolved_rejected_dir)
        self._own_dirs = frozenset(_absolute(path) for path in own)  # where files go, never read from
        self._unread: dict[str, tuple[int, bool]] = {}  # capture thread: sub-folder -> images not read, all counted
        self._next_count = 0.0  # capture thread: monotonic time of the next count of `_unread`

    # --- called from the observer thread ---------------------------------------------------------------
    def _note(self, path: Path) -> None:
        """Something happened to `path`: look at it again `settle_ms` from now."""
        if not self._takes(path):
            return
        with self._guard:
            entry = self._unsettled.setdefault(path, _Unsettled(0.0))
            entry.due = time.monotonic() + self._settle_s
        self._wake.set()

    def _note_tree(self, folder: Path) -> None:
        """Note every file below `folder` (recursive sources: at start, and a sub-folder that appeared)."""
        if _absolute(folder) in self._own_dirs or not self._takes(folder / "file"):
            return
        for parent, dirs, names in os.walk(folder):
            dirs[:] = [d for d in dirs if not is_ignored(d) and _absolute(Path(parent, d)) not in self._own_dirs]
            for name in names:
                self._note(Path(parent, name))

    def _takes(self, path: Path) -> bool:
        """Whether `path` is a file this source reads: in the folder, or below it when recursive (not in
        done/ or rejected/, nor in a hidden sub-folder)."""
        if is_ignored(path.name):
            return False
        if path.parent == self.folder:
            return True
        if not self.camera.recursive or self.folder not in path.parents:
            return False
        between = path.relative_to(self.folder).parents
        return not any(is_ignored(p.name) or _absolute(self.folder / p) in self._own_dirs for p in between)

    def _forget(self, path: Path) -> None:
        with self._guard:
            self._unsettled.pop(path, None)

    # --- called by the ledger, from any thread (possibly under the batcher's lock: no file work then) ----
    def _on_end(self, path: Path, unreadable: str | None, how: str) -> None:
        """`unreadable`: why the file's picture could not be read (its frame was an ERROR result), else None."""
        with self._guard:
            if not self._closed:
                self._ended.append((path, unreadable, how))
                self._wake.set()
                return
            self._in_flight.discard(path)
        action = self._action(unreadable, how)
        if action is not None:  # else dropped: the file stays for the next start
            self._carry_out_late(path, action)

    @staticmethod
    def _action(unreadable: str | None, how: str) -> str | None:
        """What an ended frame asks for its file: DONE, a reject reason, or None (keep it, try again)."""
        if how == "published":
            return unreadable or DONE
        if how == "invalid":
            return unreadable or UNBUILDABLE
        return None

    def _carry_out_late(self, path: Path, action: str) -> None:
        """After the capture thread ended: no backoff to retry with, so a blocked move leaves the file.
        Not under `_guard`: the batcher may be waiting on it to end a frame, and a move can be slow (NFS)."""
        with self._late:  # ends can come from several threads now
            try:
                self._carry_out(path, action)
            except _BlockedError as exc:
                log.warning("file left in the folder; it is inspected again at the next start", error=str(exc))

    def _interrupt(self) -> None:
        self._wake.set()

    # --- capture thread --------------------------------------------------------------------------------
    def _run(self) -> None:
        if not self.folder.is_dir():
            raise SourceError(f"folder not found: {self.folder}")
        targets = {"done_dir": self.camera.resolved_done_dir, "rejected_dir": self.camera.resolved_rejected_dir}
        for name, target in targets.items():
            if target.resolve() == self.folder.resolve():
                raise SourceError(f"{name} must not be the watched folder itself")
        observer = Observer()
        observer.schedule(_Handler(self), str(self.folder), recursive=self.camera.recursive)
        observer.start()
        try:
            self._scan()  # after the observer starts, so no file falls between
            self._set_running()
            while not self._stopping.is_set():
                if not observer.is_alive() or not self.folder.is_dir():
                    raise SourceError(f"lost the watch on {self.folder}")
                self._count_unread()
                self._take_ended()
                self._settle()
                if self._ready and not self._waits_for_resume():
                    self._take_next()
                else:
                    self._wake.wait(PAUSED_CHECK_S if self._ready else self._idle_wait())
                    self._wake.clear()
        finally:
            observer.stop()
            observer.join(2.0)

    def _scan(self) -> None:
        """Note the files already there: in the folder, or below it when recursive."""
        if self.camera.recursive:
            self._note_tree(self.folder)
            return
        for entry in os.scandir(self.folder):
            self._note(Path(entry.path))

    def _set_running(self) -> None:
        """State 'running'; the detail names the sub-folders whose images are not read."""
        unread = self._unread.items()
        counts = [f"{name}/ holds {'' if whole else 'at least '}{n} image(s)" for name, (n, whole) in unread]
        detail = f"sub-folders not read (recursive = false): {', '.join(counts)}" if counts else ""
        self._set_state("running", detail)

    def _count_unread(self) -> None:
        """Every SUBFOLDERS_CHECK_S (recursive off): count the images in sub-folders; warn about a sub-folder
        once when images appear in it, and keep the counts in the status detail."""
        now = time.monotonic()
        if self.camera.recursive or now < self._next_count:
            return
        self._next_count = now + SUBFOLDERS_CHECK_S
        unread = {}
        for entry in _entries(self.folder):
            if entry.is_dir() and not is_ignored(entry.name) and _absolute(Path(entry.path)) not in self._own_dirs:
                images = count_images(Path(entry.path), self._own_dirs)
                if images[0]:
                    unread[entry.name] = images
        for name in sorted(unread.keys() - self._unread.keys()):
            self.log.warning(
                "images in a sub-folder are not read",
                sub_folder=str(self.folder / name),
                images=unread[name][0],
                hint="only files directly in the folder are parts: have the grabber write there, or set "
                "recursive = true for this camera to take sub-folders too",
            )
        changed = unread != self._unread
        self._unread = dict(sorted(unread.items()))
        if changed and self.status().state == "running":
            self._set_running()

    def _waits_for_resume(self) -> bool:
        """Paused, and the next file is a new one: leave it unread where it is (clearing files away goes on)."""
        if self._paused is None or not self._paused():
            return False
        return self._ready[0][2] not in self._pending

    def _idle_wait(self) -> float:
        with self._guard:
            next_due = min((e.due for e in self._unsettled.values()), default=None)
        if next_due is None:
            return IDLE_CHECK_S
        return min(IDLE_CHECK_S, max(0.0, next_due - time.monotonic()))

    def _settle(self) -> None:
        """Move files whose size and mtime held for `settle_ms` to the ready heap."""
        now = time.monotonic()
        with self._guard:
            due = [(path, entry) for path, entry in self._unsettled.items() if entry.due <= now]
        for path, entry in due:
            try:
                stat = path.stat()
            except OSError:
                self._forget(path)  # gone (or moved) before it settled
                continue
            if not path.is_file():
                self._forget(path)
                continue
            with self._guard:
                if (stat.st_size, stat.st_mtime_ns) != (entry.size, entry.mtime_ns) or entry.due > now:
                    entry.size, entry.mtime_ns = stat.st_size, stat.st_mtime_ns
                    entry.due = max(entry.due, now + self._settle_s)
                    continue
                del self._unsettled[path]
            heapq.heappush(self._ready, (stat.st_mtime_ns, self._relative(path), path))

    def _take_ended(self) -> None:
        """Act on how in-flight frames ended: clear published files away (first in line), retry dropped ones."""
        with self._guard:
            ended, self._ended = list(self._ended), deque()
        now = time.monotonic()
        for path, unreadable, how in ended:
            with self._guard:
                self._in_flight.discard(path)
            action = self._action(unreadable, how)
            if action is not None:
                key = self._relative(path)
                self._uses[key] = self._uses.get(key, 0) + 1  # its part id is taken
                self._pending[path] = action
                heapq.heappush(self._ready, (0, self._relative(path), path))  # before any new file
            elif how != "shutdown":  # stale, queue_full: the part was not inspected; try again later
                drops = self._drops[path] = self._drops.get(path, 0) + 1
                wait = min(self.camera.reconnect_max_s, self.camera.reconnect_min_s * 2 ** min(drops - 1, 16))
                with self._guard:
                    self._unsettled[path] = _Unsettled(now + max(wait, self._settle_s))

    def _take_next(self) -> None:
        """Emit the oldest ready file, or carry out what its ended frame asks; on a blocked move, back off."""
        self._take_ended()
        item = heapq.heappop(self._ready)
        path = item[2]
        with self._guard:
            if path in self._unsettled and path not in self._pending:  # written to again since it settled
                return
        try:
            self._process(path)
        except _BlockedError as exc:
            heapq.heappush(self._ready, item)
            self._count_error("cannot clear files away; not taking new ones", exc)
            self._back_off("failed", str(exc))
            return
        if self.status().state != "running":
            self._set_running()
            self.backoff.reset()

    def _process(self, path: Path) -> None:
        action = self._pending.get(path)
        if action is not None:  # its frame ended: only clear it away
            self._carry_out(path, action)
            return
        with self._guard:
            if path in self._in_flight:  # its frame is still in the pipeline; its end brings it back
                return
        if not path.exists():
            return
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            suffix = path.suffix or "no extension"
            self._reject(path, f"not an image file name ({suffix}); expected {', '.join(IMAGE_SUFFIXES)}")
            return
        try:
            image = read_frame(path, self.max_frame_pixels)
        except UnreadableImageError as exc:
            failures = self._decode_failures.get(path, 0)
            if failures < DECODE_RETRIES:
                self._decode_failures[path] = failures + 1
                with self._guard:
                    self._unsettled[path] = _Unsettled(time.monotonic() + max(DECODE_RETRY_S, self._settle_s))
                return
            # A part the grabber saw but whose picture is unreadable: the PLC gets an ERROR result (a reject);
            # the file moves to rejected/ once that result is out.
            self._count_error("file rejected", UnreadableImageError(f"{path.name}: {exc}"))
            self._emit_for(path, np.zeros((0, 0), np.uint8), unreadable=str(exc))
            return
        if self.camera.after == "move":  # before emitting: a full disk must not cost a frame
            self._ensure_dir(self._below(self.camera.resolved_done_dir, path))
        self._emit_for(path, image)

    def _emit_for(self, path: Path, image: np.ndarray, unreadable: str | None = None) -> None:
        """Emit the file's frame; the file stays in flight until the frame ends."""
        with self._guard:
            self._in_flight.add(path)
        error = f"{path.name}: {unreadable}" if unreadable is not None else None
        on_end = partial(self._on_end, path, unreadable)
        frame = self._emit_frame(
            image, part_id=self._part_id(path), on_end=on_end, error=error, redelivered_on=RETRIED_DROPS
        )
        if frame is None:  # emit raised: keep the file and try it again later
            with self._guard:
                self._in_flight.discard(path)
                self._unsettled[path] = _Unsettled(time.monotonic() + self.backoff.next())
            return
        self.backoff.reset()

    def _part_id(self, path: Path) -> str:
        """The file's stem (with its sub-folder: `lot-7/part-000`), or `<stem>~<n>` when n - 1 parts were
        already published under its name."""
        key = self._relative(path)
        if key not in self._uses:
            dirs = [self.camera.resolved_rejected_dir]
            if self.camera.after == "move":
                dirs.append(self.camera.resolved_done_dir)
            self._uses[key] = sum(copies_in(self._below(folder, path), path.name) for folder in dirs)
        return repeat_part_id(Path(key).with_name(path.stem).as_posix(), self._uses[key])

    def _relative(self, path: Path) -> str:
        """`path` below the watched folder, '/'-separated: the file name, or `lot-7/part-000.png` (recursive)."""
        return path.name if path.parent == self.folder else path.relative_to(self.folder).as_posix()

    def _below(self, target: Path, path: Path) -> Path:
        """Where in `target` (done_dir, rejected_dir) `path` goes: the same sub-folder as below the watched one."""
        return target / Path(self._relative(path)).parent

    def _carry_out(self, path: Path, action: str) -> None:
        """Clear an inspected file away (DONE) or reject it with `action` as the reason; raises _BlockedError."""
        if not path.exists():  # moved or deleted by someone else meanwhile: nothing left to do
            log.warning("file gone before it could be cleared away", camera=self.camera.id, path=str(path))
        elif action == DONE:
            self._clear_away(path)
        else:
            self._reject(path, action, counted=True)
        self._pending.pop(path, None)
        self._drops.pop(path, None)
        self._decode_failures.pop(path, None)

    def _clear_away(self, path: Path) -> None:
        done = self.camera.resolved_done_dir
        try:
            if self.camera.after == "delete":
                path.unlink(missing_ok=True)
            elif path.exists():
                move_into(path, self._ensure_dir(self._below(done, path)))
        except OSError as exc:
            where = f" to {done}" if self.camera.after == "move" else ""
            raise _BlockedError(f"cannot {self.camera.after} {path.name}{where}: {exc.strerror or exc}") from None
        self._decode_failures.pop(path, None)

    def _reject(self, path: Path, reason: str, counted: bool = False) -> None:
        if not counted:
            self._count_error("file rejected", UnreadableImageError(f"{path.name}: {reason}"))
        try:
            target = move_into(path, self._ensure_dir(self._below(self.camera.resolved_rejected_dir, path)))
            write_whole(target.with_name(f"{target.name}.reason.txt"), reason + "\n")
        except OSError as exc:
            raise _BlockedError(f"cannot move {path.name} to rejected: {exc.strerror or exc}") from None
        self._decode_failures.pop(path, None)

    def _cleanup(self) -> None:
        """The capture thread ends: from now on frames that end carry out their file's fate themselves."""
        with self._guard:
            self._closed = True
            ended, self._ended = list(self._ended), deque()
        for path, unreadable, how in ended:
            self._on_end(path, unreadable, how)
        for path, action in list(self._pending.items()):
            self._carry_out_late(path, action)

    @staticmethod
    def _ensure_dir(folder: Path) -> Path:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _BlockedError(f"cannot create {folder}: {exc.strerror or exc}") from None
        return folder


def _absolute(path: Path) -> Path:
    """`path` made absolute and normalised (symlinks not followed), to compare folders."""
    return Path(os.path.abspath(path))


def _entries(folder: Path) -> list[os.DirEntry[str]]:
    """The entries of `folder`; none when it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


def count_images(folder: Path, skip: frozenset[Path], limit: int = COUNT_LIMIT) -> tuple[int, bool]:
    """Image files (by name) at any depth below `folder`, not below `skip` nor hidden (symlinked folders
    are not followed), and whether that is all of them: counting stops after looking at `limit` entries."""
    images, seen, stack = 0, 0, [folder]
    while stack and seen < limit:
        for entry in _entries(stack.pop()):
            seen += 1
            if is_ignored(entry.name):
                continue
            if entry.is_dir(follow_symlinks=False):
                if _absolute(Path(entry.path)) not in skip:
                    stack.append(Path(entry.path))
            elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
                images += 1
    return images, not stack


def copies_in(folder: Path, name: str) -> int:
    """How many files `move_into` put into `folder` under `name`: `name`, then `<stem>-1<suffix>` ... in a row."""
    stem, suffix = Path(name).stem, Path(name).suffix
    if not (folder / name).exists():
        return 0
    count = 1
    while (folder / f"{stem}-{count}{suffix}").exists():
        count += 1
    return count


def write_whole(path: Path, text: str) -> None:
    """Write `text` to `path` so that a reader sees the whole file or none: a hidden temporary name first."""
    temporary = path.with_name(f".{path.name}.part")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise


def move_into(path: Path, folder: Path) -> Path:
    """Move `path` into `folder` without overwriting (name-1.png, name-2.png ...); returns the new path.

    Across file systems the copy is written under a temporary name first, so a full disk leaves
    the original in place and no half file behind.
    """
    target = folder / path.name
    count = 0
    while target.exists():
        count += 1
        target = folder / f"{path.stem}-{count}{path.suffix}"
    try:
        os.rename(path, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        temporary = folder / f".{target.name}.part"
        try:
            shutil.copy2(path, temporary)
            os.replace(temporary, target)
        except OSError:
            temporary.unlink(missing_ok=True)
            raise
        path.unlink()
    return target
