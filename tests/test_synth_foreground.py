"""`genclip synth --foreground`: defects on the product, not on the background it was photographed on."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli.main import app
from synthetic.defects import apply_defect
from synthetic.kinds import DEFECT_KINDS
from synthetic.textures import FAMILIES, render_texture, write_good_images
from tests.test_synth import check_defect
from trainer.datasets import read_bgr8, read_mvtec
from trainer.foreground import ForegroundError, estimate_foreground
from trainer.synth import MARKER_FILE, generate, synth_command

runner = CliRunner()

ON_OBJECT = 0.9  # share of each defect mask's pixels that must lie on the product


def object_scene(
    seed: int,
    size: int = 160,
    family: str = "metal",
    backdrop: tuple[int, int, int] = (205, 205, 200),
    shape: str = "disc",
) -> tuple[np.ndarray, np.ndarray]:
    """A textured part on a plain, lamp-shaded, noisy backdrop, and the part's true pixels.

    `disc` is a brake disc (a ring: the bore shows the backdrop), `bar` an off-centre rectangle.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if shape == "disc":
        cx, cy, radius = size * rng.uniform(0.4, 0.6), size * rng.uniform(0.4, 0.6), size * rng.uniform(0.25, 0.38)
        distance = np.hypot(x - cx, y - cy)
        part = (distance < radius) & (distance > 0.35 * radius)
    else:
        left, top = rng.integers(size // 10, size // 3, 2)
        part = (x >= left) & (x < left + size // 2) & (y >= top) & (y < top + size // 3)
    image = np.empty((size, size, 3), np.float32)
    image[:] = backdrop
    image += ((x / size - 0.5) * 20)[:, :, None]
    image[part] = render_texture(family, seed, size)[part]
    image += rng.normal(0, 2, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), part


SCENES = [
    {"seed": 0, "family": "metal", "backdrop": (205, 205, 200)},  # grey disc on a light backdrop
    {"seed": 1, "family": "grain", "backdrop": (30, 30, 30), "shape": "bar"},
    {"seed": 2, "family": "woven", "backdrop": (90, 140, 60)},
]


def defect_masks(root: Path) -> list[np.ndarray]:
    return [read_bgr8(s.mask_path)[:, :, 0] > 0 for s in read_mvtec(root) if s.label]


def marker(class_dir: Path) -> dict:
    return json.loads((class_dir / MARKER_FILE).read_text())


@pytest.mark.parametrize("scene", SCENES)
def test_auto_puts_every_defect_on_the_object(scene: dict, tmp_path: Path) -> None:
    image, part = object_scene(**scene)
    source = tmp_path / "brake_disc"
    source.mkdir()
    cv2.imwrite(str(source / "part.png"), image)
    summary = generate(source, tmp_path / "out", count=24, seed=scene["seed"], good_fraction=0.0)
    masks = defect_masks(tmp_path / "out")
    assert len(masks) == 24
    shares = [float(part[mask].mean()) for mask in masks]
    assert min(shares) >= ON_OBJECT, shares
    assert summary.placed == {"auto": 24} and summary.fallbacks == []
    records = marker(summary.class_dir)["defect_images"]
    assert len(records) == 24 and {r["source"] for r in records} == {"part.png"}
    assert {r["foreground"] for r in records} == {"auto"}
    assert all(0.5 * part.mean() < r["foreground_share"] <= part.mean() for r in records)


@pytest.mark.parametrize("scene", [*SCENES, {"seed": 3, "size": 600, "family": "leather", "backdrop": (240, 240, 240)}])
def test_estimate_finds_the_object_and_errs_inwards(scene: dict) -> None:
    image, part = object_scene(**scene)
    found, reason = estimate_foreground(image)
    assert found is not None, reason
    assert found.shape == part.shape and found.dtype == bool
    assert (found & part).sum() / (found | part).sum() > 0.85
    assert part[found].mean() > 0.98  # what it calls product is product


@pytest.mark.parametrize("size", [64, 224, 512])
def test_auto_finds_no_object_in_full_frame_textures(size: int) -> None:
    for family in FAMILIES:
        for seed in range(4):
            found, reason = estimate_foreground(render_texture(family, seed, size))
            assert found is None, (family, seed)
            assert reason


def test_estimate_rejects_a_blank_image() -> None:
    found, reason = estimate_foreground(np.full((100, 120, 3), 128, np.uint8))
    assert found is None and "stands out" in reason


def test_auto_on_textures_is_exactly_the_old_behaviour(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "fabric"
    write_good_images("woven", source, 6, seed=2, size=96)
    write_good_images("tiles", source / "nested", 3, seed=2, size=96)
    auto = generate(source, tmp_path / "auto", count=20, seed=5)
    anywhere = generate(source, tmp_path / "all", count=20, seed=5, foreground="all")

    def pngs(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}

    assert pngs(auto.class_dir) == pngs(anywhere.class_dir)
    assert auto.placed == anywhere.placed == {"all": 14}
    assert len(auto.fallbacks) == 9 and all(f.reason.startswith("auto: ") for f in auto.fallbacks)
    assert anywhere.fallbacks == []
    records = marker(auto.class_dir)["defect_images"]
    assert {r["foreground"] for r in records} == {"all"} and all(r["foreground_share"] == 1.0 for r in records)
    assert all(r["foreground_detail"].startswith("auto: ") for r in records)
    assert any(r["source"].startswith("nested/") for r in records)
    assert all("foreground_detail" not in r for r in marker(anywhere.class_dir)["defect_images"])

    assert synth_command(Path("texture:tiles"), tmp_path / "cmd", 10, 0, None, None) == 0
    out = capsys.readouterr().out
    assert "foreground auto: no object on a plain background in any source image" in out


def test_synth_command_reports_images_without_an_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "mixed"
    source.mkdir()
    cv2.imwrite(str(source / "a_part.png"), object_scene(0, size=96)[0])
    cv2.imwrite(str(source / "b_cloth.png"), render_texture("woven", 0, 96))
    assert synth_command(source, tmp_path / "out", 10, 0, None, None) == 0
    out = capsys.readouterr().out
    records = marker(tmp_path / "out" / "mixed")["defect_images"]
    on_part = sum(r["source"] == "a_part.png" for r in records)
    assert 0 < on_part < len(records) == 7
    assert {r["foreground"] for r in records if r["source"] == "a_part.png"} == {"auto"}
    assert {r["foreground"] for r in records if r["source"] == "b_cloth.png"} == {"all"}
    assert f"foreground auto: {on_part} of 7 defect images on the object" in out
    assert f"{7 - on_part} defect images anywhere: no plausible object in 1 source image(s)" in out
    assert "b_cloth.png: " in out and "a_part.png:" not in out


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(DEFECT_KINDS),
    seed=st.integers(0, 2**32),
    family=st.sampled_from(FAMILIES),
    centre=st.tuples(st.floats(0.2, 0.8), st.floats(0.2, 0.8)),
    axes=st.tuples(st.floats(0.15, 0.45), st.floats(0.15, 0.45)),
)
def test_defects_never_leave_the_given_foreground(
    kind: str, seed: int, family: str, centre: tuple[float, float], axes: tuple[float, float]
) -> None:
    before = render_texture(family, seed % 1000, 96)
    foreground = np.zeros((96, 96), np.uint8)
    middle, half_axes = (round(centre[0] * 96), round(centre[1] * 96)), (round(axes[0] * 96), round(axes[1] * 96))
    cv2.ellipse(foreground, middle, half_axes, 0, 0, 360, 1, -1)
    foreground = foreground > 0
    after, mask = apply_defect(before, kind, np.random.default_rng(seed), foreground)
    check_defect(before, after, mask)
    assert not mask[~foreground].any()
    assert np.array_equal(after[~foreground], before[~foreground])


def test_apply_defect_checks_the_foreground() -> None:
    image = render_texture("metal", 0, 64)
    with pytest.raises(ValueError, match="foreground is 32x64 but the image is 64x64"):
        apply_defect(image, "hole", np.random.default_rng(0), np.ones((64, 32), bool))
    with pytest.raises(ValueError, match="foreground is empty"):
        apply_defect(image, "hole", np.random.default_rng(0), np.zeros((64, 64), bool))


@pytest.fixture
def masked_source(tmp_path: Path) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """Two part photos (one in a subfolder, one a JPEG) and masks that mark only part of each: the left half."""
    source, masks = tmp_path / "parts", tmp_path / "masks"
    given = {}
    for name, seed in (("front.png", 0), ("batch2/back.jpg", 1)):
        image, _ = object_scene(seed, size=120)
        mask = np.zeros(image.shape[:2], np.uint8)
        mask[:, :60] = 255
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (masks / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(source / name), image)
        cv2.imwrite(str((masks / name).with_suffix(".png")), mask)
        given[name] = mask > 0
    return source, masks, given


def test_a_mask_folder_is_honoured(masked_source: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    source, masks, given = masked_source
    summary = generate(source, tmp_path / "out", count=12, seed=1, good_fraction=0.0, foreground=masks)
    assert summary.placed == {"mask": 12}
    left_half = given["front.png"]
    for mask in defect_masks(tmp_path / "out"):
        assert mask.any() and not mask[~left_half].any()
    records = marker(summary.class_dir)["defect_images"]
    assert {r["source"] for r in records} == {"front.png", "batch2/back.jpg"}
    assert {Path(r["foreground_detail"]).relative_to(masks).as_posix() for r in records} == {
        "front.png",
        "batch2/back.png",
    }
    assert all(r["foreground"] == "mask" and r["foreground_share"] == 0.5 for r in records)

    resized = generate(source, tmp_path / "small", count=6, seed=1, good_fraction=0.0, foreground=masks, image_size=40)
    assert resized.placed == {"mask": 6}
    for mask in defect_masks(tmp_path / "small"):
        assert mask.shape == (40, 40) and mask.any() and not mask[:, 20:].any()


def test_masks_inside_the_source_folder_are_not_taken_for_parts(
    masked_source: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    source, masks, _ = masked_source
    inside = masks.rename(source / "masks")
    summary = generate(source, tmp_path / "out", count=8, seed=2, good_fraction=0.0, foreground=inside)
    assert summary.placed == {"mask": 8}
    assert {r["source"] for r in marker(summary.class_dir)["defect_images"]} == {"front.png", "batch2/back.jpg"}


def test_a_missing_mask_is_an_error_naming_it(
    masked_source: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, masks, _ = masked_source
    (masks / "batch2/back.png").unlink()
    expected = str(masks / "batch2" / "back.png")
    with pytest.raises(ForegroundError, match="does not exist") as error:
        generate(source, tmp_path / "out", count=4, seed=0, foreground=masks)
    assert expected in str(error.value) and "1 of 2 source images" in str(error.value)
    assert synth_command(source, tmp_path / "out", 4, 0, None, None, masks) == 2
    assert expected in capsys.readouterr().out
    assert not (tmp_path / "out" / "parts").exists()


def test_a_wrongly_sized_or_empty_mask_is_an_error_naming_it(
    masked_source: tuple[Path, Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    source, masks, _ = masked_source
    front = masks / "front.png"
    cv2.imwrite(str(front), np.full((60, 120), 255, np.uint8))
    with pytest.raises(ForegroundError, match=r"front\.png is 120x60 but its image is 120x120"):
        generate(source, tmp_path / "out", count=4, seed=0, good_fraction=0.0, foreground=masks)
    cv2.imwrite(str(front), np.zeros((120, 120), np.uint8))
    with pytest.raises(ForegroundError, match=r"front\.png is all black"):
        generate(source, tmp_path / "out", count=4, seed=0, good_fraction=0.0, foreground=masks)
    front.write_bytes(b"not a png")
    with pytest.raises(ForegroundError, match=r"front\.png cannot be read"):
        generate(source, tmp_path / "out", count=4, seed=0, good_fraction=0.0, foreground=masks)
    assert not (tmp_path / "out" / "parts").exists()


def test_bad_foreground_options(tmp_path: Path) -> None:
    source = tmp_path / "goods"
    write_good_images("grain", source, 2, seed=0, size=48)
    with pytest.raises(ForegroundError, match="is neither auto, all nor an existing folder of masks"):
        generate(source, tmp_path / "out", count=2, seed=0, foreground="object")
    with pytest.raises(ForegroundError, match="needs a folder of images as source, not texture:woven"):
        generate("texture:woven", tmp_path / "out", count=2, seed=0, foreground=tmp_path)


def test_cli_takes_a_foreground(tmp_path: Path) -> None:
    result = runner.invoke(app, ["synth", "--help"])
    assert result.exit_code == 0 and "--foreground" in result.output
    args = ["synth", "--source", "texture:dots", "--out", str(tmp_path / "out"), "--count", "4"]
    result = runner.invoke(app, [*args, "--foreground", "all"])
    assert result.exit_code == 0, result.output
    assert marker(tmp_path / "out" / "dots")["foreground"] == "all"
    result = runner.invoke(app, [*args, "--foreground", str(tmp_path / "no-such-folder")])
    assert result.exit_code == 2 and "is neither auto, all nor an existing folder of masks" in result.output
