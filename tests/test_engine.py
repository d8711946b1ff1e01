"""The GenCLIP engine on the CPU with genclip-tiny: faithfulness to CLIP, the method's pieces, the API."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import CheckpointError, ClassSetupError, Engine
from model.backbone import BackboneError, load_backbone
from model.checkpoint import read_metadata, save_checkpoint
from model.cnf import FALLBACK_NAME, TEMPLATE, decide
from model.genclip import GenClip
from model.scoring import gaussian_blur
from model.vision import PatchEncoder, resize_position_embedding
from tests.factories import frames, perturbed_checkpoint, tiny_config


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("genclip-tiny", "random")


COMMON_CLASSES = ("bottle", "pcb1", "screw", "metal nut", "a")


def registered(engine: Engine, *names: str) -> Engine:
    """Register classes with their plain names (no reference images: class_word_source 'unfiltered')."""
    for name in names or COMMON_CLASSES:
        engine.classes.register(name)
    return engine


@pytest.fixture
def engine(backbone):
    return registered(Engine(tiny_config(), backbone=backbone))


# --- faithfulness to open_clip -------------------------------------------------------------------
@pytest.mark.parametrize("vv_from", [None, 2])
def test_global_embedding_equals_open_clip(backbone, vv_from):
    """Our own pass over the ViT gives CLIP's image embedding, with or without the V-V stream."""
    encoder = PatchEncoder(backbone.clip.visual, 224, [2, 4, 6, 8], vv_from)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = encoder(images).global_embedding
        theirs = backbone.clip.visual(images)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_text_encoder_equals_open_clip(backbone, engine):
    text = engine.snapshot.prompts.model.text
    sentences = ["a photo of a bottle.", "a photo of a metal nut with a scratch."]
    with torch.no_grad():
        ours = text.encode_texts(sentences)
        theirs = F.normalize(backbone.clip.encode_text(backbone.tokenizer(sentences)), dim=-1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_eot_truncation_changes_nothing(engine):
    """Running only up to the last EOT equals the full 77-token run, whatever follows EOT."""
    model = engine.snapshot.prompts.model
    suffixes = [model.suffix("bottle"), model.suffix("metal nut"), model.suffix("printed circuit board")]
    padded, lengths = model.pad_suffixes(suffixes)
    offsets = torch.randn(3, len(model.layers), model.shape.text_width) * 0.1
    prompts, eot = model.prompts.state_prompts(model.sot, padded, lengths, offsets)
    flat = prompts.reshape(-1, prompts.shape[-2], prompts.shape[-1])
    full = torch.randn(flat.shape[0], 77, flat.shape[-1])  # garbage after the prompt
    full[:, : flat.shape[1]] = flat
    with torch.no_grad():
        short = model.text(flat, eot.reshape(-1), truncate=True)
        long = model.text(full, eot.reshape(-1), truncate=False)
    assert int(eot.max()) + 1 < 77
    torch.testing.assert_close(short, long, atol=1e-5, rtol=0)


# --- the method's pieces -----------------------------------------------------------------------------
def test_value_value_attention_matches_a_plain_reference(backbone):
    block = backbone.clip.visual.transformer.resblocks[3]
    x = torch.randn(2, 10, backbone.vision_width)
    width, heads = x.shape[-1], block.attn.num_heads
    v = x @ block.attn.in_proj_weight[2 * width :].t() + block.attn.in_proj_bias[2 * width :]
    head_dim = width // heads
    outs = []
    for h in range(heads):
        vh = v[..., h * head_dim : (h + 1) * head_dim]
        weights = torch.softmax(vh @ vh.transpose(1, 2) / math.sqrt(head_dim), dim=-1)
        outs.append(weights @ vh)
    expected = block.attn.out_proj(torch.cat(outs, dim=-1))
    with torch.no_grad():
        got = PatchEncoder.value_value_attention(block, x)
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)


