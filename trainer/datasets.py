"""The trainer's data side: index data sets quickly, load samples safely, split them reproducibly.

Readers only list files (no pixels are decoded), so opening a 10 000-image data set is instant
and every problem with a single file surfaces later, per sample, as a `BadSampleError` that the
training loop can count and name instead of crashing a DataLoader worker.

Conventions shared with the training loop:

* images are uint8 BGR (OpenCV order); the engine normalises them later;
* masks are float32 {0, 1}; an anomalous sample whose defect region is unknown (image-level-only
  data sets, or a missing mask file) has no mask at all: `load_sample` returns `mask=None` and
  `InspectionDataset` yields a mask filled with -1 ("unknown") so the pixel loss can skip it.
"""

from __future__ import annotations

import csv as csv_module
import os
import re
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from model.image_files import IMAGE_EXTENSIONS, ImageReadError, decode_image
from trainer.config import DATASET_KINDS, SPLITS

UNKNOWN_MASK_VALUE = -1.0
"""Mask fill value for an anomalous sample without a mask: the pixel loss must ignore it."""


class DatasetError(ValueError):
    """A data set's layout is wrong (missing root, malformed CSV, bad spec)."""


class BadSampleError(Exception):
    """One sample cannot be used; `path` is the offending file (image or mask)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = Path(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class Sample:
    """One image of a data set, indexed but not loaded."""

    image_path: Path
    mask_path: Path | None
    label: int  # 0 good, 1 anomalous
    product_class: str  # human name: "metal nut"
    defect_type: str | None  # human name: "broken large"; None for good or when the set has none
    source: str  # data set kind: "mvtec", "visa", "synthetic"


@dataclass(frozen=True)
class LoadedSample:
    """Pixels of a sample at training resolution."""

    sample: Sample
    image: np.ndarray  # uint8 [S, S, 3] BGR
    mask: np.ndarray | None  # float32 [S, S] in {0, 1}; None = anomalous with unknown region


def human_name(folder: str) -> str:
    """Folder names use `_` for spaces (`metal_nut`); prompts want `metal nut`."""
    return " ".join(folder.replace("_", " ").split())


def folder_name(name: str) -> str:
    """Inverse of `human_name`: the folder a class or defect type is written to."""
    return "_".join(name.split())


def _by_path(sample: Sample) -> str:
    return str(sample.image_path)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_names(split: str) -> tuple[str, ...]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    return ("train", "test") if split == "all" else (split,)


# --------------------------------------------------------------------------- readers


def _mask_index(gt_dir: Path) -> dict[str, Path]:
    """Lower-cased file name -> path for one ground_truth/<defect> folder (one listdir, not N stats)."""
    if not gt_dir.is_dir():
        return {}
    return {p.name.lower(): p for p in gt_dir.iterdir() if _is_image(p)}


def _find_mask(stem: str, index: dict[str, Path]) -> Path | None:
    """MVTec names masks `<stem>_mask.png`; some derived sets reuse the image name."""
    stem = stem.lower()
    for candidate in (f"{stem}_mask.png", *(f"{stem}_mask{e}" for e in sorted(IMAGE_EXTENSIONS))):
        if candidate in index:
            return index[candidate]
    for ext in sorted(IMAGE_EXTENSIONS):
        if f"{stem}{ext}" in index:
            return index[f"{stem}{ext}"]
    return None


def _mvtec_class_dirs(root: Path) -> list[Path]:
    if any((root / s).is_dir() for s in ("train", "test")):
        return [root]  # the root is a single class folder
    return [d for d in _subdirs(root) if any((d / s).is_dir() for s in ("train", "test"))]


def read_mvtec(root: Path | str, split: str = "test", source: str = "mvtec") -> list[Sample]:
    """Index an MVTec-AD-style tree: `<root>/<class>/{train,test}/<good|defect>/*.png`.

    Masks come from `<root>/<class>/ground_truth/<defect>/<stem>_mask.png`. A tree without
    `ground_truth/` (an image-level-only set) or an anomalous image without a mask file gives
    `mask_path=None`; the label stays 1. `root` may also be a single class folder (one that has
    `train/` or `test/` itself). `split` is "train", "test" or "all". Sorted by image path.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"MVTec root {root} is not a directory")
    splits = _split_names(split)
    samples: list[Sample] = []
    for class_dir in _mvtec_class_dirs(root):
        product = human_name(class_dir.name)
        for split_name in splits:
            split_dir = class_dir / split_name
            if not split_dir.is_dir():
                continue
            for kind_dir in _subdirs(split_dir):
                good = kind_dir.name.lower() == "good"
                masks = {} if good else _mask_index(class_dir / "ground_truth" / kind_dir.name)
                for image in sorted(p for p in kind_dir.iterdir() if _is_image(p)):
                    samples.append(
                        Sample(
                            image_path=image,
                            mask_path=None if good else _find_mask(image.stem, masks),
                            label=0 if good else 1,
                            product_class=product,
                            defect_type=None if good else human_name(kind_dir.name),
                            source=source,
                        )
                    )
    return sorted(samples, key=_by_path)


