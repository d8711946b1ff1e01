"""The per-class patch memory (model/memory.py) and its fusion with zero-shot GenCLIP, through the engine."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import memory as patch_memory
from model.digests import sha256_frames
from model.engine import Engine
from model.memory import (
    MemoryFileError,
    MemoryIdentity,
    add_images,
    build_memory,
    few_shot_map,
    greedy_coreset,
    load_memory,
    memory_path,
    save_memory,
)
from model.profile import profile_path
from synthetic.defects import apply_defect
from synthetic.textures import instance_seed, render_texture
from tests.factories import tiny_config

GRID = 4
IDENTITY = MemoryIdentity("genclip-tiny", "random-init:seed=0", 64, (1, 2), 1, "tokens", 8, GRID)


def features(images: int, seed: int = 0) -> torch.Tensor:
    """Normalised per-image features [N, L=2, HW, C=8]."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(images, 2, GRID * GRID, 8, generator=generator), dim=-1)


def memory_of(feats: torch.Tensor, coreset: int = 0, sources: list[str] | None = None) -> patch_memory.PatchMemory:
    n = feats.shape[0]
    digests = [f"image-{float(feats[i].sum()):.6f}" for i in range(n)]
    return build_memory(feats, IDENTITY, digests, sources or ["reference"] * n, "refs", coreset)