def test_four_layer_maps_differ(engine):
    model = engine.snapshot.prompts.model
    images = engine.preprocess(frames(2))
    with torch.no_grad():
        feats = model.encode_image(images)
        maps = model.layer_maps(feats, engine.snapshot.prompts.query_text)
    assert maps.shape[1] == 4
    for i in range(4):
        for j in range(i + 1, 4):
            assert (maps[:, i] - maps[:, j]).abs().max() > 1e-3, f"layer maps {i} and {j} are identical"


def test_value_value_stream_changes_only_layers_from_its_start(backbone):
    images = torch.randn(2, 3, 224, 224)
    plain = PatchEncoder(backbone.clip.visual, 224, [2, 4, 6, 8], None)
    vv = PatchEncoder(backbone.clip.visual, 224, [2, 4, 6, 8], 4)
    with torch.no_grad():
        a, b = plain(images).layer_tokens, vv(images).layer_tokens
    torch.testing.assert_close(a[0], b[0])  # block 2 is before the V-V stream starts
    for i in (1, 2, 3):
        assert (a[i] - b[i]).abs().max() > 1e-3


def test_position_embedding_resize_keeps_class_position(backbone):
    pos = backbone.clip.visual.positional_embedding.detach()
    torch.testing.assert_close(resize_position_embedding(pos, 14), pos)
    bigger = resize_position_embedding(pos, 20)
    assert bigger.shape == (401, pos.shape[1])
    torch.testing.assert_close(bigger[0], pos[0])


def test_untrained_adapters_are_plain_clip(engine, backbone):
    """A_i start at CLIP's projection: patch features equal ln_post(tokens) @ proj, normalised."""
    model = engine.snapshot.prompts.model
    images = engine.preprocess(frames(1))
    with torch.no_grad():
        out = model.vision(images)
        feats = model.image_features(out)
        expected = F.normalize(out.layer_tokens[1] @ backbone.clip.visual.proj, dim=-1)
    torch.testing.assert_close(feats.patches[:, 1], expected, atol=1e-5, rtol=1e-5)


def test_blur_matches_scipy():
    import scipy.ndimage as scipy_ndimage

    maps = torch.rand(2, 40, 56)
    ours = gaussian_blur(maps, 2.5).numpy()
    for i in range(2):
        ref = scipy_ndimage.gaussian_filter(maps[i].numpy(), sigma=2.5, mode="reflect", truncate=4.0)
        np.testing.assert_allclose(ours[i], ref, atol=1e-5)


def test_only_learned_tensors_get_gradients(backbone):
    """One training step moves prompts and adapters and leaves every backbone weight untouched."""
    model = GenClip(backbone, tiny_config())
    model.train()
    frozen_before = {k: v.clone() for k, v in backbone.clip.state_dict().items()}
    learned_before = {k: v.clone() for k, v in model.learned_state().items()}
    images = torch.randn(2, 3, 224, 224)
    feats = model.encode_image(images)
    text = model.state_text([model.suffix("bottle")] * 2, feats.vision_prompts)
    maps = model.layer_maps(feats, text)
    global_logits = feats.global_embedding @ model.query_text().t()
    defect = model.defect_logits(feats, model.defect_text(["scratch", "hole"], "bottle"))
    loss = maps.mean() + global_logits.sum() + defect.logsumexp(-1).mean()
    torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2).zero_grad()
    loss.backward()
    for name, p in backbone.clip.named_parameters():
        assert p.grad is None, f"backbone parameter {name} got a gradient"
    learned = dict(model.prompts.named_parameters(prefix="prompts")) | dict(
        model.adapters.named_parameters(prefix="adapters")
    )
    for name, p in learned.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"
    torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    for k, v in backbone.clip.state_dict().items():
        assert torch.equal(v, frozen_before[k]), f"backbone tensor {k} changed"
    changed = [k for k, v in model.learned_state().items() if not torch.equal(v, learned_before[k])]
    assert len(changed) == len(learned_before)


