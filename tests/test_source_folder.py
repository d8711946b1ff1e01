"""The folder source: oldest first, never half a file, rejects with reasons, never loses a file."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import structlog

import agent.sources.folder as folder_module
from agent.sources import CameraConfig, open_source
from agent.sources.folder import FolderSource
from tests.source_fixtures import Collector, stop_promptly, wait_until


def camera(folder: Path, **keys) -> CameraConfig:
    keys = {"settle_ms": 50, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2, **keys}
    return CameraConfig(id="grabber", source=str(folder), product_class="widget", **keys)


def image(value: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    rng = np.random.default_rng(value)
    return rng.integers(0, 256, (*size, 3), dtype=np.uint8)


def png(value: int, size: tuple[int, int] = (48, 64)) -> bytes:
    return cv2.imencode(".png", image(value, size))[1].tobytes()


def start(cam: CameraConfig, emit: Collector) -> FolderSource:
    source = open_source(cam, emit)
    assert isinstance(source, FolderSource)
    source.start()
    return source


def files(folder: Path) -> list[str]:
    """The files in `folder`, but for the source's own files in the making (`.<name>.part`, see write_whole)."""
    if not folder.is_dir():
        return []
    making = lambda name: name.startswith(".") and name.endswith(".part")  # noqa: E731
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not making(p.name))


def test_existing_files_are_taken_oldest_first_and_moved_to_done(tmp_path):
    for name, age in (("b", 30), ("a", 10), ("c", 20), ("d", 20)):  # c and d: same mtime, name decides
        path = tmp_path / f"{name}.png"
        path.write_bytes(png(ord(name)))
        os.utime(path, (time.time() - age, time.time() - age))
    emit = Collector()
    source = start(camera(tmp_path), emit)
    try:
        assert wait_until(lambda: len(files(tmp_path / "done")) == 4)
        frames = emit.snapshot()
        assert [f.part_id for f in frames] == ["b", "c", "d", "a"]
        assert [f.seq for f in frames] == [1, 2, 3, 4]
        assert all(f.camera == "grabber" and f.product_class == "widget" for f in frames)
        assert np.array_equal(frames[0].image, image(ord("b")))
        assert files(tmp_path / "done") == ["a.png", "b.png", "c.png", "d.png"]
        status = source.status()
        assert status.state == "running" and status.healthy and status.frames == 4 and status.errors == 0
    finally:
        stop_promptly(source)