_VISA_COLUMNS = ("object", "split", "label", "image", "mask")
_GOOD_LABELS = frozenset({"normal", "good", "ok", "0"})
_BAD_LABELS = frozenset({"anomaly", "anomalous", "bad", "defect", "1"})


def read_visa(root: Path | str, csv: str = "split_csv/1cls.csv", split: str = "test") -> list[Sample]:
    """Index a VisA tree through its split CSV (`object,split,label,image,mask`, paths relative to root).

    `label` is `normal` or `anomaly`; `mask` is empty for normal images. VisA has no defect types,
    so `defect_type` is None. Files are not checked here: a missing one becomes a `BadSampleError`
    when the sample is loaded.
    """
    root = Path(root)
    csv_path = root / csv
    splits = _split_names(split)
    if not csv_path.is_file():
        raise DatasetError(f"VisA split file {csv_path} not found")
    samples: list[Sample] = []
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv_module.DictReader(handle)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        missing = [c for c in _VISA_COLUMNS if c not in columns]
        if missing:
            raise DatasetError(f"{csv_path}: missing column(s) {', '.join(missing)}")
        reader.fieldnames = columns
        for line, row in enumerate(reader, start=2):
            if (row["split"] or "").strip().lower() not in splits:
                continue
            label_text = (row["label"] or "").strip().lower()
            if label_text not in _GOOD_LABELS | _BAD_LABELS:
                raise DatasetError(f"{csv_path}:{line}: label {row['label']!r} is neither normal nor anomaly")
            mask = (row["mask"] or "").strip()
            samples.append(
                Sample(
                    image_path=root / row["image"].strip(),
                    mask_path=root / mask if mask else None,
                    label=0 if label_text in _GOOD_LABELS else 1,
                    product_class=human_name(row["object"].strip()),
                    defect_type=None,
                    source="visa",
                )
            )
    return sorted(samples, key=_by_path)


def open_dataset(spec: str) -> list[Sample]:
    """Open a data set from a command-line spec: `KIND:PATH` or `KIND:PATH@SPLIT`.

    KIND is `mvtec`, `visa` or `synthetic` (what `genclip synth` writes: the MVTec layout).
    SPLIT is `train`, `test` (the default) or `all`. For `visa`, PATH is the data set root
    (its `split_csv/1cls.csv` is used) or a split CSV itself, e.g.
    `visa:/data/VisA/split_csv/2cls_highshot.csv@train`; paths inside a CSV are relative to
    the root, which is the CSV's grandparent when the CSV sits in `split_csv/`, else its folder.
    Examples: `mvtec:/data/mvtec`, `mvtec:/data/mvtec/bottle@all`, `synthetic:out/synth`.
    Raises `ValueError` (a `DatasetError`) naming the spec when it is malformed, the path is
    missing, or nothing is found there.
    """
    kind, sep, rest = spec.partition(":")
    kind = kind.strip().lower()
    if not sep or not rest:
        raise DatasetError(f"data set spec {spec!r}: expected KIND:PATH[@SPLIT] with KIND in {DATASET_KINDS}")
    if kind not in DATASET_KINDS:
        raise DatasetError(f"data set spec {spec!r}: unknown kind {kind!r}, expected one of {DATASET_KINDS}")
    split = "test"
    path_text, at, maybe_split = rest.rpartition("@")
    if at and maybe_split.strip().lower() in SPLITS:
        split = maybe_split.strip().lower()
    else:
        path_text = rest  # no split suffix (an '@' inside the path is kept)
    path = Path(os.path.expanduser(path_text))
    if not path.exists():
        before = Path(os.path.expanduser(rest.rpartition("@")[0]))
        if at and "/" not in maybe_split and before.exists():
            raise DatasetError(
                f"data set spec {spec!r}: unknown split {maybe_split!r}; allowed splits: {', '.join(SPLITS)}"
            )
        raise DatasetError(f"data set spec {spec!r}: path {path} does not exist")
    if kind == "visa":
        if path.is_file():
            root = path.parent.parent if path.parent.name == "split_csv" else path.parent
            samples = read_visa(root, csv=str(path.relative_to(root)), split=split)
        else:
            samples = read_visa(path, split=split)
    else:
        samples = read_mvtec(path, split=split, source=kind)
    if not samples:
        raise DatasetError(f"data set spec {spec!r}: no {split} images found under {path}")
    return samples


