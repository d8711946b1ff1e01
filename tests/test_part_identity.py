"""Part identity and one agent per line, without brokers: run ids, folder names used again, the line lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from agent.config import InspectConfig
from agent.frames import Frame
from agent.identity import RUN_ID, camera_part_id, new_run_id, repeat_part_id
from agent.instance_lock import LineLock, LineLockedError, state_dir_for
from agent.outcomes import BatchFailure
from agent.results import build_inspection
from agent.sources import CameraConfig, open_source
from agent.sources.folder import FolderSource
from tests.source_fixtures import Collector, stop_promptly, wait_until


def test_run_ids_change_at_every_start_and_sort_by_start_time():
    ids = {new_run_id(1_800_000_000.0) for _ in range(200)}
    assert len(ids) == 200  # the same second: the random part tells them apart
    assert all(RUN_ID.fullmatch(run) for run in ids)
    earlier, later = new_run_id(1_800_000_000.0), new_run_id(1_800_000_001.0)
    assert earlier[:6] < later[:6] and sorted([later, earlier]) == [earlier, later]
    assert new_run_id(2_000_000_000.0)[:6] > new_run_id(1_900_000_000.0)[:6]
    assert camera_part_id("cam-1", "abc123wxyz", 7) == "cam-1-abc123wxyz-7"
    assert [repeat_part_id("part-000", n) for n in range(3)] == ["part-000", "part-000~2", "part-000~3"]


def test_every_payload_and_map_key_carries_the_run_id():
    frame = Frame("cam-1", 45, "cam-1-run0000001-45", "widget", np.zeros((4, 4), np.uint8), run_id="run0000001")
    inspection = build_inspection(
        frame, BatchFailure("widget", "boom"), line="l1", window_s=2.0, maps="all", map_size=None, model={}
    )
    for payload in (inspection.result, inspection.reject_payload(), inspection.decision_payload()):
        assert (payload["part_id"], payload["seq"], payload["run_id"]) == ("cam-1-run0000001-45", 45, "run0000001")
    assert inspection.stored_map_key == "genclip:l1:map:cam-1:run0000001:45"


def folder_camera(folder: Path, **keys: object) -> CameraConfig:
    keys = {"settle_ms": 50, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2, **keys}
    return CameraConfig(id="grabber", source=str(folder), product_class="widget", **keys)


def waiting(folder: Path) -> list[Path]:
    """Files still in the watched folder (done/ and rejected/ are sub-folders of it)."""
    return [p for p in folder.iterdir() if p.is_file()]


def drop(folder: Path, name: str, value: int) -> None:
    staging = folder.parent / f"staging-{name}"
    cv2.imwrite(str(staging), np.full((48, 64, 3), value, np.uint8))
    staging.replace(folder / name)


@pytest.mark.parametrize("after", ["move", "delete"])
def test_a_file_name_used_again_is_a_new_part_with_its_own_id(tmp_path, after):
    """A second part-000.png is a second part: part-000~2, also after a restart when done/ remembers it."""
    folder = tmp_path / "in"
    folder.mkdir()
    cam = folder_camera(folder, after=after)
    emit = Collector()
    source = open_source(cam, emit)
    assert isinstance(source, FolderSource)
    source.start()
    try:
        for i in range(3):
            drop(folder, "part-000.png", 10 * i)
            assert wait_until(lambda n=i + 1: len(emit) == n and not waiting(folder), timeout=10)
        drop(folder, "part-001.png", 99)
        assert wait_until(lambda: len(emit) == 4 and not waiting(folder), timeout=10)
    finally:
        stop_promptly(source)
    ids = [f.part_id for f in emit.snapshot()]
    assert ids == ["part-000", "part-000~2", "part-000~3", "part-001"]
    assert len({f.run_id for f in emit.snapshot()}) == 1 and emit.snapshot()[0].run_id == source.run_id

    restarted = open_source(cam, emit)  # a new start: a new run id, the same folders
    assert restarted.run_id != source.run_id
    restarted.start()
    try:
        drop(folder, "part-000.png", 200)
        assert wait_until(lambda: len(emit) == 5 and not waiting(folder), timeout=10)
    finally:
        stop_promptly(restarted)
    # with after = "move" done/ holds three part-000 files: the fourth is part-000~4; deleted files leave no trace
    assert emit.snapshot()[-1].part_id == ("part-000~4" if after == "move" else "part-000")


def hold_lock(state_dir: Path) -> subprocess.Popen[bytes]:
    code = (
        "import sys, time; from pathlib import Path; from agent.instance_lock import LineLock; "
        "LineLock(Path(sys.argv[1])).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(state_dir)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
    return proc


def test_the_line_lock_refuses_a_second_holder_naming_its_pid_and_dies_with_its_holder(tmp_path):
    state = tmp_path / "state" / "line-1"
    holder = hold_lock(state)
    try:
        with pytest.raises(LineLockedError) as refused:
            LineLock(state).acquire()
        assert f"pid {holder.pid}" in str(refused.value) and str(state / "agent.lock") in str(refused.value)
        holder.kill()  # SIGKILL: no clean-up runs, the OS drops the lock
        holder.wait(10)
        lock = LineLock(state)
        lock.acquire()
        assert (state / "agent.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(LineLockedError, match=f"pid {os.getpid()}"):
            LineLock(state).acquire()  # a second open in the same process is refused too
        lock.release()
        LineLock(state).acquire()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_the_state_dir_default_is_per_line(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir_for(None, "line-7") == tmp_path / "xdg" / "genclip" / "line-7"
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/genclip:/var/lib/genclip/line-7")  # StateDirectory= of the unit
    assert state_dir_for(None, "line-7") == Path("/var/lib/genclip/line-7")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/genclip")
    assert state_dir_for(None, "line-7") == Path("/var/lib/genclip/line-7")
    assert state_dir_for(tmp_path / "mine", "line-7") == tmp_path / "mine"


def test_a_state_dir_that_is_a_file_is_refused_naming_the_key(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("x")
    model = {"pretrained": "random"}
    with pytest.raises(ValidationError, match=r"agent\.state_dir[\s\S]*not a directory"):
        InspectConfig(model=model, agent={"state_dir": str(afile)})
    assert InspectConfig(model=model, agent={"state_dir": str(tmp_path / "new")}).agent.state_dir == tmp_path / "new"


def test_line_lock_cannot_be_created_says_where(tmp_path):
    blocked = tmp_path / "ro"
    blocked.write_text("a file where the state directory's parent should be")
    with pytest.raises(LineLockedError, match="cannot create the line's lock"):
        LineLock(blocked / "line-1").acquire()