def brute_force(query: torch.Tensor, memory: patch_memory.PatchMemory, exclude: list[int] | None) -> torch.Tensor:
    """1 - max cosine per patch, one pair at a time, averaged over layers."""
    b, layers, hw, _ = query.shape
    out = torch.zeros(b, hw)
    hw_mem = memory.identity.grid**2
    for i in range(b):
        for p in range(hw):
            total = 0.0
            for layer in range(layers):
                best = -2.0
                for row in range(memory.patches):
                    origin = int(memory.origins[row])
                    image, place = divmod(origin, hw_mem)
                    if exclude is not None and exclude[i] == image:
                        near = abs(place // GRID - p // GRID) <= 1 and abs(place % GRID - p % GRID) <= 1
                        if memory.images > 1 or near:
                            continue
                    best = max(best, float(query[i, layer, p] @ memory.features[layer, row]))
                total += 1.0 - best
            out[i, p] = total / layers
    return out


def test_chunked_search_equals_brute_force_with_and_without_leaving_an_image_out(monkeypatch):
    monkeypatch.setattr(patch_memory, "CHUNK_ELEMENTS", 7 * 2 * GRID * GRID)  # several chunks per layer
    memory = memory_of(features(3))
    query = features(2, seed=5)
    assert torch.allclose(few_shot_map(query, memory), brute_force(query, memory, None), atol=1e-6)
    exclude = [1, -1]
    got = few_shot_map(query, memory, torch.tensor(exclude))
    assert torch.allclose(got, brute_force(query, memory, exclude), atol=1e-6)
    own = memory.features[:, memory.origins // GRID**2 == 0].view(2, GRID * GRID, 8)  # image 0 itself
    assert few_shot_map(own.unsqueeze(0), memory).abs().max() < 1e-6  # in the memory: distance 0
    assert few_shot_map(own.unsqueeze(0), memory, torch.tensor([0])).min() > 0.05  # left out: never itself


def test_one_image_leaves_out_only_the_patchs_neighbourhood():
    memory = memory_of(features(1))
    query = memory.features.view(2, GRID * GRID, 8).unsqueeze(0)
    got = few_shot_map(query, memory, torch.tensor([0]))
    assert torch.allclose(got, brute_force(query, memory, [0]), atol=1e-6)
    assert got.min() > 0  # its own patch and its 8 neighbours are out


def test_greedy_coreset_takes_the_farthest_point_each_time():
    points = torch.tensor([[0.0], [1.0], [10.0], [4.0], [9.0]])
    assert greedy_coreset(points, 3).tolist() == [0, 2, 3]  # 0, then 10 (farthest), then 4 (farthest from both)
    memory = memory_of(features(3), coreset=10)
    assert memory.patches == 10 and memory.features.shape == (2, 10, 8) and memory.origins.shape == (10,)


def test_growing_is_bounded_references_stay_and_origins_follow():
    memory = memory_of(features(2))
    grown = memory
    for step in range(3):
        new = features(2, seed=10 + step)
        digests = [f"confirmed-{step}-{i}" for i in range(2)]
        grown = add_images(grown, new, digests, [f"confirmed:p{step}{i}" for i in range(2)], max_images=5)
    assert grown.images == 5 and grown.sources[:2] == ("reference", "reference")
    assert grown.sources[2:] == ("confirmed:p11", "confirmed:p20", "confirmed:p21")  # the oldest went first
    last = features(2, seed=12)  # the rows of the newest images are where their origins say
    for i in range(2):
        rows = grown.origins // GRID**2 == 3 + i
        assert torch.equal(grown.features[:, rows], patch_memory.stored_precision(last[i]))
    again = add_images(grown, last, ["confirmed-2-0", "confirmed-2-1"], ["confirmed:x", "confirmed:y"], 5)
    assert again is grown  # images already in it are not added twice


def test_memory_file_round_trip_and_refused_for_another_model(tmp_path):
    memory = memory_of(features(2)).with_stats(
        patch_memory.MemoryStats(patch_memory.BranchStats(0.5, 0.1), patch_memory.BranchStats(0.3, 0.05), 2, "d")
    )
    path = save_memory(memory_path(tmp_path / "tile.json"), memory)
    assert path.name == "tile.memory.safetensors"
    back = load_memory(path, IDENTITY)
    assert torch.equal(back.features, memory.features) and back.digest == memory.digest
    for field, value in (("backbone", "ViT-B-16"), ("layers", (1, 3)), ("image_size", 96), ("features", "adapted:x")):
        with pytest.raises(MemoryFileError, match=f"built for {field}"):
            load_memory(path, replace(IDENTITY, **{field: value}))
    path.write_bytes(b"not a memory")
    with pytest.raises(MemoryFileError, match="not a readable patch memory"):
        load_memory(path, IDENTITY)


# --- through the engine -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backbone():
    return Engine(tiny_config(image_size=96)).backbone


def surfaces(seed: int, count: int, size: int = 96) -> list[np.ndarray]:
    return [render_texture("tiles", instance_seed(seed, i), size) for i in range(count)]


def defective(goods: list[np.ndarray], seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [apply_defect(g, "stain", rng)[0] for g in goods]


def outputs(engine: Engine, frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    results = engine.predict(frames, ["tile"] * len(frames))
    return np.array([p.score for p in results]), np.stack([p.anomaly_map for p in results])


def test_weight_zero_or_no_references_is_exactly_the_zero_shot_result(backbone):
    references, frames = surfaces(1, 8), surfaces(2, 3) + defective(surfaces(3, 3), 0)
    today = Engine(tiny_config(image_size=96, cnf=False), backbone=backbone)
    today.classes.register("tile", references)
    scores, maps = outputs(today, frames)
    weight_zero = Engine(tiny_config(image_size=96, cnf=False, memory_weight=0.0), backbone=backbone)
    weight_zero.classes.register("tile", references)
    no_references = Engine(tiny_config(image_size=96, cnf=False, memory_weight=0.5), backbone=backbone)
    no_references.classes.register("tile")
    assert no_references.classes.status("tile").memory_error is not None  # said why, scored zero-shot
    for engine in (weight_zero, no_references):
        other_scores, other_maps = outputs(engine, frames)
        assert np.array_equal(other_scores, scores) and np.array_equal(other_maps, maps)  # bit for bit
    assert weight_zero.classes.threshold("tile") == today.classes.threshold("tile")
    fused = Engine(tiny_config(image_size=96, cnf=False, memory_weight=0.5), backbone=backbone)
    fused.classes.register("tile", references)
    _, fused_maps = outputs(fused, frames)
    assert not np.array_equal(fused_maps, maps)  # the memory does change the result when b > 0
    fused.classes.use_memory("tile", fused.classes.memory("tile"), 0.0)
    assert np.array_equal(outputs(fused, frames)[1], maps)


def test_calibration_on_the_fused_score_leaves_each_reference_out(backbone):
    references = surfaces(1, 8)
    engine = Engine(tiny_config(image_size=96, memory_weight=0.5), backbone=backbone)
    engine.classes.register("tile", references)
    status = engine.classes.status("tile")
    assert status.threshold_source == "calibration" and status.memory is not None and status.memory.images == 8
    in_memory_scores, _ = outputs(engine, references)  # served: the references find themselves in the memory
    calibration = engine.classes.profile("tile").calibration
    assert calibration.score_median > float(np.median(in_memory_scores))  # calibrated as unseen good parts
    assert "b=0.5 harmonic tokens" in calibration.settings.memory


def test_profile_folder_keeps_the_memory_and_refuses_one_for_another_image_size(backbone, tmp_path):
    references = surfaces(1, 8)
    config = tiny_config(image_size=96, memory_weight=0.5, profile_dir=tmp_path)
    first = Engine(config, backbone=backbone)
    first.classes.setup("tile", references)
    stored = memory_path(profile_path(tmp_path, "tile"))
    assert stored.is_file()
    frames = surfaces(2, 2) + defective(surfaces(3, 2), 0)
    again = Engine(config, backbone=backbone)
    again.classes.setup("tile")  # no references now: the profile and memory from the folder
    assert again.classes.memory("tile").digest == first.classes.memory("tile").digest
    assert again.classes.threshold("tile") == first.classes.threshold("tile")
    assert np.array_equal(outputs(again, frames)[1], outputs(first, frames)[1])
    other = Engine(tiny_config(image_size=112, memory_weight=0.5, profile_dir=tmp_path), backbone=backbone)
    other.classes.setup("tile", save=False)
    status = other.classes.status("tile")
    assert status.memory is None and "built for image_size 96" in status.memory_error
    # re-read while running: a memory file that does not fit is refused, the running memory stays
    running = first.classes.memory("tile")
    save_memory(stored, replace(running, identity=replace(running.identity, layers=(1, 2))))
    changes = first.classes.reload_profiles()
    assert [c.product_class for c in changes] == ["tile"] and "built for layers" in changes[0].refused
    assert first.classes.memory("tile") is running


def test_growing_a_class_memory_is_bounded_and_kept_in_the_profile_folder(backbone, tmp_path):
    references = surfaces(1, 8)
    config = tiny_config(image_size=96, memory_weight=0.5, profile_dir=tmp_path, memory_max_images=10)
    engine = Engine(config, backbone=backbone)
    engine.classes.register("tile", lambda: references)
    engine.classes.setup("tile", lambda: references)
    threshold = engine.classes.threshold("tile")
    parts = surfaces(4, 3)
    engine.classes.grow_memory("tile", parts[:2], ["p1", "p2"])
    grown = engine.classes.grow_memory("tile", parts[2:], ["p3"])
    assert grown.images == 10 and grown.confirmed == 2 and grown.sources[-1] == "confirmed:p3"
    assert sha256_frames([parts[0]]) not in grown.image_digests  # the oldest confirmed part went first
    after = engine.classes.threshold("tile")
    assert after.source == "calibration" and after != threshold  # recalibrated on the references
    restarted = Engine(config, backbone=backbone)
    restarted.classes.setup("tile", lambda: references)
    assert restarted.classes.memory("tile").sources == grown.sources  # same references: the grown memory stays
    assert restarted.classes.threshold("tile") == after


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.synth import generate

    root = tmp_path_factory.mktemp("shots")
    generate("texture:tiles", root, count=12, seed=7, good_fraction=0.34, image_size=96)
    return root


def test_fused_beats_zero_shot_on_generated_textures_with_four_shots(backbone, generated):
    from trainer.datasets import open_dataset
    from trainer.shots import evaluate_shots

    test = open_dataset(f"synthetic:{generated}/tiles@test")
    train = open_dataset(f"synthetic:{generated}/tiles@train")
    engine = Engine(tiny_config(image_size=96), backbone=backbone)
    outcome = evaluate_shots(engine, test, train, shots=[4], seeds=[0, 1, 2], weight=0.5)
    rows = {row["mode"]: row for row in outcome.summary()}
    for figure in ("image_auroc", "pixel_auroc"):
        assert rows["fused"][figure]["mean"] > rows["zero-shot"][figure]["mean"], (figure, rows)
    references = {p for r in outcome.runs for paths in r.references.values() for p in paths}
    assert references and not references & {str(s.image_path) for s in test}  # never a test image
