"""A batch's results are built while the engine scores the next one, and nothing is lost on the way."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from agent.batcher import FrameBatcher
from agent.frames import Frame
from agent.ledger import FrameLedger
from agent.worker import InferenceWorker, LaunchedBatch
from model import Engine
from model.backbone import load_backbone
from model.outcomes import FrameError, Prediction
from tests.factories import frames, tiny_config


@pytest.fixture(scope="module")
def engine():
    engine = Engine(tiny_config(), backbone=load_backbone("genclip-tiny", "random"))
    engine.classes.register("bottle")
    engine.classes.register("tile")
    return engine


def same(a: Prediction | FrameError, b: Prediction | FrameError) -> None:
    assert type(a) is type(b)
    if isinstance(a, FrameError):
        assert (a.index, a.reason) == (b.index, b.reason)
        return
    assert (a.score, a.threshold, a.is_anomalous, a.defects) == (b.score, b.threshold, b.is_anomalous, b.defects)
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_launch_then_outcomes_on_another_thread_equals_predict(engine):
    batch = frames(5, seed=4)
    batch[2] = np.zeros((3, 3), np.uint8)  # a bad frame keeps its place
    classes = ["bottle", "tile", "bottle", "nope", "tile"]
    expected = engine.predict(batch, classes)
    first = engine.launch(batch, classes)
    second = engine.launch(frames(3, seed=5), ["tile"] * 3)  # launched before the first one's results exist
    built: list = []
    thread = threading.Thread(target=lambda: built.append(first.outcomes()))
    thread.start()
    thread.join(60)
    assert len(built) == 1
    for a, b in zip(built[0], expected, strict=True):
        same(a, b)
    assert "too small" in built[0][2].reason and "unknown product class 'nope'" in built[0][3].reason
    assert first.outcomes() == built[0]  # built once; asking again gives the same objects
    assert all(isinstance(p, Prediction) for p in second.outcomes())
    assert first.seconds is not None and first.seconds > 0


def test_results_keep_the_snapshot_they_were_launched_with(engine):
    pending = engine.launch(frames(2, seed=6), ["bottle"] * 2)
    before = engine.classes.threshold("bottle")
    engine.classes.set_thresholds({"bottle": 0.123})
    try:
        built = pending.outcomes()
        assert {p.threshold for p in built} == {before[0]}
        assert {p.threshold for p in engine.predict(frames(1), ["bottle"])} == {0.123}
    finally:
        engine.classes.set_thresholds({})


def make_frames(count: int, seed: int = 0) -> list[Frame]:
    return [Frame("cam-1", i + 1, f"part-{i + 1}", "bottle", image) for i, image in enumerate(frames(count, seed))]


def run_worker(engine: Engine, batch_frames: list[Frame], *, pipeline: str, batch_size: int = 4) -> list[LaunchedBatch]:
    ledger = FrameLedger()
    batcher = FrameBatcher(ledger, batch_size, max_wait_ms=5)
    batcher.add_camera("cam-1", capacity=len(batch_frames), policy="block", max_age_ms=0)
    for frame in batch_frames:
        batcher.put("cam-1", frame)
    delivered: list[LaunchedBatch] = []
    worker = InferenceWorker(lambda: engine, lambda e: None, batcher, delivered.append, pipeline=pipeline)
    assert worker.pipeline == (pipeline == "on")
    worker.start()
    assert worker.ready.wait(60) and worker.error is None
    batcher.close()
    worker.stop(time.monotonic() + 60, grace_s=30)
    return delivered


@pytest.mark.parametrize("pipeline", ["on", "off"])
def test_worker_hands_on_every_frame_in_order_with_its_result(engine, pipeline):
    sent = make_frames(10, seed=8)
    delivered = run_worker(engine, sent, pipeline=pipeline)
    got = [pair for scored in delivered for pair in zip(scored.frames, scored.outcomes(), strict=True)]
    assert [f.seq for f, _ in got] == list(range(1, 11))
    expected = [p for b in delivered for p in engine.predict([f.image for f in b.frames], ["bottle"] * len(b.frames))]
    for (_, outcome), reference in zip(got, expected, strict=True):
        same(outcome, reference)
    assert all(scored.seconds is not None and scored.seconds > 0 for scored in delivered)


def test_next_batch_is_launched_before_the_last_ones_regions_are_built(engine, monkeypatch):
    """The overlap itself: building batch 1's results waits until batch 2 has been launched."""
    second_launched = threading.Event()
    overlapped: list[bool] = []
    launches = 0
    launch, assemble = engine.launch, engine.assemble

    def counting_launch(images, classes):
        nonlocal launches
        launches += 1
        if launches == 2:
            second_launched.set()
        return launch(images, classes)

    def assemble_after_next_launch(*args):
        if not overlapped:
            overlapped.append(second_launched.wait(20))
        return assemble(*args)

    monkeypatch.setattr(engine, "launch", counting_launch)
    monkeypatch.setattr(engine, "assemble", assemble_after_next_launch)
    delivered = [None]

    def build_on_result_thread(scored: LaunchedBatch) -> None:
        if delivered[0] is None:
            delivered[0] = threading.Thread(target=scored.outcomes)
            delivered[0].start()

    ledger = FrameLedger()
    batcher = FrameBatcher(ledger, 4, max_wait_ms=5)
    batcher.add_camera("cam-1", capacity=8, policy="block", max_age_ms=0)
    for frame in make_frames(8, seed=9):
        batcher.put("cam-1", frame)
    worker = InferenceWorker(lambda: engine, lambda e: None, batcher, build_on_result_thread, pipeline="on")
    worker.start()
    assert worker.ready.wait(60) and worker.error is None
    batcher.close()
    worker.stop(time.monotonic() + 60, grace_s=30)
    delivered[0].join(30)
    assert overlapped == [True]