# --- class names ---------------------------------------------------------------------------------
def test_cnf_rule_with_controlled_similarities():
    d = 8
    class_text = F.normalize(torch.eye(d)[0], dim=0)
    generic = torch.eye(d)[1:4]
    like_class = F.normalize(torch.eye(d)[0] + 0.1 * torch.randn(5, d), dim=-1)
    like_generic = F.normalize(torch.eye(d)[2] + 0.1 * torch.randn(5, d), dim=-1)
    kept = decide("bottle", like_class, class_text, generic, ["object", "part", "item"])
    replaced = decide("pcb4", like_generic, class_text, generic, ["object", "part", "item"])
    assert kept.kept and kept.used_name == "bottle"
    assert not replaced.kept and replaced.used_name == FALLBACK_NAME
    assert replaced.generic_similarities["part"] > replaced.class_similarity
    strict = decide("bottle", like_class, class_text, generic, ["object", "part", "item"], margin=2.0)
    assert not strict.kept


def test_engine_cnf_replaces_unrecognisable_name_and_keeps_known_one(backbone, monkeypatch):
    """The engine's CNF through the real text encoder, with reference 'images' whose similarities we set."""
    engine = Engine(tiny_config(), backbone=backbone)
    text = engine.snapshot.prompts.model.text
    with torch.no_grad():
        looks = {
            "qx7-pcb4": text.encode_texts([TEMPLATE.format("object")]),
            "gizmo": text.encode_texts([TEMPLATE.format("gizmo")]),
        }
    refs = frames(8)
    for name, embedding in looks.items():
        monkeypatch.setattr(engine.classes.scorer, "image_embeddings", lambda f, e=embedding: e.expand(len(f), -1))
        engine.classes.register(name, refs)
    replaced, kept = engine.classes.status("qx7-pcb4"), engine.classes.status("gizmo")
    assert replaced.class_word == "object" and replaced.class_word_source == "cnf"
    assert not replaced.cnf["kept"] and replaced.cnf["generic_similarities"]
    assert kept.class_word == "gizmo" and kept.cnf["kept"]


def test_class_setup_rules(backbone):
    words = {"pcb4": "circuit board", "long": "very " * 70}
    engine = Engine(tiny_config(class_words=words, min_reference_images=4), backbone=backbone)
    with pytest.raises(ClassSetupError, match=r"3 reference image\(s\).*at least 4"):
        engine.classes.register("widget", frames(3))
    assert engine.classes.register("pcb4").class_word_source == "config"
    assert engine.classes.status("pcb4").class_word == "circuit board"
    unfiltered = engine.classes.register("  wid   get ")
    assert (unfiltered.product_class, unfiltered.class_word_source) == ("wid get", "unfiltered")
    assert engine.classes.register("object").class_word_source == "generic"
    with pytest.raises(ClassSetupError, match="too long: its prompts need"):
        engine.classes.register("long")


def test_cnf_off_keeps_names(backbone):
    engine = Engine(tiny_config(cnf=False), backbone=backbone)
    engine.classes.register("pcb4", frames(8))
    assert engine.classes.status("pcb4").class_word == "pcb4"
    assert engine.classes.status("pcb4").class_word_source == "cnf-off"


# --- the batched API ---------------------------------------------------------------------------------
def test_predictions_have_frame_shapes_and_valid_ranges(engine):
    batch = frames(2, size=(90, 130)) + frames(1, seed=3, size=(240, 200))
    batch.append(np.random.default_rng(1).integers(0, 65535, (64, 80), dtype=np.uint16))
    preds = engine.predict(batch, ["bottle", "bottle", "pcb1", "pcb1"])
    assert len(preds) == 4
    for frame, p in zip(batch, preds, strict=True):
        assert p.anomaly_map.shape == (224, 224) and p.anomaly_map.dtype == np.float32
        assert p.frame_size == frame.shape[:2] and p.frame_map().shape == frame.shape[:2]
        assert 0.0 <= p.anomaly_map.min() <= p.anomaly_map.max() <= 1.0
        assert 0.0 <= p.score <= 1.0 and 0.0 <= p.global_score <= 1.0
        assert p.prompt_version == "untrained"
        assert p.is_anomalous == (p.score >= p.threshold)
        for d in p.defects:
            x, y, w, h = d.bbox
            assert x >= 0 and y >= 0 and x + w <= frame.shape[1] + 1 and y + h <= frame.shape[0] + 1
            assert d.type in engine.config.defect_types and 0.0 <= d.type_probability <= 1.0


