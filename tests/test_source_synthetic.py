"""The synthetic source: rate, defect share, ground truth that matches the frames, determinism."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from pydantic import ValidationError

from agent.sources import CameraConfig, open_source
from agent.sources.synthetic import SyntheticSource
from tests.source_fixtures import Collector, stop_promptly, wait_until


def camera(fps: float = 1000, **synthetic) -> CameraConfig:
    return CameraConfig(id="synth", source="synthetic:test", product_class="widget", fps=fps, synthetic=synthetic)


def start(cam: CameraConfig, emit: Collector) -> SyntheticSource:
    source = open_source(cam, emit)
    assert isinstance(source, SyntheticSource)
    source.start()
    return source


def test_rate_follows_fps():
    emit = Collector()
    source = start(camera(fps=50), emit)
    try:
        assert wait_until(lambda: len(emit) >= 1)
        began, count = time.monotonic(), len(emit)
        time.sleep(1.0)
        rate = (len(emit) - count) / (time.monotonic() - began)
        assert 42 <= rate <= 55, rate
    finally:
        stop_promptly(source)


def test_defect_share_and_ground_truth_match_the_frames(tmp_path):
    truth = tmp_path / "truth" / "synth.jsonl"
    emit = Collector()
    source = start(camera(defect_rate=0.3, seed=5, ground_truth=str(truth)), emit)
    try:
        assert wait_until(lambda: len(emit) >= 400, timeout=8)
    finally:
        stop_promptly(source)
    frames = emit.snapshot()
    lines = [json.loads(line) for line in truth.read_text().splitlines()]
    assert len(lines) == len(frames)
    for frame, line in zip(frames, lines, strict=True):
        assert (line["camera"], line["seq"], line["part_id"]) == (frame.camera, frame.seq, frame.part_id)
        assert line["captured_at"] == frame.captured_at.isoformat()
        assert line["defective"] == (line["type"] is not None)
    share = sum(line["defective"] for line in lines) / len(lines)
    assert 0.22 <= share <= 0.38, share
    assert {line["type"] for line in lines if line["defective"]} >= {"scratch", "hole", "stain"}
    assert all(f.image.shape == (240, 320, 3) and f.image.dtype == np.uint8 for f in frames[:10])
    run = source.run_id  # part ids the camera numbers itself: <camera>-<run id>-<seq>
    assert [f.part_id for f in frames[:2]] == [f"synth-{run}-1", f"synth-{run}-2"]


def test_same_seed_same_parts_and_other_sizes():
    one = SyntheticSource(camera(seed=3, width=200, height=120, texture="woven"), Collector())
    two = SyntheticSource(camera(seed=3, width=200, height=120, texture="woven"), Collector())
    other = SyntheticSource(camera(seed=4, width=200, height=120, texture="woven"), Collector())
    for source in (one, two, other):
        source._render_backgrounds()
    for seq in range(1, 21):
        image, kind = one.part(seq)
        again, kind_again = two.part(seq)
        assert image.shape == (120, 200, 3) and np.array_equal(image, again) and kind == kind_again
    assert not all(np.array_equal(one.part(s)[0], other.part(s)[0]) for s in range(1, 6))


def test_frames_stream_at_30_fps_with_room_to_spare():
    """The whole per-frame work (crop, flip, defect) on this thread: at least 30 fps, i.e. < 33 ms."""
    source = SyntheticSource(camera(defect_rate=1.0, texture="leather"), Collector())
    source._render_backgrounds()
    began = time.perf_counter()
    for seq in range(1, 101):
        source.part(seq)
    per_frame = (time.perf_counter() - began) / 100
    assert per_frame < 1 / 30, per_frame


def test_an_emit_that_raises_does_not_stop_the_source(tmp_path):
    truth = tmp_path / "truth.jsonl"
    emit = Collector(fail=lambda frame: frame.seq % 3 == 0)
    source = start(camera(ground_truth=str(truth)), emit)
    try:
        assert wait_until(lambda: len(emit) >= 30)
        assert source.alive and source.status().errors >= 10 and source.status().state == "running"
    finally:
        stop_promptly(source)
    seqs = [json.loads(line)["seq"] for line in truth.read_text().splitlines()]
    assert seqs == [f.seq for f in emit.snapshot()] and all(s % 3 for s in seqs)


def test_kinds_limit_the_injected_defects():
    source = SyntheticSource(camera(seed=2, defect_rate=1.0, kinds=["hole", "Missing_Part"]), Collector())
    source._render_backgrounds()
    kinds = {source.part(seq)[1] for seq in range(1, 41)}
    assert kinds == {"hole", "missing part"}


def test_an_unknown_kind_is_a_config_error_naming_it():
    with pytest.raises(ValidationError, match="unknown defect kind 'smudge'"):
        camera(kinds=["smudge"])