def test_a_batch_whose_results_cannot_be_built_fails_alone(engine, monkeypatch):
    assemble = engine.assemble
    calls = 0

    def first_batch_breaks(*args):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("device lost")
        return assemble(*args)

    monkeypatch.setattr(engine, "assemble", first_batch_breaks)
    delivered = run_worker(engine, make_frames(8, seed=10), pipeline="on")
    first, second = delivered[0].outcomes(), delivered[1].outcomes()
    assert [o.ok for o in first] == [False] * 4
    assert {o.reason for o in first} == {"engine failure: device lost"}
    assert all(isinstance(o, Prediction) for o in second)


def test_a_batch_that_cannot_launch_fails_alone(engine, monkeypatch):
    launch = engine.launch
    calls = 0

    def first_launch_breaks(images, classes):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return launch(images, classes)

    monkeypatch.setattr(engine, "launch", first_launch_breaks)
    delivered = run_worker(engine, make_frames(8, seed=11), pipeline="on")
    assert [o.ok for o in delivered[0].outcomes()] == [False] * 4
    assert delivered[0].seconds is None
    assert "illegal memory access" in delivered[0].outcomes()[0].reason
    assert all(isinstance(o, Prediction) for o in delivered[1].outcomes())


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_cuda_batches_launched_back_to_back_keep_their_own_outputs(compiled):
    """Two batches queued on the GPU before either is read back (with CUDA graphs, whose outputs the next
    replay overwrites): each batch's results are its own, as if it had run alone."""
    engine = Engine(tiny_config(device="cuda", precision="bf16", compile=compiled), max_batch=4)
    engine.classes.register("part")
    engine.warmup()
    first_frames, second_frames = frames(4, seed=12), frames(4, seed=13)
    alone = [engine.predict(first_frames, ["part"] * 4), engine.predict(second_frames, ["part"] * 4)]
    first = engine.launch(first_frames, ["part"] * 4)
    second = engine.launch(second_frames, ["part"] * 4)
    for pending, expected in zip((second, first), reversed(alone), strict=True):  # read back out of order
        for a, b in zip(pending.outcomes(), expected, strict=True):  # GPU kernels may differ in the last bits
            assert abs(a.score - b.score) < 1e-5 and np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-4


def test_pipeline_auto_is_off_on_the_cpu_and_the_setting_is_checked(engine):
    from pydantic import ValidationError

    from agent.config import BatchConfig

    batcher = FrameBatcher(FrameLedger(), 4, max_wait_ms=5)
    worker = InferenceWorker(lambda: engine, lambda e: None, batcher, lambda scored: None, pipeline="auto")
    worker.start()
    assert worker.ready.wait(60) and worker.error is None
    assert worker.pipeline is False  # a CPU engine: its cores are the result thread's too
    batcher.close()
    worker.stop(time.monotonic() + 10, grace_s=30)
    assert BatchConfig().pipeline == "auto"
    with pytest.raises(ValidationError, match="'auto', 'on' or 'off'"):
        BatchConfig(pipeline="yes")


def test_a_non_finite_score_is_an_error_not_an_ok_part(engine, monkeypatch):
    """NaN compares false with every threshold: left alone it would pass a part as OK to the PLC."""
    from dataclasses import replace

    import model.batch as batch_module

    result = batch_module.HostTransfer.result

    def poisoned(self):
        host = result(self)
        scores = host.scores.copy()
        scores[1] = np.nan
        return replace(host, scores=scores)

    monkeypatch.setattr(batch_module.HostTransfer, "result", poisoned)
    built = engine.predict(frames(3, seed=8), ["bottle"] * 3)
    assert isinstance(built[0], Prediction) and isinstance(built[2], Prediction)
    assert isinstance(built[1], FrameError) and built[1].index == 1
    assert "non-finite score (nan" in built[1].reason