def test_batched_equals_one_at_a_time(backbone):
    engine = Engine(tiny_config(), backbone=backbone)
    batch = frames(4, seed=5)
    classes = ["bottle", "pcb1", "bottle", "screw"]
    for name in set(classes):
        engine.classes.register(name)
    together = engine.predict(batch, classes)
    alone = [engine.predict([f], [c])[0] for f, c in zip(batch, classes, strict=True)]
    for a, b in zip(together, alone, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-5)
        assert [d.type for d in a.defects] == [d.type for d in b.defects]


def test_non_native_image_size_interpolates_positions(backbone):
    engine = registered(Engine(tiny_config(image_size=288), backbone=backbone), "bottle")  # 18x18 patches
    pred = engine.predict(frames(1, size=(100, 300)), ["bottle"])[0]
    assert pred.anomaly_map.shape == (288, 288) and pred.frame_map().shape == (100, 300) and 0 <= pred.score <= 1
    with pytest.raises(ValueError, match="not a multiple of"):
        Engine(tiny_config(image_size=250), backbone=backbone)


def test_compiled_image_path_equals_eager(backbone):
    """`compile = true` (torch.compile; CUDA graphs on a GPU) changes speed, not numbers."""
    eager = registered(Engine(tiny_config(), backbone=backbone), "bottle")
    compiled = registered(Engine(tiny_config(compile=True), backbone=backbone, max_batch=4), "bottle")
    compiled.warmup()
    batch = frames(3, seed=9)
    for a, b in zip(eager.predict(batch, ["bottle"] * 3), compiled.predict(batch, ["bottle"] * 3), strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-5)


def test_invalid_frames_are_named_and_the_rest_scored(engine):
    good = frames(1)[0]
    batch = [good, np.zeros((50, 50, 3), np.float32), np.zeros((50, 50, 5), np.uint8), None, good, good, good]
    classes = ["a", "a", "a", "a", "", "nobody", "x" * 80]
    results = engine.predict(batch, classes)
    assert results[0].ok and results[0].anomaly_map.shape == (224, 224)
    reasons = [r.reason for r in results[1:]]
    assert "expected uint8 or uint16" in reasons[0]
    assert "expected HxW gray or HxWx3" in reasons[1]
    assert "expected a numpy array" in reasons[2]
    assert "product class is empty" in reasons[3]
    assert "unknown product class 'nobody'" in reasons[4]
    assert "too long" in reasons[5]
    assert [r.index for r in results[1:]] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="2 frames but 1 class"):
        engine.predict(frames(2), ["a"])


def test_oversized_frames_are_refused_by_the_pixel_limit(backbone):
    engine = registered(Engine(tiny_config(max_frame_pixels=100 * 100), backbone=backbone), "a")
    small, big = frames(1, size=(100, 100))[0], frames(1, size=(101, 100))[0]
    ok, refused = engine.predict([small, big], ["a", "a"])
    assert ok.ok and not refused.ok and "max_frame_pixels" in refused.reason


def test_text_cache_second_batch_does_no_class_text_work(engine):
    text = engine.snapshot.prompts.model.text
    engine.predict(frames(2), ["bottle", "bottle"])
    builds, calls = engine.stats.class_text_builds, text.calls
    engine.predict(frames(3, seed=1), ["bottle"] * 3)
    assert engine.stats.class_text_builds == builds
    assert text.calls - calls == 1  # only the per-image vision-enhanced prompts


