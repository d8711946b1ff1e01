"""`genclip synth`'s data set writer: synthetic defects on good images, written as an MVTec-style class folder.

The defects themselves are drawn by `synthetic.defects` (exact masks, same seed same bytes);
this module picks the good images (a folder, or `texture:FAMILY` rendered by `synthetic.textures`),
decides where on each image defects may go (`trainer.foreground`) and writes the images, masks
and a marker file, replacing only folders it made itself.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from synthetic.defects import apply_defect
from synthetic.kinds import DEFECT_KINDS, normalise_kind
from synthetic.textures import FAMILIES, instance_seed, render_texture
from trainer.datasets import IMAGE_EXTENSIONS, BadSampleError, folder_name, human_name, read_bgr8
from trainer.foreground import ALL, AUTO, Foreground, ForegroundError, auto_foreground, mask_path, read_foreground_mask

TEXTURE_PREFIX = "texture:"
MARKER_FILE = ".genclip-synth.json"
"""Written into every class folder `generate` makes; only such folders are ever replaced."""


# --------------------------------------------------------------------------- data set generation


class SkippedSource(NamedTuple):
    path: str
    reason: str


@dataclass
class SynthSummary:
    """What `generate` wrote: counts per folder, the source images it could not read, and where defects went.

    `placed` counts defect images by the foreground they were drawn on ("auto": the estimated
    object, "mask": a given mask, "all": anywhere); `fallbacks` names the source images for which
    `auto` found no plausible object (so their defects went anywhere) and why.
    """

    class_dir: Path
    class_name: str
    good: int = 0
    train_good: int = 0
    defects: dict[str, int] = field(default_factory=dict)
    skipped: list[SkippedSource] = field(default_factory=list)
    foreground: str = AUTO
    placed: dict[str, int] = field(default_factory=dict)
    fallbacks: list[SkippedSource] = field(default_factory=list)

    @property
    def test_images(self) -> int:
        return self.good + sum(self.defects.values())


class NoGoodImagesError(ValueError):
    """The source held no readable image to put defects on."""


_Loader = tuple[str, Callable[[], np.ndarray]]


class _GoodImages:
    """Cycles through the source images in a fixed order, skipping (and recording) unreadable ones."""

    def __init__(self, items: list[_Loader], what: str) -> None:
        self.items, self.what = items, what
        self.position = 0
        self.bad: set[int] = set()
        self.skipped: list[SkippedSource] = []

    def next(self) -> tuple[str, np.ndarray]:
        while len(self.bad) < len(self.items):
            index = self.position % len(self.items)
            self.position += 1
            if index in self.bad:
                continue
            name, load = self.items[index]
            try:
                return name, load()
            except BadSampleError as exc:
                self.bad.add(index)
                self.skipped.append(SkippedSource(name, exc.reason))
        detail = f" ({len(self.skipped)} unreadable, e.g. {self.skipped[0].path}: {self.skipped[0].reason})"
        raise NoGoodImagesError(f"no readable images in {self.what}" + (detail if self.skipped else ""))


def list_images(source_dir: Path, exclude: Path | Sequence[Path] | None = None) -> list[Path]:
    """Image files under `source_dir` (recursive, hidden files and folders skipped, nor under `exclude`), sorted."""
    excluded = [exclude] if isinstance(exclude, Path) else list(exclude or [])
    excluded = [folder.resolve() for folder in excluded]
    found = []
    for path in source_dir.rglob("*"):
        relative = path.relative_to(source_dir)
        if any(part.startswith(".") for part in relative.parts) or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if any(path.resolve().is_relative_to(folder) for folder in excluded):
            continue  # never feed our own output (or the foreground masks) back in
        if path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: str(p.relative_to(source_dir)))


def _fit(image: np.ndarray, image_size: int | None) -> np.ndarray:
    if image_size is None or image.shape[:2] == (image_size, image_size):
        return image
    shrink = image.shape[0] > image_size or image.shape[1] > image_size
    return cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _sources(
    source: Path | str, needed: int, seed: int, image_size: int | None, exclude: list[Path]
) -> tuple[list[_Loader], str]:
    """Loaders for the good images (at their own size): files of a folder, or `texture:FAMILY` rendered on the fly."""
    text = str(source)
    if text.startswith(TEXTURE_PREFIX):
        family = text[len(TEXTURE_PREFIX) :]
        if family not in FAMILIES:
            raise ValueError(f"unknown texture family {family!r}; expected one of {', '.join(FAMILIES)}")
        size = image_size or 256
        loaders: list[_Loader] = [
            (f"{text}#{i}", partial(render_texture, family, instance_seed(seed, i), size)) for i in range(needed)
        ]
        return loaders, family
    source_dir = Path(source)
    if not source_dir.is_dir():
        raise NoGoodImagesError(f"source {source_dir} is not a directory")
    files = list_images(source_dir, exclude=exclude)
    order = np.random.default_rng([seed % (1 << 64), 0]).permutation(len(files))
    file_loaders: list[_Loader] = [(str(files[i]), partial(read_bgr8, files[i])) for i in order]
    return file_loaders, source_dir.resolve().name


class _Foregrounds:
    """The product's pixels in each source image, as `--foreground` asks: anywhere, estimated, or a mask file."""

    def __init__(self, option: str | Path, source: Path | str, names: list[str]) -> None:
        self.option = str(option)
        self.mask_dir: Path | None = None
        if self.option in (AUTO, ALL):
            return
        self.mask_dir = Path(option)
        if not self.mask_dir.is_dir():
            raise ForegroundError(f"foreground {self.option!r} is neither auto, all nor an existing folder of masks")
        if str(source).startswith(TEXTURE_PREFIX):
            raise ForegroundError(f"a folder of foreground masks needs a folder of images as source, not {source}")
        self.source_dir = Path(source)
        missing = [name for name in names if not self.path(name).is_file()]
        if missing:  # all of them up front, before minutes of work
            raise ForegroundError(
                f"foreground mask {self.path(missing[0])} for {missing[0]} does not exist "
                f"({len(missing)} of {len(names)} source images have no mask in {self.mask_dir})"
            )

    def path(self, name: str) -> Path:
        assert self.mask_dir is not None
        return mask_path(self.mask_dir, self.source_dir, Path(name))

    def get(self, name: str, raw: np.ndarray, image_size: int | None) -> tuple[np.ndarray, Foreground]:
        """The image as the data set gets it (resized to `image_size`) and its foreground at that size."""
        image = _fit(raw, image_size)
        if self.mask_dir is None:
            return image, (auto_foreground(image) if self.option == AUTO else Foreground(None, ALL))
        path = self.path(name)
        mask = read_foreground_mask(path, raw.shape)
        if image.shape[:2] != mask.shape:
            mask = cv2.resize(mask.astype(np.uint8), image.shape[1::-1], interpolation=cv2.INTER_NEAREST) > 0
            if not mask.any():
                raise ForegroundError(f"foreground mask {path} has no product pixel left at {image_size} px")
        return image, Foreground(mask, "mask", str(path))