@pytest.mark.parametrize(("settle_ms", "pause_s"), [(300, 0.15), (50, 0.25)])
def test_a_file_written_in_two_halves_is_read_once_complete(tmp_path, settle_ms, pause_s):
    """(300, 0.15): a pause shorter than settle_ms; (50, 0.25): the half settles, fails to decode, is retried."""
    emit = Collector()
    source = start(camera(tmp_path, settle_ms=settle_ms), emit)
    data = png(7, (240, 320))
    try:
        assert wait_until(lambda: source.status().state == "running")
        with open(tmp_path / "part-7.png", "wb") as out:
            out.write(data[: len(data) // 2])
            out.flush()
            time.sleep(pause_s)
            out.write(data[len(data) // 2 :])
        assert wait_until(lambda: files(tmp_path / "done") == ["part-7.png"])
        time.sleep(0.2)  # nothing else comes
        frames = emit.snapshot()
        assert len(frames) == 1 and frames[0].part_id == "part-7"
        assert np.array_equal(frames[0].image, image(7, (240, 320)))
        assert not (tmp_path / "rejected").exists()
    finally:
        stop_promptly(source)


def test_unreadable_files_are_rejected_with_a_reason(tmp_path):
    emit = Collector()
    source = start(camera(tmp_path), emit)
    try:
        (tmp_path / "notes.txt").write_text("not a picture")
        (tmp_path / "cut.png").write_bytes(png(1, (120, 160))[:300])
        (tmp_path / "good.png").write_bytes(png(2))
        rejected = tmp_path / "rejected"
        assert wait_until(lambda: rejected.is_dir() and len(files(rejected)) == 4 and len(emit) == 2)
        assert files(rejected) == ["cut.png", "cut.png.reason.txt", "notes.txt", "notes.txt.reason.txt"]
        assert "cannot decode" in (rejected / "cut.png.reason.txt").read_text()
        assert "not an image file name (.txt)" in (rejected / "notes.txt.reason.txt").read_text()
        # The unreadable picture of a part still reports the part (an ERROR result); notes.txt is no part.
        by_part = {f.part_id: f for f in emit.snapshot()}
        assert sorted(by_part) == ["cut", "good"] and by_part["good"].error is None
        assert by_part["cut"].error.startswith("cut.png: cannot decode")
        assert wait_until(lambda: files(tmp_path) == [])  # good.png moves once emit has returned
        assert source.status().errors == 2 and source.status().state == "running"
    finally:
        stop_promptly(source)


def test_after_delete_and_ignored_names(tmp_path):
    emit = Collector()
    source = start(camera(tmp_path, after="delete"), emit)
    try:
        (tmp_path / "sub").mkdir()
        for name in (".hidden.png", "x.png.tmp", "y.part", "sub/z.png"):
            (tmp_path / name).write_bytes(png(3))
        (tmp_path / "one.png").write_bytes(png(4))
        assert wait_until(lambda: len(emit) == 1)
        assert wait_until(lambda: not (tmp_path / "one.png").exists())
        (tmp_path / "x.png.tmp").rename(tmp_path / "x.png")  # how writers publish a finished file
        assert wait_until(lambda: len(emit) == 2)
        time.sleep(0.2)
        assert [f.part_id for f in emit.snapshot()] == ["one", "x"]
        assert files(tmp_path) == [".hidden.png", "y.part"] and files(tmp_path / "sub") == ["z.png"]
        assert not (tmp_path / "done").exists()
    finally:
        stop_promptly(source)


def test_unwritable_done_dir_fails_and_keeps_the_files_until_it_is_fixed(tmp_path):
    """As root chmod does not stop writes: `done` under a regular file cannot be created by anyone."""
    watched, blocker = tmp_path / "in", tmp_path / "blocker"
    watched.mkdir()
    blocker.write_text("a file where a folder should be")
    (watched / "p1.png").write_bytes(png(1))
    (watched / "p2.png").write_bytes(png(2))
    emit = Collector()
    source = start(camera(watched, done_dir=blocker / "done"), emit)
    try:
        assert wait_until(lambda: source.status().state == "failed")
        time.sleep(0.3)  # several retries
        status = source.status()
        assert "cannot create" in status.detail and "done" in status.detail and not status.healthy
        assert len(emit) == 0 and files(watched) == ["p1.png", "p2.png"]
        blocker.unlink()
        blocker.mkdir()
        assert wait_until(lambda: files(blocker / "done") == ["p1.png", "p2.png"], timeout=3)
        assert len(emit) == 2 and files(watched) == [] and source.status().state == "running"
    finally:
        stop_promptly(source)


def test_a_failed_move_after_emit_neither_loses_nor_repeats_the_file(tmp_path, monkeypatch):
    real_move, calls = folder_module.move_into, []

    def full_disk(path: Path, folder: Path) -> Path:
        calls.append(path.name)
        if len(calls) <= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_move(path, folder)

    monkeypatch.setattr(folder_module, "move_into", full_disk)
    (tmp_path / "p1.png").write_bytes(png(1))
    emit = Collector()
    source = start(camera(tmp_path), emit)
    try:
        assert wait_until(lambda: source.status().state == "failed")
        assert "No space left" in source.status().detail and files(tmp_path) == ["p1.png"]
        assert wait_until(lambda: files(tmp_path / "done") == ["p1.png"] and source.status().state == "running")
        assert [f.part_id for f in emit.snapshot()] == ["p1"]
    finally:
        stop_promptly(source)


def test_an_emit_that_raises_keeps_the_file_and_the_thread(tmp_path):
    emit = Collector(fail=lambda frame: frame.seq == 1)
    (tmp_path / "p1.png").write_bytes(png(1))
    source = start(camera(tmp_path), emit)
    try:
        assert wait_until(lambda: len(emit) == 1)
        assert [f.part_id for f in emit.snapshot()] == ["p1"] and emit.calls == 2
        assert source.status().errors == 1 and source.alive
        (tmp_path / "p2.png").write_bytes(png(2))
        assert wait_until(lambda: files(tmp_path / "done") == ["p1.png", "p2.png"])
        assert len(emit) == 2
    finally:
        stop_promptly(source)


def test_missing_folder_is_retried_until_it_appears(tmp_path):
    watched = tmp_path / "later"
    emit = Collector()
    source = start(camera(watched, kind="folder"), emit)
    try:
        assert wait_until(lambda: source.status().state == "reconnecting")
        assert "folder not found" in source.status().detail
        watched.mkdir()
        (watched / "p.png").write_bytes(png(1))
        assert wait_until(lambda: len(emit) == 1, timeout=3)
    finally:
        stop_promptly(source)


def end_of(emit: Collector, part: str) -> Callable[[str], None]:
    """The end hook of the (latest) frame emitted for `part`."""
    frame = [f for f in emit.snapshot() if f.part_id == part][-1]
    return frame.end


def test_a_file_stays_until_its_result_is_published(tmp_path):
    """Emitting is not inspecting: the file moves to done/ only when its frame ends as published."""
    emit = Collector(end=None)
    (tmp_path / "p1.png").write_bytes(png(1))
    source = start(camera(tmp_path), emit)
    try:
        assert wait_until(lambda: len(emit) == 1)
        time.sleep(0.3)  # settled, emitted, still in flight: not moved, not emitted again
        assert files(tmp_path) == ["p1.png"] and files(tmp_path / "done") == [] and len(emit) == 1
        end_of(emit, "p1")("published")
        assert wait_until(lambda: files(tmp_path / "done") == ["p1.png"])
        assert files(tmp_path) == [] and len(emit) == 1
    finally:
        stop_promptly(source)


@pytest.mark.parametrize("reason", ["paused", "stale", "queue_full"])
def test_a_file_whose_frame_was_dropped_is_tried_again(tmp_path, reason):
    emit = Collector(end=None)
    (tmp_path / "p1.png").write_bytes(png(1))
    source = start(camera(tmp_path), emit)
    try:
        assert wait_until(lambda: len(emit) == 1)
        end_of(emit, "p1")(reason)
        assert wait_until(lambda: len(emit) == 2)  # after the backoff (reconnect_min_s)
        assert files(tmp_path) == ["p1.png"] and [f.part_id for f in emit.snapshot()] == ["p1", "p1"]
        end_of(emit, "p1")("published")
        assert wait_until(lambda: files(tmp_path / "done") == ["p1.png"])
        time.sleep(0.2)
        assert len(emit) == 2
    finally:
        stop_promptly(source)


def test_a_frame_dropped_at_shutdown_leaves_its_file_for_the_next_start(tmp_path):
    emit = Collector(end=None)
    for i in (1, 2):
        (tmp_path / f"p{i}.png").write_bytes(png(i))
        os.utime(tmp_path / f"p{i}.png", (time.time() - 10 + i, time.time() - 10 + i))
    source = start(camera(tmp_path), emit)
    try:
        assert wait_until(lambda: len(emit) == 2)
        end_of(emit, "p1")("shutdown")
        time.sleep(0.3)
        assert len(emit) == 2 and files(tmp_path) == ["p1.png", "p2.png"]  # not tried again in this run
    finally:
        stop_promptly(source)
    end_of(emit, "p2")("published")  # after the capture thread ended (the agent draining its queue)
    assert files(tmp_path / "done") == ["p2.png"] and files(tmp_path) == ["p1.png"]
    again = Collector()
    source = start(camera(tmp_path), again)
    try:
        assert wait_until(lambda: files(tmp_path / "done") == ["p1.png", "p2.png"])
        assert [f.part_id for f in again.snapshot()] == ["p1"]
    finally:
        stop_promptly(source)


def test_a_file_whose_result_could_not_be_built_is_rejected_with_the_reason(tmp_path):
    emit = Collector(end="invalid")
    (tmp_path / "p1.png").write_bytes(png(1))
    source = start(camera(tmp_path), emit)
    try:
        assert wait_until(lambda: files(tmp_path / "rejected") == ["p1.png", "p1.png.reason.txt"])
        assert "could not be built" in (tmp_path / "rejected" / "p1.png.reason.txt").read_text()
        assert files(tmp_path) == [] and len(emit) == 1
    finally:
        stop_promptly(source)


def test_a_file_gone_before_it_is_cleared_away_does_not_block_the_folder(tmp_path):
    """Someone moves a file away while its frame is in the pipeline: nothing to clear away, the source goes on."""
    emit = Collector(end=None)
    (tmp_path / "p1.png").write_bytes(png(1))
    source = start(camera(tmp_path), emit)
    try:
        assert wait_until(lambda: len(emit) == 1)
        (tmp_path / "p1.png").unlink()
        end_of(emit, "p1")("invalid")  # would move it to rejected/: it is not there any more
        (tmp_path / "p2.png").write_bytes(png(2))
        assert wait_until(lambda: len(emit) == 2)
        end_of(emit, "p2")("published")
        assert wait_until(lambda: files(tmp_path / "done") == ["p2.png"])
        assert source.status().state == "running" and files(tmp_path / "rejected") == []
    finally:
        stop_promptly(source)


def test_a_paused_folder_leaves_new_files_unread_and_still_clears_taken_ones_away(tmp_path, monkeypatch):
    """Paused, a folder takes nothing new: a file dropped meanwhile is not read, decoded or stamped until the
    resume (its part is captured then); a file whose frame was out before the pause is still cleared away."""
    reads: list[str] = []
    real = folder_module.read_frame
    monkeypatch.setattr(folder_module, "read_frame", lambda path, *a: reads.append(path.name) or real(path, *a))
    paused = [False]
    emit = Collector(end=None)  # frames stay in flight until the test ends them
    source = open_source(camera(tmp_path), emit, paused=lambda: paused[0])
    assert isinstance(source, FolderSource)
    source.start()
    try:
        (tmp_path / "a.png").write_bytes(png(1))
        assert wait_until(lambda: len(emit) == 1)
        paused[0] = True
        (tmp_path / "b.png").write_bytes(png(2))
        time.sleep(0.5)  # settled long ago: only the pause keeps it
        emit.snapshot()[0].end("published")  # a's result went out while paused: a is cleared away
        assert wait_until(lambda: files(tmp_path / "done") == ["a.png"])
        time.sleep(0.2)
        assert reads == ["a.png"] and len(emit) == 1 and files(tmp_path) == ["b.png"]
        resumed = time.monotonic()
        paused[0] = False
        assert wait_until(lambda: len(emit) == 2)
        b = emit.snapshot()[1]
        assert b.part_id == "b" and b.captured_mono >= resumed and reads == ["a.png", "b.png"]
        b.end("published")
        assert wait_until(lambda: files(tmp_path / "done") == ["a.png", "b.png"])
    finally:
        stop_promptly(source)


def sub_folder_warnings(logs: list[dict]) -> list[tuple[str, int]]:
    return [
        (Path(e["sub_folder"]).name, e["images"]) for e in logs if e["event"] == "images in a sub-folder are not read"
    ]


def test_images_in_sub_folders_are_reported_once_not_silently_ignored(tmp_path, monkeypatch):
    """Recursive off (the default): a sub-folder's images are not read, but warned about once per sub-folder
    (not at every count) and listed in the status detail; done/, rejected/, done_dir and hidden ones are not."""
    monkeypatch.setattr(folder_module, "SUBFOLDERS_CHECK_S", 0.05)
    monkeypatch.setattr(folder_module, "IDLE_CHECK_S", 0.05)
    out = tmp_path / "out"  # a configured done_dir inside the folder
    for name in ("lot-7/a.png", "lot-7/b.png", "lot-7/deeper/c.jpg", "lot-7/notes.txt", "done/d.png",
                 "rejected/e.png", "out/f.png", ".cache/g.png", "empty/readme.md"):  # fmt: skip
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(png(1))
    emit = Collector()
    with structlog.testing.capture_logs() as logs:
        source = start(camera(tmp_path, done_dir=out), emit)
        try:
            assert wait_until(lambda: sub_folder_warnings(logs) == [("lot-7", 3)])
            assert source.status().detail == "sub-folders not read (recursive = false): lot-7/ holds 3 image(s)"
            assert source.status().state == "running" and source.status().healthy
            (tmp_path / "lot-8").mkdir()
            (tmp_path / "lot-8" / "h.png").write_bytes(png(2))
            (tmp_path / "lot-7" / "i.png").write_bytes(png(3))
            assert wait_until(lambda: "lot-8/ holds 1 image(s)" in source.status().detail)
            assert wait_until(lambda: "lot-7/ holds 4 image(s)" in source.status().detail)
            time.sleep(0.3)  # several counts later: still one warning per sub-folder
            assert sub_folder_warnings(logs) == [("lot-7", 3), ("lot-8", 1)]
        finally:
            stop_promptly(source)
    assert len(emit) == 0 and files(tmp_path / "lot-7") == ["a.png", "b.png", "i.png", "notes.txt"]


def test_recursive_folder_takes_sub_folders_keeping_their_path(tmp_path):
    """recursive = true: images in sub-folders are parts, the part id has the relative path, and done/ and
    rejected/ keep it; files in done/ and rejected/ are never taken again."""
    for name in ("top.png", "lot-7/a.png", "lot-7/deeper/b.png", "lot-7/bad.png", "done/old.png", ".x/h.png"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(png(1) if name != "lot-7/bad.png" else b"not a png")
    (tmp_path / "done" / "lot-7").mkdir()
    (tmp_path / "done" / "lot-7" / "a.png").write_bytes(png(1))  # a part of that name was published before
    emit = Collector()
    source = start(camera(tmp_path, recursive=True), emit)
    try:
        assert wait_until(lambda: len(emit) == 4 and (tmp_path / "rejected" / "lot-7" / "bad.png").exists())
        (tmp_path / "lot-9").mkdir()  # a sub-folder that appears while running
        (tmp_path / "lot-9" / "c.png").write_bytes(png(2))
        assert wait_until(lambda: len(emit) == 5)
        assert wait_until(lambda: files(tmp_path / "done" / "lot-9") == ["c.png"])
        time.sleep(0.2)
        assert sorted(f.part_id for f in emit.snapshot()) == [
            "lot-7/a~2",
            "lot-7/bad",
            "lot-7/deeper/b",
            "lot-9/c",
            "top",
        ]
        assert files(tmp_path / "done") == ["old.png", "top.png"]
        assert files(tmp_path / "done" / "lot-7") == ["a-1.png", "a.png"]
        assert files(tmp_path / "done" / "lot-7" / "deeper") == ["b.png"]
        assert files(tmp_path / "rejected" / "lot-7") == ["bad.png", "bad.png.reason.txt"]
        assert files(tmp_path / ".x") == ["h.png"] and source.status().detail == ""
    finally:
        stop_promptly(source)