def test_query_only_mode_runs_no_text_per_batch(backbone):
    engine = registered(Engine(tiny_config(branch_weight=0.0), backbone=backbone), "bottle")
    engine.predict(frames(2), ["bottle", "bottle"])
    calls = engine.snapshot.prompts.model.text.calls
    engine.predict(frames(2, seed=2), ["bottle", "bottle"])
    assert engine.snapshot.prompts.model.text.calls == calls


def test_thresholds_come_from_config_then_calibration_then_default(backbone):
    engine = Engine(tiny_config(), backbone=backbone)
    engine.classes.register("bottle", frames(8, seed=4))  # good parts: class word and calibration
    engine.classes.register("screw")
    value, source = engine.classes.threshold("bottle")
    assert source == "calibration" and value == engine.classes.profile("bottle").calibration.threshold
    assert engine.classes.threshold("screw") == (engine.config.default_threshold, "default")
    engine.classes.set_thresholds({"bottle": 0.9})
    assert engine.classes.threshold("bottle") == (0.9, "config")
    assert engine.predict(frames(1), ["bottle"])[0].threshold == 0.9


# --- checkpoints and hot swap ------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path, backbone):
    config = tiny_config()
    path = tmp_path / "prompts.safetensors"
    model = perturbed_checkpoint(path, backbone, config, meta={"training_data": ["synthetic:/x"]})
    engine = Engine(tiny_config(checkpoint=path), backbone=backbone)
    for k, v in model.learned_state().items():
        assert torch.equal(engine.snapshot.prompts.model.learned_state()[k], v)
    meta = read_metadata(path)
    assert meta["backbone"] == "genclip-tiny" and meta["layers"] == [2, 4, 6, 8]
    assert meta["training_data"] == ["synthetic:/x"] and "created_at" in meta
    assert engine.prompt_version.startswith("prompts@")
    untrained = registered(Engine(config, backbone=backbone), "bottle").predict(frames(1), ["bottle"])[0]
    trained = registered(engine, "bottle").predict(frames(1), ["bottle"])[0]
    assert abs(untrained.score - trained.score) > 1e-4


@pytest.mark.parametrize(
    ("field", "value"),
    [("backbone", "ViT-B-16"), ("weights", "tag:openai"), ("image_size", 448), ("layers", [3, 6, 9, 12])],
)
def test_checkpoint_for_another_model_is_refused(tmp_path, backbone, field, value):
    path = tmp_path / "other.safetensors"
    perturbed_checkpoint(path, backbone, tiny_config(), meta={field: value})
    with pytest.raises(CheckpointError, match=f"field '{field}'"):
        Engine(tiny_config(checkpoint=path), backbone=backbone)


