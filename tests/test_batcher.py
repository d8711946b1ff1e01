"""The FrameBatcher's camera queues: what each policy does when full, paused, or closed."""

from __future__ import annotations

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
