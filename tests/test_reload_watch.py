"""CheckpointWatcher against the real file system (inotify through watchdog)."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.reload import CheckpointWatcher
from model.checkpoint_files import newest_checkpoint

DEBOUNCE = 0.1
QUIET = 0.5  # long enough for a stray second call to show up


def publish(path: Path, data: bytes = b"x", mtime: float | None = None) -> None:
    """What model.checkpoint.write_atomic does (hidden temp file in the folder, then os.replace),
    without importing torch into this test."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    os.replace(tmp, path)


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


class Calls:
    def __init__(self, fail_first: int = 0, hold_s: float = 0.0) -> None:
        self.paths: list[Path] = []
        self.fail_first = fail_first
        self.hold_s = hold_s
        self.running = 0
        self.most_running = 0
        self._lock = threading.Lock()

    def __call__(self, path: Path) -> None:
        with self._lock:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        try:
            time.sleep(self.hold_s)
            self.paths.append(path)
            if len(self.paths) <= self.fail_first:
                raise RuntimeError("refused")
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def watch() -> Iterator[Callable[..., CheckpointWatcher]]:
    watchers: list[CheckpointWatcher] = []

    def start(target: Path, calls: Calls) -> CheckpointWatcher:
        watcher = CheckpointWatcher(target, calls, debounce_s=DEBOUNCE)
        watcher.start()
        watchers.append(watcher)
        return watcher

    yield start
    for watcher in watchers:
        watcher.stop()


def test_single_file_replaced_atomically_fires_once(tmp_path, watch):
    target = tmp_path / "line-1.safetensors"
    publish(target, b"v1")
    calls = Calls()
    watch(target, calls)
    publish(tmp_path / "other.safetensors")  # not the watched file
    time.sleep(QUIET)
    assert calls.paths == []  # the file as it was at start-up is the caller's to load
    publish(target, b"v2")
    wait_for(lambda: calls.paths)
    time.sleep(QUIET)
    assert calls.paths == [target]


def test_single_file_not_there_yet(tmp_path, watch):
    target = tmp_path / "line-1.safetensors"
    calls = Calls()
    watch(target, calls)
    publish(target)
    wait_for(lambda: calls.paths)
    assert calls.paths == [target]


def test_directory_mode_picks_the_newest(tmp_path, watch):
    now = time.time()
    publish(tmp_path / "a.safetensors", mtime=now - 100)
    calls = Calls()
    watch(tmp_path, calls)
    publish(tmp_path / "b.safetensors", mtime=now - 10)
    wait_for(lambda: calls.paths)
    assert calls.paths == [tmp_path / "b.safetensors"]
    # An older checkpoint arriving late changes nothing: b is still the newest and is not reported again.
    publish(tmp_path / "c.safetensors", mtime=now - 50)
    time.sleep(QUIET)
    assert calls.paths == [tmp_path / "b.safetensors"]
    publish(tmp_path / "a.safetensors", mtime=now)  # replaced: now the newest
    wait_for(lambda: len(calls.paths) == 2)
    assert calls.paths[-1] == tmp_path / "a.safetensors"


def test_temp_and_foreign_files_are_ignored(tmp_path, watch):
    calls = Calls()
    watch(tmp_path, calls)
    for name in (".line-1.safetensors.x1y2.tmp", "line-1.safetensors.part", "line-1.tmp", ".hidden.safetensors"):
        (tmp_path / name).write_bytes(b"half")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "sub.safetensors").mkdir()
    time.sleep(QUIET)
    assert calls.paths == []


def test_burst_is_debounced_into_one_call(tmp_path, watch):
    calls = Calls()
    watch(tmp_path, calls)
    now = time.time()
    for i in range(5):
        publish(tmp_path / f"run-{i}.safetensors", mtime=now + i)
    wait_for(lambda: calls.paths)
    time.sleep(QUIET)
    assert calls.paths == [tmp_path / "run-4.safetensors"]


def test_callback_failure_does_not_stop_the_watcher(tmp_path, watch):
    calls = Calls(fail_first=1)
    watch(tmp_path, calls)
    publish(tmp_path / "bad.safetensors", mtime=time.time() - 5)
    wait_for(lambda: calls.paths)
    publish(tmp_path / "good.safetensors")
    wait_for(lambda: len(calls.paths) == 2)
    assert calls.paths == [tmp_path / "bad.safetensors", tmp_path / "good.safetensors"]


def test_calls_never_overlap(tmp_path, watch):
    calls = Calls(hold_s=0.4)
    watch(tmp_path, calls)
    now = time.time()
    publish(tmp_path / "first.safetensors", mtime=now)
    wait_for(lambda: calls.running)
    publish(tmp_path / "second.safetensors", mtime=now + 1)  # arrives while the first call runs
    wait_for(lambda: len(calls.paths) == 2)
    assert calls.most_running == 1
    assert calls.paths[-1] == tmp_path / "second.safetensors"


def test_missing_folder_is_awaited_not_created(tmp_path, watch):
    folder = tmp_path / "var" / "prompts"
    calls = Calls()
    watch(folder, calls)
    assert not (tmp_path / "var").exists()
    folder.mkdir(parents=True)
    publish(folder / "line-1.safetensors")
    wait_for(lambda: calls.paths)
    assert calls.paths == [folder / "line-1.safetensors"]


def test_folder_appearing_with_a_checkpoint_inside(tmp_path, watch):
    folder = tmp_path / "prompts"
    calls = Calls()
    watch(folder, calls)
    staging = tmp_path / ".staging"
    staging.mkdir()
    publish(staging / "line-1.safetensors")
    staging.rename(folder)
    wait_for(lambda: calls.paths)
    assert calls.paths == [folder / "line-1.safetensors"]


def test_folder_removed_and_made_again(tmp_path, watch):
    folder = tmp_path / "prompts"
    folder.mkdir()
    calls = Calls()
    watch(folder, calls)
    folder.rmdir()
    time.sleep(0.2)
    folder.mkdir()
    publish(folder / "line-1.safetensors")
    wait_for(lambda: calls.paths)
    assert calls.paths == [folder / "line-1.safetensors"]


def test_newest_checkpoint(tmp_path):
    assert newest_checkpoint(tmp_path / "missing") is None
    assert newest_checkpoint(tmp_path) is None
    publish(tmp_path / "a.safetensors", mtime=1000)
    publish(tmp_path / "b.safetensors", mtime=1000)  # same mtime: the later name wins
    publish(tmp_path / "old.safetensors", mtime=10)
    (tmp_path / ".z.safetensors.abc.tmp").write_bytes(b"")
    (tmp_path / ".z.safetensors").write_bytes(b"")
    assert newest_checkpoint(tmp_path) == tmp_path / "b.safetensors"