def test_bad_files_are_refused_and_old_prompts_keep_serving(tmp_path, backbone):
    good = tmp_path / "good.safetensors"
    perturbed_checkpoint(good, backbone, tiny_config())
    engine = registered(Engine(tiny_config(checkpoint=good), backbone=backbone), "bottle")
    version = engine.prompt_version
    before = engine.predict(frames(1), ["bottle"])[0].score

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x13not a checkpoint at all" * 10)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.safetensors"
    save_checkpoint(foreign, {"x": torch.zeros(3)}, {"backbone": "genclip-tiny"})
    foreign.write_bytes(foreign.read_bytes().replace(b"genclip-prompts", b"something-else-"))
    wrong_shape = tmp_path / "shape.safetensors"
    perturbed_checkpoint(wrong_shape, backbone, tiny_config(query_tokens=6))
    meta = read_metadata(wrong_shape)
    save_checkpoint(wrong_shape, {"prompts.query": torch.zeros(2, 2)}, {k: v for k, v in meta.items() if k != "format"})

    for bad, message in [
        (garbage, "not a readable safetensors file"),
        (truncated, "not a readable safetensors file"),
        (foreign, "header format"),
        (wrong_shape, "do not fit this model"),
        (tmp_path / "missing.safetensors", "no such checkpoint"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            engine.load_prompts(bad)
        assert engine.prompt_version == version
        assert engine.predict(frames(1), ["bottle"])[0].score == pytest.approx(before, abs=1e-6)


def test_swap_happens_between_batches(tmp_path, backbone):
    """A swap requested while a batch runs takes effect for the next batch, not the one in flight."""
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    perturbed_checkpoint(first, backbone, tiny_config(), seed=1)
    perturbed_checkpoint(second, backbone, tiny_config(), seed=2)
    engine = registered(Engine(tiny_config(checkpoint=first), backbone=backbone), "bottle", "pcb1")
    engine.predict(frames(1), ["bottle"])
    old_version = engine.prompt_version
    original_score = engine._score
    swapped: list[str] = []

    def score_with_swap_midway(prompts, texts, batch):
        if not swapped:
            swapped.append(engine.load_prompts(second))
        return original_score(prompts, texts, batch)

    engine._score = score_with_swap_midway
    in_flight = engine.predict(frames(2), ["bottle", "pcb1"])
    after = engine.predict(frames(2), ["bottle", "pcb1"])
    assert {p.prompt_version for p in in_flight} == {old_version}
    assert {p.prompt_version for p in after} == {swapped[0]} and swapped[0] != old_version
    assert engine.stats.prompt_swaps == 1
    assert engine.classes.names() == ["bottle", "pcb1"]  # class texts rebuilt before the swap


# --- backbone loading ------------------------------------------------------------------------------
def test_missing_pretrained_weights_fail_with_instructions(tmp_path):
    with pytest.raises(BackboneError, match=r"not on this machine.*\[model\]\.pretrained"):
        load_backbone("ViT-B-16", "openai", cache_dir=tmp_path)
    with pytest.raises(BackboneError, match="not a pretrained tag"):
        load_backbone("ViT-B-16", "no-such-tag")
    with pytest.raises(BackboneError, match="weights file not found"):
        load_backbone("ViT-B-16", str(tmp_path / "nope.safetensors"))
    with pytest.raises(BackboneError, match="unknown backbone"):
        load_backbone("ViT-Q-99", "random")


def test_random_weights_load_quietly_and_corrupt_files_are_named(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        load_backbone("genclip-tiny", "random")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    corrupt = tmp_path / "weights.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(BackboneError, match=f"cannot load weights {corrupt} into genclip-tiny"):
        load_backbone("genclip-tiny", str(corrupt))


def test_weights_file_for_another_architecture_is_refused(tmp_path, backbone):
    from safetensors.torch import save_file

    path = tmp_path / "tiny-weights.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.clip.state_dict().items()}, str(path))
    loaded = load_backbone("genclip-tiny", str(path))
    assert loaded.weights.startswith("sha256:")
    with pytest.raises(BackboneError, match="cannot load weights"):
        load_backbone("ViT-B-32", str(path))


# --- export -----------------------------------------------------------------------------------------
def test_onnx_export_equals_torch(tmp_path, engine):
    from model.export import check_onnx, export_onnx

    frame = frames(1, size=(224, 224))[0]
    engine_score = engine.predict([frame], ["bottle"])[0].score
    path = tmp_path / "genclip.onnx"
    scorer = export_onnx(engine, ["bottle", "metal nut"], path)
    diffs = check_onnx(scorer, path, batch=3)
    assert diffs["max_score_diff"] < 1e-4 and diffs["max_map_diff"] < 1e-4
    # the exported module is the engine's own scoring
    rgb = torch.from_numpy(frame[:, :, ::-1].copy()).permute(2, 0, 1).float().unsqueeze(0) / 255
    with torch.no_grad():
        score, _ = scorer(rgb, torch.zeros(1, dtype=torch.long))
    assert float(score[0]) == pytest.approx(engine_score, abs=1e-4)
