"""The trainer's data readers, sample loading, the DataLoader contract and the holdout split."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from trainer.datasets import (
    UNKNOWN_MASK_VALUE,
    BadSampleError,
    DatasetError,
    InspectionDataset,
    Sample,
    SkippedSample,
    collate_inspection,
    folder_name,
    human_name,
    load_sample,
    open_dataset,
    read_bgr8,
    read_mvtec,
    read_visa,
    split_holdout,
)

VOCABULARY = ["scratch", "broken large", "contamination", "hole"]


def write_png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def picture(seed: int, height: int = 40, width: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def blob_mask(height: int = 40, width: int = 40) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[10:20, 12:30] = 255
    return mask


@pytest.fixture
def mvtec_root(tmp_path: Path) -> Path:
    """Two classes; one defect image without a mask; junk files that must be ignored."""
    root = tmp_path / "mvtec"
    nut = root / "metal_nut"
    write_png(nut / "train/good/000.png", picture(1))
    write_png(nut / "train/good/001.png", picture(2))
    write_png(nut / "test/good/000.png", picture(3))
    write_png(nut / "test/broken_large/000.png", picture(4))
    write_png(nut / "test/broken_large/001.PNG", picture(5))  # upper-case extension, no mask
    write_png(nut / "ground_truth/broken_large/000_mask.png", blob_mask())
    write_png(root / "bottle/test/good/000.png", picture(6))
    write_png(root / "bottle/test/contamination/000.png", picture(7))
    write_png(root / "bottle/ground_truth/contamination/000_mask.png", blob_mask())
    (nut / "test/good/._000.png").write_bytes(b"macOS resource fork")
    (nut / "test/good/notes.txt").write_text("not an image")
    (root / "license.txt").write_text("CC BY-NC-SA")
    (root / "not_a_class").mkdir()
    return root


def test_read_mvtec_lists_test_split_with_masks_and_human_names(mvtec_root: Path) -> None:
    samples = read_mvtec(mvtec_root)
    assert [s.image_path.relative_to(mvtec_root).as_posix() for s in samples] == [
        "bottle/test/contamination/000.png",
        "bottle/test/good/000.png",
        "metal_nut/test/broken_large/000.png",
        "metal_nut/test/broken_large/001.PNG",
        "metal_nut/test/good/000.png",
    ]
    by_name = {s.image_path.relative_to(mvtec_root).as_posix(): s for s in samples}
    broken = by_name["metal_nut/test/broken_large/000.png"]
    assert broken == Sample(
        image_path=mvtec_root / "metal_nut/test/broken_large/000.png",
        mask_path=mvtec_root / "metal_nut/ground_truth/broken_large/000_mask.png",
        label=1,
        product_class="metal nut",
        defect_type="broken large",
        source="mvtec",
    )
    unmasked = by_name["metal_nut/test/broken_large/001.PNG"]
    assert (unmasked.label, unmasked.mask_path, unmasked.defect_type) == (1, None, "broken large")
    good = by_name["bottle/test/good/000.png"]
    assert (good.label, good.mask_path, good.defect_type, good.product_class) == (0, None, None, "bottle")


def test_read_mvtec_splits(mvtec_root: Path) -> None:
    train = read_mvtec(mvtec_root, split="train")
    assert len(train) == 2 and all(s.label == 0 and s.product_class == "metal nut" for s in train)
    assert len(read_mvtec(mvtec_root, split="all")) == 7
    with pytest.raises(ValueError, match="split"):
        read_mvtec(mvtec_root, split="validation")


def test_read_mvtec_accepts_a_single_class_folder(mvtec_root: Path) -> None:
    samples = read_mvtec(mvtec_root / "metal_nut", split="all")
    assert len(samples) == 5 and {s.product_class for s in samples} == {"metal nut"}


def test_image_level_only_set_has_no_masks(tmp_path: Path) -> None:
    root = tmp_path / "lines"
    write_png(root / "cable_tie/test/good/a.jpg", picture(1))
    write_png(root / "cable_tie/test/cut_end/b.bmp", picture(2))
    samples = read_mvtec(root)
    assert [(s.label, s.mask_path, s.defect_type) for s in samples] == [(1, None, "cut end"), (0, None, None)]
    loaded = load_sample(samples[0], 32)
    assert loaded.mask is None and loaded.image.shape == (32, 32, 3)
    assert not load_sample(samples[1], 32).mask.any()
    item = InspectionDataset(samples, 32, VOCABULARY)[0]
    assert torch.all(item["mask"] == UNKNOWN_MASK_VALUE) and item["label"].item() == 1
    assert item["defect_index"].item() == -1  # "cut end" is not in the vocabulary


def test_read_mvtec_missing_root_is_a_value_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a directory"):
        read_mvtec(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("folder", "human"),
    [
        ("metal_nut", "metal nut"),
        ("broken_large", "broken large"),
        ("pcb1", "pcb1"),
        ("pipe_fryum", "pipe fryum"),
    ],
)
def test_name_conversion(folder: str, human: str) -> None:
    assert human_name(folder) == human
    assert folder_name(human) == folder


VISA_CSV = """object,split,label,image,mask
pcb1,train,normal,pcb1/Data/Images/Normal/0000.JPG,
pcb1,test,normal,pcb1/Data/Images/Normal/0001.JPG,
pcb1,test,anomaly,pcb1/Data/Images/Anomaly/000.JPG,pcb1/Data/Masks/Anomaly/000.png
pipe_fryum,test,anomaly,pipe_fryum/Data/Images/Anomaly/010.JPG,pipe_fryum/Data/Masks/Anomaly/010.png
"""


@pytest.fixture
def visa_root(tmp_path: Path) -> Path:
    root = tmp_path / "VisA"
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv/1cls.csv").write_text(VISA_CSV)
    for line in VISA_CSV.splitlines()[1:]:
        _, _, _, image, mask = line.split(",")
        write_png(root / image, picture(len(image)))
        if mask:
            visa_mask = (blob_mask() > 0).astype(np.uint8) * 3  # VisA-style small non-zero ids
            write_png(root / mask, visa_mask)
    return root


def test_read_visa(visa_root: Path) -> None:
    samples = read_visa(visa_root)
    assert [(s.product_class, s.label, s.defect_type, s.source) for s in samples] == [
        ("pcb1", 1, None, "visa"),
        ("pcb1", 0, None, "visa"),
        ("pipe fryum", 1, None, "visa"),
    ]
    assert samples[0].mask_path == visa_root / "pcb1/Data/Masks/Anomaly/000.png"
    assert samples[1].mask_path is None
    mask = load_sample(samples[0], 40).mask
    assert mask is not None and set(np.unique(mask)) == {0.0, 1.0} and mask.sum() == 180
    assert len(read_visa(visa_root, split="train")) == 1
    assert len(read_visa(visa_root, split="all")) == 4


def test_read_visa_rejects_bad_csv(visa_root: Path) -> None:
    (visa_root / "split_csv/broken.csv").write_text("object,split,image\npcb1,test,x.png\n")
    with pytest.raises(DatasetError, match="missing column"):
        read_visa(visa_root, csv="split_csv/broken.csv")
    (visa_root / "split_csv/labels.csv").write_text("object,split,label,image,mask\npcb1,test,maybe,x.png,\n")
    with pytest.raises(DatasetError, match=r"labels.csv:2"):
        read_visa(visa_root, csv="split_csv/labels.csv")
    with pytest.raises(DatasetError, match="not found"):
        read_visa(visa_root, csv="split_csv/absent.csv")


def test_open_dataset_specs(mvtec_root: Path, visa_root: Path) -> None:
    assert len(open_dataset(f"mvtec:{mvtec_root}")) == 5
    assert len(open_dataset(f"mvtec:{mvtec_root}@all")) == 7
    assert len(open_dataset(f"MVTEC:{mvtec_root}@train")) == 2
    assert {s.source for s in open_dataset(f"synthetic:{mvtec_root}")} == {"synthetic"}
    assert len(open_dataset(f"visa:{visa_root}")) == 3
    assert len(open_dataset(f"visa:{visa_root / 'split_csv/1cls.csv'}@train")) == 1


def test_open_dataset_keeps_at_signs_in_paths(tmp_path: Path) -> None:
    root = tmp_path / "line@2"
    write_png(root / "gear/test/good/0.png", picture(0))
    assert len(open_dataset(f"mvtec:{root}")) == 1
    assert len(open_dataset(f"mvtec:{root}@test")) == 1


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("kolektor:/data", "unknown kind"),
        ("/data/mvtec", "expected KIND:PATH"),
        ("mvtec:", "expected KIND:PATH"),
        ("mvtec:/definitely/not/here", "does not exist"),
    ],
)
def test_open_dataset_rejects_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        open_dataset(spec)
    assert repr(spec) in str(info.value)


def test_open_dataset_rejects_an_empty_tree(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no test images"):
        open_dataset(f"mvtec:{tmp_path}")


# --------------------------------------------------------------------------- loading


def good_sample(path: Path, mask: Path | None = None, label: int = 0) -> Sample:
    return Sample(path, mask, label, "widget", "scratch" if label else None, "mvtec")


def test_load_sample_resizes_image_and_mask(tmp_path: Path) -> None:
    image = write_png(tmp_path / "a.png", picture(0, 60, 80))
    mask = write_png(tmp_path / "a_mask.png", blob_mask(60, 80))
    loaded = load_sample(good_sample(image, mask, label=1), 32)
    assert loaded.image.shape == (32, 32, 3) and loaded.image.dtype == np.uint8
    assert loaded.mask.shape == (32, 32) and loaded.mask.dtype == np.float32
    assert set(np.unique(loaded.mask)) == {0.0, 1.0}
    upscaled = load_sample(good_sample(image), 100)
    assert upscaled.image.shape == (100, 100, 3) and not upscaled.mask.any()


def test_16_bit_grayscale_and_alpha_images_load_as_bgr8(tmp_path: Path) -> None:
    ramp16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    sixteen = write_png(tmp_path / "deep.png", np.dstack([ramp16, ramp16 // 2, ramp16 // 4]))
    gray = write_png(tmp_path / "gray.png", picture(1)[:, :, 0])
    gray16 = write_png(tmp_path / "gray16.png", ramp16)
    rgba = write_png(tmp_path / "alpha.png", np.dstack([picture(2), np.zeros((40, 40), np.uint8)]))

    deep = read_bgr8(sixteen)
    assert deep.dtype == np.uint8 and deep.shape == (64, 64, 3)
    assert np.array_equal(deep[:, :, 0], np.round(ramp16 / 257).astype(np.uint8))
    flat = read_bgr8(gray)
    assert flat.shape == (40, 40, 3) and np.array_equal(flat[:, :, 0], flat[:, :, 2])
    assert read_bgr8(gray16).max() == round(ramp16.max() / 257)
    assert np.array_equal(read_bgr8(rgba), picture(2))
    for path in (sixteen, gray, gray16, rgba):
        assert load_sample(good_sample(path), 24).image.shape == (24, 24, 3)


def test_16_bit_mask_is_binarised(tmp_path: Path) -> None:
    image = write_png(tmp_path / "a.png", picture(0))
    mask = write_png(tmp_path / "m.png", blob_mask().astype(np.uint16) * 257)
    assert load_sample(good_sample(image, mask, 1), 40).mask.sum() == 180


def test_corrupt_image_raises_bad_sample_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(BadSampleError) as info:
        load_sample(good_sample(corrupt), 32)
    assert info.value.path == corrupt and "decod" in info.value.reason
    with pytest.raises(BadSampleError, match="cannot read image"):
        load_sample(good_sample(tmp_path / "missing.png"), 32)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadSampleError, match="empty"):
        load_sample(good_sample(tmp_path / "empty.png"), 32)


def test_unreadable_mask_raises_bad_sample_error(tmp_path: Path) -> None:
    image = write_png(tmp_path / "a.png", picture(0))
    (tmp_path / "a_mask.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(BadSampleError) as info:
        load_sample(good_sample(image, tmp_path / "a_mask.png", 1), 32)
    assert info.value.path == tmp_path / "a_mask.png" and "mask" in info.value.reason


def test_mask_of_wrong_size_raises_before_resizing(tmp_path: Path) -> None:
    image = write_png(tmp_path / "a.png", picture(0, 40, 40))
    mask = write_png(tmp_path / "a_mask.png", blob_mask(40, 48))
    with pytest.raises(BadSampleError, match=r"mask is 48x40 but its image a.png is 40x40") as info:
        load_sample(good_sample(image, mask, 1), 40)
    assert info.value.path == mask


def test_bad_sample_crosses_a_worker_process(tmp_path: Path) -> None:
    """A corrupt file read in a DataLoader worker process arrives in the main process as a named skip."""
    corrupt = tmp_path / "broken.png"
    corrupt.write_bytes(b"not an image")
    dataset = InspectionDataset([good_sample(corrupt, None, 0)], 32, VOCABULARY)
    loader = DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=collate_inspection)
    (batch,) = list(loader)
    assert len(batch["path"]) == 0
    assert [(s.path, s.reason) for s in batch["skipped"]] == [(str(corrupt), "image is not a decodable image")]


# --------------------------------------------------------------------------- dataset and collate


def test_dataset_items(mvtec_root: Path) -> None:
    dataset = InspectionDataset(read_mvtec(mvtec_root), 32, VOCABULARY)
    items = {Path(item["path"]).relative_to(mvtec_root).as_posix(): item for item in dataset}
    broken = items["metal_nut/test/broken_large/000.png"]
    assert broken["image"].shape == (3, 32, 32) and broken["image"].dtype == torch.uint8
    assert broken["mask"].shape == (1, 32, 32) and broken["mask"].dtype == torch.float32
    assert set(broken["mask"].unique().tolist()) == {0.0, 1.0}
    assert (broken["label"].item(), broken["defect_index"].item()) == (1, 1)
    assert broken["label"].dtype == torch.long and broken["defect_index"].dtype == torch.long
    assert (broken["class_name"], broken["bad"], broken["reason"]) == ("metal nut", False, "")
    good = items["bottle/test/good/000.png"]
    assert (good["label"].item(), good["defect_index"].item(), good["mask"].abs().sum().item()) == (
        0,
        -1,
        0.0,
    )
    assert items["bottle/test/contamination/000.png"]["defect_index"].item() == 2
    assert torch.all(items["metal_nut/test/broken_large/001.PNG"]["mask"] == -1)
    # the image stays BGR: the engine normalises
    expected = cv2.resize(picture(6), (32, 32), interpolation=cv2.INTER_AREA)  # shrinking
    assert np.array_equal(good["image"].permute(1, 2, 0).numpy(), expected)


def test_dataset_rejects_duplicate_vocabulary() -> None:
    with pytest.raises(ValueError, match="twice"):
        InspectionDataset([], 32, ["broken_large", "Broken Large"])


def test_corrupt_files_are_dropped_and_reported_by_collate(mvtec_root: Path) -> None:
    corrupt = mvtec_root / "bottle/test/good/001.png"
    corrupt.write_bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8).tobytes())
    bad_mask = mvtec_root / "bottle/ground_truth/contamination/000_mask.png"
    write_png(bad_mask, blob_mask(20, 20))  # wrong size for its 40x40 image
    dataset = InspectionDataset(read_mvtec(mvtec_root), 32, VOCABULARY)
    assert len(dataset) == 6

    item = dataset[[str(s.image_path) for s in dataset.samples].index(str(corrupt))]
    assert item["bad"] and "decod" in item["reason"] and item["image"].shape == (3, 32, 32)

    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_inspection)
    batches = list(loader)
    assert sum(b["image"].shape[0] for b in batches) == 4
    skipped = [s for b in batches for s in b["skipped"]]
    assert all(isinstance(s, SkippedSample) for s in skipped)
    assert sorted(Path(s.path).name for s in skipped) == ["000.png", "001.png"]
    reasons = {Path(s.path).parent.name: s.reason for s in skipped}
    assert "decod" in reasons["good"]
    assert reasons["contamination"].startswith("000_mask.png: mask is 20x20")
    for batch in batches:
        n = batch["image"].shape[0]
        assert batch["mask"].shape == (n, 1, 32, 32) and batch["label"].shape == (n,)
        assert len(batch["path"]) == len(batch["class_name"]) == n
        assert not set(batch["path"]) & {s.path for s in batch["skipped"]}


def test_collate_of_an_all_bad_batch_is_empty_but_reports(tmp_path: Path) -> None:
    dataset = InspectionDataset([good_sample(tmp_path / "gone.png")], 16, VOCABULARY)
    batch = collate_inspection([dataset[0]])
    assert batch["image"].shape == (0, 3, 16, 16) and batch["mask"].shape == (0, 1, 16, 16)
    assert batch["label"].shape == (0,) and batch["path"] == []
    assert batch["skipped"] == [SkippedSample(str(tmp_path / "gone.png"), batch["skipped"][0].reason)]
    assert "cannot read image" in batch["skipped"][0].reason


# --------------------------------------------------------------------------- holdout split


def catalogue(counts: dict[tuple[str, int], int]) -> list[Sample]:
    return [
        Sample(Path(f"/d/{cls}/{label}/{i:03d}.png"), None, label, cls, None, "mvtec")
        for (cls, label), n in counts.items()
        for i in range(n)
    ]


def test_split_holdout_is_stratified_and_deterministic() -> None:
    samples = catalogue({("nut", 0): 20, ("nut", 1): 10, ("screw", 0): 2, ("screw", 1): 1})
    train, val = split_holdout(samples, 0.2, seed=7)
    assert sorted(map(str, (s.image_path for s in train + val))) == sorted(str(s.image_path) for s in samples)

    def groups(part: list[Sample]) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for s in part:
            out[(s.product_class, s.label)] = out.get((s.product_class, s.label), 0) + 1
        return out

    assert groups(val) == {("nut", 0): 4, ("nut", 1): 2, ("screw", 0): 1}
    assert groups(train) == {("nut", 0): 16, ("nut", 1): 8, ("screw", 0): 1, ("screw", 1): 1}
    assert split_holdout(list(reversed(samples)), 0.2, seed=7) == (train, val)
    assert split_holdout(samples, 0.2, seed=8) != (train, val)
    assert split_holdout(samples, 0.0, seed=7) == (sorted(samples, key=lambda s: str(s.image_path)), [])
    with pytest.raises(ValueError):
        split_holdout(samples, 1.0, seed=7)


def test_split_holdout_does_not_reshuffle_other_classes() -> None:
    base = catalogue({("nut", 0): 12, ("nut", 1): 6})
    more = base + catalogue({("gear", 0): 9})
    _, val = split_holdout(base, 0.3, seed=1)
    _, val_more = split_holdout(more, 0.3, seed=1)
    assert [s for s in val_more if s.product_class == "nut"] == val


@settings(max_examples=40, deadline=None)
@given(
    counts=st.dictionaries(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 1)), st.integers(1, 30), min_size=1
    ),
    fraction=st.floats(0.01, 0.9),
    seed=st.integers(0, 2**32),
)
def test_split_holdout_properties(counts: dict[tuple[str, int], int], fraction: float, seed: int) -> None:
    samples = catalogue(counts)
    train, val = split_holdout(samples, fraction, seed)
    assert len(train) + len(val) == len(samples)
    assert {s.image_path for s in train}.isdisjoint(s.image_path for s in val)
    for key, n in counts.items():
        n_val = sum((s.product_class, s.label) == key for s in val)
        if n >= 2:
            assert 1 <= n_val <= n - 1  # both sides see every (class, label) that can be split
            assert abs(n_val - n * fraction) <= 0.5 + 1e-9 or n_val in (1, n - 1)
        else:
            assert n_val == 0
    assert split_holdout(samples, fraction, seed) == (train, val)