def _write_png(path: Path, image: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path}")
    path.write_bytes(encoded.tobytes())


def _check_replaceable(class_dir: Path) -> None:
    occupied = class_dir.exists() and (not class_dir.is_dir() or any(class_dir.iterdir()))
    if occupied and not (class_dir / MARKER_FILE).is_file():
        raise FileExistsError(f"{class_dir} exists and was not made by `genclip synth`; choose another --out or class")


def generate(
    source_dir: Path | str,
    out_dir: Path | str,
    count: int,
    seed: int,
    kinds: Sequence[str] | None = None,
    class_name: str | None = None,
    good_fraction: float = 0.3,
    image_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    foreground: str | Path = AUTO,
) -> SynthSummary:
    """Write an MVTec-layout data set of `count` test images made from good images.

    `source_dir` is a folder of good images (searched recursively; it should hold no defective
    images or masks) or `texture:FAMILY` to render good surfaces of a `textures.FAMILIES` family
    (at `image_size`, default 256 px). Layout under `out_dir/<class>/`: `test/good/NNN.png`,
    `test/<kind>/NNN.png`, `ground_truth/<kind>/NNN_mask.png` (kind folders use `_` for spaces)
    and `train/good/NNN.png` (max(1, goods) other source images). `round(count * good_fraction)`
    test images are good; the rest cycle through `kinds` (default all). The class name defaults
    to the source folder's (or family's) name; `image_size` resizes to a square.

    `foreground` says where on an image defects may go: `auto` (default) estimates the object
    against a plain background (`trainer.foreground`) and uses the whole image when it finds no
    plausible one, as for full-frame textures; `all` is the whole image; a folder holds one binary
    mask per source image (non-zero = product), at the image's path relative to `source_dir` with
    a .png suffix. A missing, unreadable, empty or wrongly sized mask raises `ForegroundError`
    naming the file. The marker file records the foreground each defect image was drawn on.

    The class folder is built under a hidden temporary name and renamed into place when complete;
    an existing class folder is replaced only if `generate` made it. Same arguments, same bytes.
    Unreadable source images are skipped and listed in the summary; raises `NoGoodImagesError`
    when none is readable.
    """
    if count < 1:
        raise ValueError(f"count must be at least 1, not {count}")
    if not 0.0 <= good_fraction <= 1.0:
        raise ValueError(f"good_fraction must be in [0, 1], not {good_fraction}")
    chosen = [normalise_kind(k) for k in (kinds if kinds is not None else DEFECT_KINDS)]
    chosen = list(dict.fromkeys(chosen))
    n_good = round(count * good_fraction)
    n_defect = count - n_good
    if n_defect and not chosen:
        raise ValueError("no defect kinds to generate")
    n_train = max(1, n_good)
    out_dir = Path(out_dir)
    mask_dir = [Path(foreground)] if str(foreground) not in (AUTO, ALL) else []
    loaders, default_name = _sources(source_dir, n_good + n_train + n_defect, seed, image_size, [out_dir, *mask_dir])
    name = human_name(class_name or default_name)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad class name {name!r}")
    class_dir = out_dir / folder_name(name)
    _check_replaceable(class_dir)
    foregrounds = _Foregrounds(foreground, source_dir, [loader_name for loader_name, _ in loaders])
    goods = _GoodImages(loaders, str(source_dir))
    summary = SynthSummary(
        class_dir=class_dir, class_name=name, defects=dict.fromkeys(chosen, 0), foreground=foregrounds.option
    )
    samples: list[dict[str, object]] = []
    fell_back: dict[str, str] = {}
    total = n_good + n_train + n_defect
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{class_dir.name}.partial-", dir=out_dir))
    try:
        done = 0

        def advance() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                progress(done, total)

        for folder, n in (("test/good", n_good), ("train/good", n_train)):
            (staging / folder).mkdir(parents=True, exist_ok=True)
            for index in range(n):
                _write_png(staging / folder / f"{index:03d}.png", _fit(goods.next()[1], image_size))
                advance()
        summary.good, summary.train_good = n_good, n_train
        for index in range(n_defect):
            kind = chosen[index % len(chosen)]
            source_name, raw = goods.next()
            good, where = foregrounds.get(source_name, raw, image_size)
            rng = np.random.default_rng([seed % (1 << 64), 1, index])
            image, mask = apply_defect(good, kind, rng, where.mask)
            number = summary.defects[kind]
            for folder, file_name, pixels in (
                ("test", f"{number:03d}.png", image),
                ("ground_truth", f"{number:03d}_mask.png", mask),
            ):
                target = staging / folder / folder_name(kind)
                target.mkdir(parents=True, exist_ok=True)
                _write_png(target / file_name, pixels)
            summary.defects[kind] = number + 1
            summary.placed[where.used] = summary.placed.get(where.used, 0) + 1
            if where.used == ALL and where.detail:
                fell_back[source_name] = where.detail
            samples.append(_sample_record(f"test/{folder_name(kind)}/{number:03d}.png", source_name, source_dir, where))
            advance()
        summary.skipped = goods.skipped
        summary.fallbacks = [SkippedSource(path, reason) for path, reason in fell_back.items()]
        marker = {
            "class": name,
            "count": count,
            "seed": seed,
            "kinds": chosen,
            "source": str(source_dir),
            "foreground": foregrounds.option,
            "defect_images": samples,
        }
        (staging / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        _swap_into_place(staging, class_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _sample_record(image: str, source_name: str, source: Path | str, where: Foreground) -> dict[str, object]:
    """What the marker file says about one defect image: its source image and the foreground used on it."""
    if not str(source).startswith(TEXTURE_PREFIX):
        source_name = Path(source_name).relative_to(source).as_posix()
    record: dict[str, object] = {"image": image, "source": source_name, "foreground": where.used}
    record["foreground_share"] = round(where.share, 4)
    if where.detail:
        record["foreground_detail"] = where.detail
    return record


def _swap_into_place(staging: Path, class_dir: Path) -> None:
    _check_replaceable(class_dir)
    if not class_dir.exists():
        staging.rename(class_dir)
        return
    old = class_dir.with_name(f".{class_dir.name}.old-{os.getpid()}")
    class_dir.rename(old)
    staging.rename(class_dir)
    shutil.rmtree(old, ignore_errors=True)


def synth_command(
    source: Path,
    out: Path,
    count: int,
    seed: int,
    kinds: list[str] | None,
    class_name: str | None,
    foreground: str | Path = AUTO,
) -> int:
    """`genclip synth`: print progress every ~10 % and a summary; return the exit code.

    `source` is a folder of good images or `texture:FAMILY` (`woven`, `grain`, `metal`, `dots`,
    `tiles`, `leather`) to render good surfaces on the fly; `foreground` is `auto`, `all` or a
    folder of masks (see `generate`). Exit codes: 0 written, 1 the source has no readable image,
    2 bad arguments (unknown kind or family, count < 1, an --out class folder that `genclip synth`
    did not make, a missing or bad foreground mask).
    """
    last_tenth = -1

    def report(done: int, total: int) -> None:
        nonlocal last_tenth
        tenth = done * 10 // total
        if tenth != last_tenth:
            last_tenth = tenth
            print(f"synth: {done}/{total} images ({done * 100 // total}%)", flush=True)

    try:
        summary = generate(
            source, out, count, seed, kinds=kinds, class_name=class_name, progress=report, foreground=foreground
        )
    except NoGoodImagesError as exc:
        print(f"synth: {exc}")
        return 1
    except (ValueError, FileExistsError) as exc:
        print(f"synth: {exc}")
        return 2
    _report_foreground(summary)
    kinds_text = ", ".join(f"{kind} {n}" for kind, n in summary.defects.items())
    print(
        f"synth: wrote {summary.test_images} test images to {summary.class_dir} "
        f"({summary.good} good; {kinds_text}) and {summary.train_good} train goods"
    )
    if summary.skipped:
        print(f"synth: skipped {len(summary.skipped)} unreadable source image(s):")
        for skipped in summary.skipped[:20]:
            print(f"  {skipped.path}: {skipped.reason}")
        if len(summary.skipped) > 20:
            print(f"  ... and {len(summary.skipped) - 20} more")
    return 0


def _report_foreground(summary: SynthSummary) -> None:
    """Say where the defects went, so that defects on an object's background do not go unnoticed."""
    defects = sum(summary.placed.values())
    if not defects or summary.foreground == ALL:
        return
    if summary.foreground != AUTO:
        print(f"synth: foreground masks from {summary.foreground}: {defects} defect images on the product")
        return
    on_object = summary.placed.get(AUTO, 0)
    if not on_object:
        print(
            "synth: foreground auto: no object on a plain background in any source image, defects anywhere "
            "(right for full-frame surfaces; for an object, give --foreground a folder of masks)"
        )
        return
    print(f"synth: foreground auto: {on_object} of {defects} defect images on the object found in the image")
    if summary.fallbacks:
        print(
            f"synth: {defects - on_object} defect images anywhere: no plausible object in "
            f"{len(summary.fallbacks)} source image(s) (for those, give --foreground a folder of masks):"
        )
        for fallback in summary.fallbacks[:10]:
            print(f"  {fallback.path}: {fallback.reason.removeprefix('auto: ')}")
        if len(summary.fallbacks) > 10:
            print(f"  ... and {len(summary.fallbacks) - 10} more")