# --------------------------------------------------------------------------- loading


def _read_raw(path: Path, what: str) -> np.ndarray:
    try:
        return decode_image(path, what)
    except ImageReadError as exc:
        raise BadSampleError(path, exc.reason) from None


def _to_uint8(pixels: np.ndarray, path: Path) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        return np.round(pixels / 257.0).astype(np.uint8)
    if pixels.dtype in (np.float32, np.float64):  # float TIFFs are taken to be in [0, 1]
        return np.round(np.clip(np.nan_to_num(pixels), 0.0, 1.0) * 255.0).astype(np.uint8)
    raise BadSampleError(path, f"unsupported pixel type {pixels.dtype}")


def read_bgr8(path: Path | str) -> np.ndarray:
    """Read an image as uint8 HxWx3 BGR whatever it was: 16-bit -> /257, gray -> 3 channels, alpha dropped."""
    path = Path(path)
    pixels = _to_uint8(_read_raw(path, "image"), path)
    if pixels.ndim == 3 and pixels.shape[2] in (1, 2):  # gray or gray+alpha
        pixels = pixels[:, :, 0]
    if pixels.ndim == 2:
        return cv2.cvtColor(pixels, cv2.COLOR_GRAY2BGR)
    if pixels.ndim == 3 and pixels.shape[2] == 3:
        return pixels
    if pixels.ndim == 3 and pixels.shape[2] == 4:
        return np.ascontiguousarray(pixels[:, :, :3])
    raise BadSampleError(path, f"unsupported image shape {pixels.shape}")


def _read_mask(path: Path) -> np.ndarray:
    """Any non-zero value is defect (VisA masks use small instance ids, MVTec uses 255)."""
    pixels = _read_raw(path, "mask")
    if pixels.ndim == 3:
        pixels = pixels[:, :, : min(3, pixels.shape[2])].max(axis=2)
    return (pixels > 0).astype(np.float32)


def _resize(image: np.ndarray, size: int, interpolation: int | None = None) -> np.ndarray:
    height, width = image.shape[:2]
    if (height, width) == (size, size):
        return image
    if interpolation is None:
        interpolation = cv2.INTER_AREA if height > size or width > size else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interpolation)


