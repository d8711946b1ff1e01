"""Synthetic defects (masks match the change), the MVTec writer, and the procedural good surfaces."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from synthetic.defects import NOTICEABLE, apply_defect, crack, dent, hole, missing_part, scratch, stain
from synthetic.kinds import DEFECT_KINDS, normalise_kind
from synthetic.textures import FAMILIES, render_texture, write_good_images
from trainer.datasets import load_sample, read_bgr8, read_mvtec
from trainer.synth import MARKER_FILE, NoGoodImagesError, generate, synth_command

DrawDefect = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, np.ndarray]]
CLEARLY_CHANGED = 15  # grey levels: a change anyone would see
SOMEWHAT_CHANGED = 6


def background(kind: str | tuple[int, int, int], height: int, width: int, seed: int) -> np.ndarray:
    if isinstance(kind, str):
        return np.ascontiguousarray(render_texture(kind, seed, max(height, width))[:height, :width])
    return np.full((height, width, 3), kind, np.uint8)


def check_defect(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> None:
    """The mask covers the visible change, and (nearly) only it."""
    assert after.shape == before.shape and after.dtype == np.uint8
    assert mask.shape == before.shape[:2] and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 255}
    region = mask > 0
    assert region.sum() >= max(4, min(before.shape[:2]) // 16)
    change = np.abs(after.astype(np.int16) - before.astype(np.int16)).max(axis=2)
    changed = change > CLEARLY_CHANGED
    near = cv2.dilate(mask, np.ones((5, 5), np.uint8)) > 0  # mask grown by 2 px
    assert changed.sum() > 0
    assert (changed & near).sum() / changed.sum() > 0.95
    assert (change[region] >= SOMEWHAT_CHANGED).mean() > 0.85
    assert (change[~near] >= NOTICEABLE).sum() == 0


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(DEFECT_KINDS),
    seed=st.integers(0, 2**32),
    height=st.integers(24, 160),
    width=st.integers(24, 160),
    surface=st.one_of(
        st.sampled_from(FAMILIES),
        st.tuples(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
        st.sampled_from([(0, 0, 0), (255, 255, 255)]),
    ),
)
def test_defect_mask_matches_the_change(
    kind: str, seed: int, height: int, width: int, surface: str | tuple[int, int, int]
) -> None:
    before = background(surface, height, width, seed)
    untouched = before.copy()
    after, mask = apply_defect(before, kind, np.random.default_rng(seed))
    assert np.array_equal(before, untouched)  # the input is not modified
    check_defect(before, after, mask)


@pytest.mark.parametrize("draw", [scratch, crack, hole, stain, missing_part, dent])
@pytest.mark.parametrize("size", [64, 512])
def test_each_kind_on_textures_and_extremes(draw: DrawDefect, size: int) -> None:
    for index, surface in enumerate([*FAMILIES, (0, 0, 0), (255, 255, 255), (30, 200, 90)]):
        before = background(surface, size, size, index)
        after, mask = draw(before, np.random.default_rng(index))
        check_defect(before, after, mask)


def test_defect_sizes_scale_with_the_image() -> None:
    def median_area(size: int) -> float:
        grey = background((128, 128, 128), size, size, 0)
        masks = [apply_defect(grey, "hole", np.random.default_rng(seed))[1] for seed in range(12)]
        return float(np.median([(mask > 0).mean() for mask in masks]))

    assert median_area(512) == pytest.approx(median_area(128), rel=0.6)


def test_defects_are_deterministic_per_seed() -> None:
    before = render_texture("woven", 3, 96)
    for kind in DEFECT_KINDS:
        a = apply_defect(before, kind, np.random.default_rng(5))
        b = apply_defect(before, kind, np.random.default_rng(5))
        c = apply_defect(before, kind, np.random.default_rng(6))
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert not np.array_equal(a[0], c[0])


def test_kind_names() -> None:
    assert normalise_kind("Missing_Part") == "missing part"
    with pytest.raises(ValueError, match="unknown defect kind"):
        normalise_kind("smudge")
    with pytest.raises(ValueError, match="uint8"):
        apply_defect(np.zeros((32, 32), np.uint8), "hole", np.random.default_rng(0))


# --------------------------------------------------------------------------- generate()


@pytest.fixture
def goods(tmp_path: Path) -> Path:
    source = tmp_path / "gear_wheel"
    write_good_images("metal", source, 4, seed=1, size=64)
    write_good_images("tiles", source / "nested", 2, seed=1, size=48)
    return source


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_writes_mvtec_layout_read_back_by_read_mvtec(goods: Path, tmp_path: Path) -> None:
    out = tmp_path / "synth"
    summary = generate(goods, out, count=14, seed=3)
    assert summary.class_name == "gear wheel" and summary.class_dir == out / "gear_wheel"
    assert (summary.good, summary.train_good, summary.test_images) == (4, 4, 14)
    assert summary.defects == {"scratch": 2, "crack": 2, "hole": 2, "stain": 2, "missing part": 1, "dent": 1}
    assert summary.skipped == []
    assert (out / "gear_wheel/ground_truth/missing_part/000_mask.png").is_file()
    assert (out / "gear_wheel" / MARKER_FILE).is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left behind

    test = read_mvtec(out)
    assert len(test) == 14 and {s.product_class for s in test} == {"gear wheel"}
    per_type: dict[str | None, int] = {}
    for sample in test:
        per_type[sample.defect_type] = per_type.get(sample.defect_type, 0) + 1
        assert (sample.mask_path is not None) == (sample.label == 1)
        if sample.label:
            image, mask = read_bgr8(sample.image_path), read_bgr8(sample.mask_path)
            assert image.shape == mask.shape and mask.any()
            assert load_sample(sample, 32).mask.any()
    assert per_type == {None: 4, **summary.defects}
    assert len(read_mvtec(out, split="train")) == 4


def test_generate_is_deterministic(goods: Path, tmp_path: Path) -> None:
    first = tree_bytes(generate(goods, tmp_path / "a", count=8, seed=11).class_dir)
    again = tree_bytes(generate(goods, tmp_path / "b", count=8, seed=11).class_dir)
    other = tree_bytes(generate(goods, tmp_path / "c", count=8, seed=12).class_dir)
    assert first == again
    assert first.keys() == other.keys() and first != other


def test_generate_options(goods: Path, tmp_path: Path) -> None:
    options = {"kinds": ["missing_part", "dent"], "class_name": "cog", "good_fraction": 0.0, "image_size": 40}
    summary = generate(goods, tmp_path / "o", count=5, seed=0, **options)
    assert (summary.good, summary.train_good, summary.defects) == (0, 1, {"missing part": 3, "dent": 2})
    images = [read_bgr8(s.image_path) for s in read_mvtec(tmp_path / "o", split="all")]
    assert len(images) == 6 and all(i.shape == (40, 40, 3) for i in images)
    with pytest.raises(ValueError, match="unknown defect kind"):
        generate(goods, tmp_path / "o", count=5, seed=0, kinds=["smudge"])


def test_unreadable_sources_are_skipped_and_reported(goods: Path, tmp_path: Path) -> None:
    (goods / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))
    summary = generate(goods, tmp_path / "out", count=20, seed=0)
    assert [Path(s.path).name for s in summary.skipped] == ["zz_broken.png"]
    assert summary.test_images == 20


def test_no_readable_source_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "junk"
    source.mkdir()
    (source / "a.png").write_bytes(b"not a png")
    with pytest.raises(NoGoodImagesError, match=r"a\.png"):
        generate(source, tmp_path / "out", count=3, seed=0)
    assert synth_command(source, tmp_path / "out", 3, 0, None, None) == 1
    assert synth_command(tmp_path / "empty", tmp_path / "out", 3, 0, None, None) == 1
    assert "no readable images" in capsys.readouterr().out
    assert not (tmp_path / "out" / "junk").exists()


def test_generate_replaces_only_its_own_folders(goods: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(goods, out, count=6, seed=0, class_name="gear")
    summary = generate(goods, out, count=3, seed=0, class_name="gear")  # rerun: replaced, no stale files
    assert len(read_mvtec(out)) == summary.test_images == 3
    (out / "real_part/test/good").mkdir(parents=True)
    (out / "real_part/test/good/0.png").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not made by"):
        generate(goods, out, count=3, seed=0, class_name="real part")
    assert (out / "real_part/test/good/0.png").read_bytes() == b"precious"


def test_generate_ignores_its_output_inside_the_source(goods: Path) -> None:
    generate(goods, goods / "synth", count=6, seed=0)
    summary = generate(goods, goods / "synth", count=6, seed=0)
    assert summary.skipped == [] and summary.good == 2


def test_synth_command_with_texture_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert synth_command(Path("texture:leather"), tmp_path / "out", 20, 4, ["stain", "hole"], None) == 0
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if line.startswith("synth: ") and "%)" in line]
    assert 8 <= len(progress) <= 12 and progress[-1].endswith("(100%)")
    assert "wrote 20 test images" in lines[-1] and "stain 7, hole 7" in lines[-1]
    samples = read_mvtec(tmp_path / "out")
    assert {s.product_class for s in samples} == {"leather"} and len(samples) == 20
    assert read_bgr8(samples[0].image_path).shape == (256, 256, 3)
    assert synth_command(Path("texture:plaid"), tmp_path / "out", 5, 0, None, None) == 2
    assert synth_command(Path("texture:woven"), tmp_path / "out", 5, 0, ["smudge"], None) == 2
    assert synth_command(Path("texture:woven"), tmp_path / "out", 0, 0, None, None) == 2


# --------------------------------------------------------------------------- textures


@pytest.mark.parametrize("family", FAMILIES)
def test_textures_are_deterministic_and_vary_by_seed(family: str) -> None:
    a = render_texture(family, 7, 96)
    assert a.shape == (96, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_texture(family, 7, 96))
    b = render_texture(family, 8, 96)
    assert np.abs(a.astype(np.int16) - b.astype(np.int16)).mean() > 3
    assert a.std() > 5  # a surface, not a flat fill


def texture_features(image: np.ndarray) -> np.ndarray:
    """Rotation-tolerant look: orientation coherence, fine detail, coarse structure, colour, contrast."""
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
    gx, gy = cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1)
    jxx, jyy, jxy = (gx * gx).mean(), (gy * gy).mean(), (gx * gy).mean()
    coherence = np.sqrt((jxx - jyy) ** 2 + 4 * jxy**2) / (jxx + jyy + 1e-6)
    variance = gray.var() + 1e-6
    detail = np.log(cv2.Laplacian(gray, cv2.CV_32F).var() / variance)
    coarse = cv2.GaussianBlur(gray, (0, 0), 4).var() / variance
    saturation = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)[:, :, 1].mean() / 255
    return np.asarray([coherence, detail, coarse, saturation, gray.std() / 64])


def test_texture_families_are_told_apart_by_simple_statistics() -> None:
    seeds = range(8)
    features = {f: np.stack([texture_features(render_texture(f, s, 128)) for s in seeds]) for f in FAMILIES}
    everything = np.concatenate(list(features.values()))
    scale = everything.std(axis=0)
    right = 0
    for family in FAMILIES:
        for held_out in seeds:  # leave-one-out nearest centroid
            centroids = {
                other: (np.delete(features[other], held_out, 0) if other == family else features[other]).mean(0)
                for other in FAMILIES
            }
            x = features[family][held_out]
            guess = min(FAMILIES, key=lambda other: np.linalg.norm((centroids[other] - x) / scale))
            right += guess == family
    assert right / (len(FAMILIES) * len(seeds)) >= 0.85


def test_write_good_images(tmp_path: Path) -> None:
    paths = write_good_images("dots", tmp_path / "dots", 3, seed=2, size=32)
    assert [p.name for p in paths] == ["dots_000.png", "dots_001.png", "dots_002.png"]
    images = [read_bgr8(p) for p in paths]
    assert all(i.shape == (32, 32, 3) for i in images) and not np.array_equal(images[0], images[1])
    with pytest.raises(ValueError, match="unknown texture family"):
        render_texture("plaid", 0, 32)
