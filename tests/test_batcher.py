"""The FrameBatcher's camera queues: what each policy does when full, paused, or closed."""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from agent.batcher import FrameBatcher
from agent.frames import Frame
from agent.ledger import FrameLedger


def frame(camera: str, seq: int, ended: list[tuple[str, int, str]] | None = None) -> Frame:
    on_end = (lambda how: ended.append((camera, seq, how))) if ended is not None else None
    return Frame(camera, seq, f"{camera}-{seq}", "widget", np.zeros((8, 8, 3), np.uint8), on_end=on_end)


def test_a_paused_block_camera_keeps_its_frames_and_holds_its_source_until_resumed():
    """Files and folders: a pause skips no part and reads none again; the engine takes the other cameras."""
    ledger, ended = FrameLedger(), []
    batcher = FrameBatcher(ledger, batch_size=4, max_wait_ms=0)
    batcher.add_camera("folder", capacity=2, policy="block", max_age_ms=0)
    batcher.add_camera("live", capacity=2, policy="drop_oldest", max_age_ms=0)
    batcher.put("folder", frame("folder", 1, ended))
    batcher.set_paused(None, True)
    held = threading.Thread(target=batcher.put, args=("folder", frame("folder", 2, ended)))
    held.start()
    batcher.put("live", frame("live", 1, ended))  # a paused live camera drops, counted
    time.sleep(0.3)
    assert held.is_alive() and batcher.depth("folder") == 1  # the source waits; its queued frame stays
    assert batcher.next_batch(timeout=0.2) == []  # nothing of a paused camera is taken
    assert ended == [("live", 1, "paused")]
    batcher.set_paused("folder", False)
    held.join(5)
    assert not held.is_alive()
    assert [f.seq for f in batcher.next_batch(timeout=1)] == [1, 2]
    assert ledger.snapshot().dropped == {"paused": 1}


def test_closing_lets_a_held_source_go_and_the_worker_sees_nothing_to_take():
    ledger, ended = FrameLedger(), []
    batcher = FrameBatcher(ledger, batch_size=4, max_wait_ms=0)
    batcher.add_camera("folder", capacity=1, policy="block", max_age_ms=0)
    batcher.put("folder", frame("folder", 1, ended))
    batcher.set_paused("folder", True)
    held = threading.Thread(target=batcher.put, args=("folder", frame("folder", 2, ended)))
    held.start()
    time.sleep(0.2)
    assert batcher.takeable() == 0 and batcher.depth() == 1
    batcher.close()
    held.join(5)
    assert not held.is_alive() and ended == [("folder", 2, "shutdown")]  # its file stays for the next start
    assert batcher.drain("shutdown") == 1 and ended[-1] == ("folder", 1, "shutdown")
    snap = ledger.snapshot()
    assert snap.accepted == 2 and snap.dropped == {"shutdown": 2} and snap.in_flight == 0


def test_a_folder_part_handed_over_while_paused_is_taken_at_resume_with_a_fresh_stamp():
    """A folder part (offered again after a 'paused' drop) handed over while paused is captured at resume;
    one handed over before the pause, and any other block camera's frame, keep their capture time."""
    ledger, ended = FrameLedger(), []
    batcher = FrameBatcher(ledger, batch_size=4, max_wait_ms=0)
    batcher.add_camera("folder", capacity=1, policy="block", max_age_ms=0)
    batcher.add_camera("video", capacity=1, policy="block", max_age_ms=0)
    redelivered = frozenset({"queue_full", "paused", "stale", "shutdown"})
    first = dataclasses.replace(frame("folder", 1, ended), redelivered_on=redelivered)
    waiting = dataclasses.replace(frame("folder", 2, ended), redelivered_on=redelivered)
    late = dataclasses.replace(frame("folder", 3, ended), redelivered_on=redelivered)
    video = frame("video", 1, ended)
    batcher.put("folder", first)
    batcher.put("video", frame("video", 0, ended))
    before = threading.Thread(target=batcher.put, args=("folder", waiting))  # waits for room, not for a resume
    before.start()
    time.sleep(0.1)
    assert batcher.is_paused("folder") is False
    batcher.set_paused(None, True)
    assert batcher.is_paused("folder") and batcher.is_paused("video")
    held = [
        threading.Thread(target=batcher.put, args=("folder", late)),
        threading.Thread(target=batcher.put, args=("video", video)),
    ]
    for thread in held:
        thread.start()
    time.sleep(0.3)
    resumed = time.monotonic()
    batcher.set_paused(None, False)
    taken: list[Frame] = []
    while len(taken) < 5:
        taken += batcher.next_batch(timeout=1)
    for thread in (before, *held):
        thread.join(5)
    by_part = {f.part_id: f for f in taken}
    assert by_part["folder-2"] is waiting and by_part["video-1"] is video  # stamps kept
    fresh = by_part["folder-3"]
    assert fresh is not late and fresh.captured_mono >= resumed and fresh.captured_at > late.captured_at
    assert (fresh.seq, fresh.on_end, fresh.decided, fresh.redelivered_on) == (3, late.on_end, late.decided, redelivered)
    fresh.end("published")
    assert ended == [("folder", 3, "published")] and ledger.snapshot().accepted == 5