def load_sample(sample: Sample, image_size: int) -> LoadedSample:
    """Read a sample's pixels at `image_size` x `image_size`.

    The mask size is checked against the image before anything is resized, so a mask that
    belongs to another image is caught. Good samples without a mask get an all-zero mask;
    anomalous samples without one get `mask=None` (region unknown).
    Raises `BadSampleError` for an unreadable image or mask, or mismatched sizes.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be positive, not {image_size}")
    image = read_bgr8(sample.image_path)
    mask: np.ndarray | None
    if sample.mask_path is not None:
        full_mask = _read_mask(sample.mask_path)
        if full_mask.shape[:2] != image.shape[:2]:
            raise BadSampleError(
                sample.mask_path,
                f"mask is {full_mask.shape[1]}x{full_mask.shape[0]} but its image "
                f"{sample.image_path.name} is {image.shape[1]}x{image.shape[0]}",
            )
        mask = _resize(full_mask, image_size, cv2.INTER_NEAREST)
    elif sample.label == 0:
        mask = np.zeros((image_size, image_size), np.float32)
    else:
        mask = None
    return LoadedSample(sample=sample, image=_resize(image, image_size), mask=mask)


# --------------------------------------------------------------------------- torch wrapper


class SkippedSample(NamedTuple):
    """A sample the collate function dropped: log it as `skipped {path}: {reason}`."""

    path: str
    reason: str


def _vocabulary_key(name: str) -> str:
    return " ".join(re.split(r"[\s_]+", name.strip().lower())).strip()


class InspectionDataset(Dataset):
    """Samples as dicts of tensors for a DataLoader; bad files become flagged items, never exceptions.

    Each item has:
      image         uint8 [3, S, S], BGR (the engine normalises)
      mask          float32 [1, S, S]: 1 defect, 0 good; all -1 (`UNKNOWN_MASK_VALUE`) for an
                    anomalous sample whose region is unknown, so the pixel loss must skip it
      label         int64 scalar, 0 good / 1 anomalous
      defect_index  int64 scalar, index into `defect_vocabulary`; -1 for good samples and for
                    defect types that are unknown or not in the vocabulary (use ignore_index=-1)
      class_name    str, human product class ("metal nut")
      path          str, the image path
      bad           bool; when True the tensors are zeros and `reason` says why (use
                    `collate_inspection` to drop such items and report them)
      reason        str, "" for a good item
    """

    def __init__(self, samples: Sequence[Sample], image_size: int, defect_vocabulary: Sequence[str]) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, not {image_size}")
        self.samples = list(samples)
        self.image_size = image_size
        self.defect_vocabulary = list(defect_vocabulary)
        self._defect_ids: dict[str, int] = {}
        for index, name in enumerate(self.defect_vocabulary):
            key = _vocabulary_key(name)
            if key in self._defect_ids:
                raise ValueError(f"defect vocabulary lists {name!r} twice")
            self._defect_ids[key] = index

    def __len__(self) -> int:
        return len(self.samples)

    def defect_index(self, sample: Sample) -> int:
        """Vocabulary index of a sample's defect type (case, `_` and spacing ignored), -1 if none."""
        if sample.label == 0 or sample.defect_type is None:
            return -1
        return self._defect_ids.get(_vocabulary_key(sample.defect_type), -1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.samples[index]
        size = self.image_size
        item: dict[str, Any] = {
            "label": torch.tensor(sample.label, dtype=torch.long),
            "defect_index": torch.tensor(self.defect_index(sample), dtype=torch.long),
            "class_name": sample.product_class,
            "path": str(sample.image_path),
        }
        try:
            loaded = load_sample(sample, size)
        except BadSampleError as exc:
            reason = exc.reason if exc.path == sample.image_path else f"{exc.path.name}: {exc.reason}"
            item.update(
                image=torch.zeros((3, size, size), dtype=torch.uint8),
                mask=torch.zeros((1, size, size), dtype=torch.float32),
                bad=True,
                reason=reason,
            )
            return item
        if loaded.mask is None:
            mask = torch.full((1, size, size), UNKNOWN_MASK_VALUE, dtype=torch.float32)
        else:
            mask = torch.from_numpy(np.ascontiguousarray(loaded.mask))[None]
        image = torch.from_numpy(np.ascontiguousarray(loaded.image.transpose(2, 0, 1)))
        item.update(image=image, mask=mask, bad=False, reason="")
        return item


def collate_inspection(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader `collate_fn`: stack the usable items, drop bad ones and list them in `skipped`.

    Returns image [B,3,S,S] uint8, mask [B,1,S,S], label [B], defect_index [B], class_name and
    path (lists of B str), and skipped: list[SkippedSample]. B may be 0 when every item of the
    batch was bad (the tensors then have a leading 0 dimension): skip the step but still log and
    count `skipped`.
    """
    good = [item for item in items if not item.get("bad", False)]
    skipped = [SkippedSample(item["path"], item["reason"]) for item in items if item.get("bad", False)]
    if good:
        image = torch.stack([item["image"] for item in good])
        mask = torch.stack([item["mask"] for item in good])
    else:
        shape = tuple(items[0]["image"].shape[1:]) if items else (0, 0)
        image = torch.zeros((0, 3, *shape), dtype=torch.uint8)
        mask = torch.zeros((0, 1, *shape), dtype=torch.float32)
    return {
        "image": image,
        "mask": mask,
        "label": torch.stack([item["label"] for item in good]) if good else torch.zeros(0, dtype=torch.long),
        "defect_index": (
            torch.stack([item["defect_index"] for item in good]) if good else torch.zeros(0, dtype=torch.long)
        ),
        "class_name": [item["class_name"] for item in good],
        "path": [item["path"] for item in good],
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- splitting


def split_holdout(samples: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Hold out `fraction` of each (product_class, label) group for validation.

    Stratified so validation sees goods and defects of every class: a group with at least two
    samples always gives one to each side when `fraction > 0`. Deterministic for a seed and
    independent of the input order and of the other groups (adding a class does not reshuffle
    the others). Returns (train, val), each sorted by image path.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), not {fraction}")
    groups: dict[tuple[str, int], list[Sample]] = defaultdict(list)
    for sample in samples:
        groups[(sample.product_class, sample.label)].append(sample)
    train: list[Sample] = []
    val: list[Sample] = []
    for (product, label), members in sorted(groups.items()):
        members.sort(key=lambda s: (str(s.image_path), str(s.mask_path)))
        n = len(members)
        n_val = 0
        if fraction > 0 and n >= 2:
            n_val = min(max(round(n * fraction), 1), n - 1)
        rng = np.random.default_rng([seed % (1 << 64), zlib.crc32(f"{product}\0{label}".encode())])
        order = rng.permutation(n)
        val.extend(members[i] for i in order[:n_val])
        train.extend(members[i] for i in order[n_val:])
    return sorted(train, key=_by_path), sorted(val, key=_by_path)
