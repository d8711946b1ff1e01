"""The engine as a 24/7 service needs it: snapshots, profiles, thresholds that hold, per-frame errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model import Engine
from model.backbone import load_backbone
from model.genclip import ScoringSettings
from model.profile import ClassProfile, profile_path
from tests.factories import frames, perturbed_checkpoint, tiny_config


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("genclip-tiny", "random")


def good_parts(count: int = 8, seed: int = 7) -> list[np.ndarray]:
    """Similar-looking frames (one texture with noise), standing in for good parts."""
    rng = np.random.default_rng(seed)
    base = rng.integers(60, 200, (96, 128, 3), dtype=np.uint8)
    return [np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8) for _ in range(count)]


def test_swap_mid_batch_keeps_the_batch_on_its_own_calibrated_threshold(tmp_path, backbone):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    perturbed_checkpoint(first, backbone, tiny_config(), seed=1, scale=0.2)
    perturbed_checkpoint(second, backbone, tiny_config(), seed=2, scale=0.2)
    engine = Engine(tiny_config(checkpoint=first), backbone=backbone)
    engine.classes.register("bottle", lambda: good_parts())  # a loader: recalibrated on every new prompt version
    old_threshold = engine.classes.threshold("bottle")
    assert old_threshold[1] == "calibration"
    original_score = engine._score
    swapped: list[str] = []

    def score_with_swap_midway(prompts, texts, batch):
        if not swapped:
            swapped.append("swapping")
            swapped[0] = engine.load_prompts(second)  # recalibration scores through here too
        return original_score(prompts, texts, batch)

    engine._score = score_with_swap_midway
    in_flight = engine.predict(frames(3), ["bottle"] * 3)
    after = engine.predict(frames(3), ["bottle"] * 3)
    new_threshold = engine.classes.threshold("bottle")
    assert new_threshold[1] == "calibration" and new_threshold[0] != old_threshold[0]
    assert {p.threshold for p in in_flight} == {old_threshold[0]}
    assert {p.threshold for p in after} == {new_threshold[0]}
    assert engine.classes.profile("bottle").calibration.prompt_version == swapped[0]
    for p in in_flight + after:
        assert p.is_anomalous == (p.score >= p.threshold)


def test_class_word_decided_at_registration_survives_a_restart(tmp_path, backbone):
    engine = Engine(tiny_config(), backbone=backbone)
    profile = engine.classes.register("qx7-widget", good_parts())
    assert profile.class_word_source == "cnf" and profile.cnf["reference_images"] == 8
    path = profile.save(profile_path(tmp_path, "qx7-widget"))
    batch = frames(4, seed=3)
    before = engine.predict(batch, ["qx7-widget"] * 4)

    restarted = Engine(tiny_config(), backbone=backbone)
    loaded = ClassProfile.load(path)
    again = restarted.classes.register("qx7-widget", profile=loaded)
    assert (again.class_word, again.cnf, again.reference_digest) == (
        profile.class_word,
        profile.cnf,
        profile.reference_digest,
    )
    assert again.calibration == profile.calibration
    assert restarted.classes.threshold("qx7-widget") == engine.classes.threshold("qx7-widget")
    after = restarted.predict(batch, ["qx7-widget"] * 4)
    for a, b in zip(before, after, strict=True):
        assert a.score == b.score and a.is_anomalous == b.is_anomalous
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)


def test_a_calibration_from_other_prompts_or_settings_is_reported_stale(tmp_path, backbone):
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    perturbed_checkpoint(first, backbone, tiny_config(), seed=1)
    perturbed_checkpoint(second, backbone, tiny_config(), seed=2)
    calibrated = Engine(tiny_config(checkpoint=first), backbone=backbone).classes.register("bottle", good_parts())

    other_prompts = Engine(tiny_config(checkpoint=second), backbone=backbone)
    other_prompts.classes.register("bottle", profile=calibrated)
    prediction = other_prompts.predict(frames(1), ["bottle"])[0]
    assert prediction.threshold_source == "stale-calibration"
    assert prediction.threshold == other_prompts.config.default_threshold
    info = other_prompts.classes.status("bottle")
    assert info.threshold_source == "stale-calibration" and "prompts" in info.stale_reason

    other_alpha = Engine(tiny_config(checkpoint=first, score_alpha=0.3), backbone=backbone)
    other_alpha.classes.register("bottle", profile=calibrated)
    assert other_alpha.classes.status("bottle").stale_reason.endswith("score_alpha")

    same = Engine(tiny_config(checkpoint=first), backbone=backbone)
    same.classes.register("bottle", profile=calibrated)
    assert same.classes.threshold("bottle") == (calibrated.calibration.threshold, "calibration")


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_ng_has_a_region_and_ok_has_none(backbone, alpha):
    engine = Engine(tiny_config(score_alpha=alpha, min_defect_area=40), backbone=backbone)
    engine.classes.register("part")
    batch = frames(16, seed=11, size=(90, 140))
    scores = [p.score for p in engine.predict(batch, ["part"] * 16)]
    verdicts = set()
    for threshold in np.quantile(scores, [0.1, 0.3, 0.5, 0.7, 0.9]):
        engine.classes.set_thresholds({"part": float(threshold)})
        for p in engine.predict(batch, ["part"] * 16):
            verdicts.add(p.is_anomalous)
            assert p.is_anomalous == (len(p.defects) > 0), (p.score, p.threshold, p.map_threshold)
    assert verdicts == {True, False}


def test_out_of_memory_is_split_and_recovered(backbone):
    engine = Engine(tiny_config(), backbone=backbone, max_batch=8)
    engine.classes.register("part")
    batch = frames(8, seed=2)
    reference = engine.predict(batch, ["part"] * 8)

    def no_room_above_two(size: int) -> None:
        if size > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    engine.fault_hook = no_room_above_two
    recovered = engine.predict(batch, ["part"] * 8)
    assert engine.stats.oom_splits == 3  # 8 -> 4 + 4 -> 2 + 2 + 2 + 2
    for a, b in zip(reference, recovered, strict=True):
        assert b.ok and b.score == pytest.approx(a.score, abs=1e-5)

    def never_room(size: int) -> None:
        raise torch.OutOfMemoryError("simulated")

    engine.fault_hook = never_room
    failed = engine.predict(batch[:2], ["part"] * 2)
    assert [r.reason for r in failed] == ["out of device memory"] * 2


def test_no_recompilation_across_batch_sizes_after_warmup(backbone):
    from torch._dynamo.utils import counters

    engine = Engine(tiny_config(compile=True), backbone=backbone, max_batch=8)
    engine.classes.register("part")
    engine.warmup()
    graphs = counters["stats"]["unique_graphs"]
    for size in range(1, 9):
        results = engine.predict(frames(size, seed=size), ["part"] * size)
        assert all(r.ok for r in results)
    assert counters["stats"]["unique_graphs"] == graphs
    assert engine.batch_sizes == [1, 2, 4, 8]


def test_bf16_autocast_leaves_the_head_in_fp32(backbone):
    engine = Engine(tiny_config(), backbone=backbone)
    engine.classes.register("part")
    model = engine.snapshot.prompts.model
    settings = ScoringSettings.from_config(engine.config)
    text = engine.snapshot.classes["part"].text
    with torch.inference_mode():
        feats = model.image_features(model.vision(engine.preprocess(frames(3))))
        suffixes, lengths = model.pad_suffixes([text.suffix] * 3)
        enhanced = model.state_text_padded(suffixes, lengths, feats.vision_prompts)
        query = engine.snapshot.prompts.query_text
        fp32 = model.head(feats, query, enhanced, settings)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.head(feats, query, enhanced, settings)
    assert mixed.maps.dtype == torch.float32
    assert torch.allclose(mixed.maps, fp32.maps, atol=1e-5, rtol=0)
    assert torch.allclose(mixed.scores, fp32.scores, atol=1e-5, rtol=0)


def test_prediction_owns_its_map(backbone):
    engine = Engine(tiny_config(), backbone=backbone)
    engine.classes.register("part")
    results = engine.predict(frames(4), ["part"] * 4)
    for p in results:
        assert p.anomaly_map.base is None and p.anomaly_map.flags.owndata
        assert p.anomaly_map.shape == (224, 224) and p.frame_map().shape == (120, 160)


def test_export_works_on_a_copy_and_leaves_the_engine_as_it_was(tmp_path, backbone):
    from model.export import ExportedScorer

    engine = Engine(tiny_config(), backbone=backbone)
    engine.classes.register("part")
    before = engine.predict(frames(2), ["part"] * 2)
    scorer = ExportedScorer(engine, ["part"])
    scorer.double()  # whatever happens to the exported copy...
    running = engine.snapshot.prompts.model
    assert all(p.dtype == torch.float32 and p.device == engine.device for p in running.parameters())
    after = engine.predict(frames(2), ["part"] * 2)  # ...the engine still serves, unchanged
    assert [p.score for p in after] == [p.score for p in before]


@pytest.mark.gpu
def test_export_leaves_a_cuda_engine_on_the_gpu(tmp_path):
    from model.export import export_onnx

    engine = Engine(tiny_config(device="cuda", precision="bf16"))
    engine.classes.register("part")
    export_onnx(engine, ["part"], tmp_path / "g.onnx")
    assert all(p.device.type == "cuda" for p in engine.snapshot.prompts.model.parameters())
    assert engine.predict(frames(2), ["part"] * 2)[0].ok


@pytest.mark.gpu
def test_cuda_bf16_maps_stay_close_to_fp32():
    fp32 = Engine(tiny_config(device="cuda"))
    bf16 = Engine(tiny_config(device="cuda", precision="bf16", compile=True), max_batch=4)
    for e in (fp32, bf16):
        e.classes.register("part")
    bf16.warmup()
    batch = frames(4, seed=3)
    for a, b in zip(fp32.predict(batch, ["part"] * 4), bf16.predict(batch, ["part"] * 4), strict=True):
        assert abs(a.score - b.score) < 0.02


@pytest.mark.gpu
def test_cuda_engine_equals_the_cpu_engine_through_one_pinned_copy():
    """Mixed classes in one batch (two defect groups, padded to 8): every output of the CUDA engine comes
    back in one pinned copy and lands on the right frame."""
    cpu, gpu = Engine(tiny_config()), Engine(tiny_config(device="cuda"))
    for engine in (cpu, gpu):
        engine.classes.register("part")
        engine.classes.register("bolt")
    batch, classes = frames(5, seed=6), ["part", "bolt", "part", "bolt", "part"]
    for a, b in zip(cpu.predict(batch, classes), gpu.predict(batch, classes), strict=True):
        assert a.product_class == b.product_class and abs(a.score - b.score) < 1e-3
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-2
        assert [d.type for d in a.defects][:1] == [d.type for d in b.defects][:1]
