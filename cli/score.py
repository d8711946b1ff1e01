"""`genclip score`: the engine from the command line.

`score` tries a line's config and prompts on saved images: one JSON line per image
on stdout (logs go to stderr, so stdout can be piped to `jq`), and optionally an
overlay PNG per image. Torch and OpenCV are imported inside the verb so that
`genclip config check` stays quick.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from agent.images import DEFAULT_MAX_PIXELS, UnreadableImageError, is_image_file, read_frame
from agent.logs import get_logger
from agent.results import defect_json
from cli.options import (
    ConfigOption,
    ProfilesOption,
    fail,
    load_for_verb,
    open_engine,
    set_thresholds,
    threshold_origin,
    with_profiles,
)

if TYPE_CHECKING:
    import numpy as np

    from agent.config import InspectConfig
    from model import Engine, FrameError, Prediction

log = get_logger("agent.score_command")  # the logger name in the log lines, as before the verb moved to cli/

CheckpointOption = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        help="Learned prompts (.safetensors from `genclip train`) to use instead of the line's: the newest checkpoint "
        "in [agent].prompt_dir, else [model].checkpoint, else untrained prompts.",
        show_default=False,
    ),
]

SCORE_HELP = """Score images with the engine: one JSON line per image on stdout.

IMAGE arguments are files or folders; a folder means the image files directly
inside it (png, jpg, jpeg, bmp, tif, tiff, any case), sorted by name, not its
sub-folders. Colour and grayscale, 8- and 16-bit images are read as they are
(an alpha channel is dropped).

Each line has: path, product_class, score, threshold, threshold_source
(option, config, calibration, stale-calibration or default), is_anomalous, defects
(type, type_probability, score, area_px, bbox as x, y, width, height in image
pixels: as the agent publishes them), prompt_version, and timing
(ms_per_image: the batch's time divided by its size, and batch_size); with
--out also overlay, the PNG written. An image that cannot be read gives a
line {"path": ..., "error": ...} and the others go on.

Prompts are the ones the line's agent starts with: the newest checkpoint in
[agent].prompt_dir (where the trainer publishes), else [model].checkpoint;
--checkpoint replaces them.

Thresholds come from --threshold (threshold_source option), else the
config's [thresholds] table (config), else the calibration in the class's
profile in --profiles (default [model].profile_dir; `genclip calibrate
--profiles` writes it) when it was made with these prompts and settings
(calibration), else [model].default_threshold (stale-calibration when the
profile's calibration does not hold for them, default when there is none).
The log line "threshold" on stderr names the profile file it came from.

Logs go to stderr. Exit status: 0 all scored, 1 some image failed, 2 bad
config, options or checkpoint.
"""


# --- inputs ------------------------------------------------------------------------------------------
def expand_inputs(arguments: list[Path]) -> list[Path]:
    """Files as given; folders replaced by their image files, sorted, not recursive.

    A folder without images stays in the list so that it is reported as a failed input
    instead of silently scoring nothing.
    """
    paths: list[Path] = []
    for argument in arguments:
        if argument.is_dir():
            inside = sorted(p for p in argument.iterdir() if is_image_file(p))
            paths.extend(inside or [argument])
        else:
            paths.append(argument)
    return paths


def overlay_paths(paths: list[Path], out_dir: Path) -> list[Path]:
    """`<stem>_overlay.png` per input, in `out_dir`; repeated stems get -2, -3, ... so none overwrites another.

    Repeats happen with the same file name in two folders, or `a.png` beside `a.jpg`.
    Names are compared without case, for case-insensitive file systems.
    """
    taken: set[str] = set()
    targets = []
    for path in paths:
        stem = path.stem or "image"
        name, count = f"{stem}_overlay.png", 1
        while name.lower() in taken:
            count += 1
            name = f"{stem}-{count}_overlay.png"
        taken.add(name.lower())
        targets.append(out_dir / name)
    return targets


def read_in_batches(
    paths: list[Path], batch_size: int, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Iterator[list[tuple[int, np.ndarray | str]]]:
    """Groups of (input index, frame or error) holding at most `batch_size` frames, in input order.

    Reading lazily keeps memory to one batch of images whatever the number of inputs; an image
    over `max_pixels` is refused from its header, undecoded.
    """
    group: list[tuple[int, np.ndarray | str]] = []
    frames = 0
    for index, path in enumerate(paths):
        try:
            group.append((index, read_frame(path, max_pixels)))
            frames += 1
        except UnreadableImageError as exc:
            group.append((index, str(exc)))
        if frames == batch_size:
            yield group
            group, frames = [], 0
    if group:
        yield group


# --- output records ----------------------------------------------------------------------------------
def finite(value: float) -> float | None:
    """JSON has no NaN or infinity; such values (no defect-type probability) become null."""
    return float(value) if math.isfinite(value) else None


def prediction_record(path: Path, prediction: Prediction, batch_ms: float, batch_size: int) -> dict[str, Any]:
    """One stdout line for a scored image."""
    return {
        "path": str(path),
        "product_class": prediction.product_class,
        "score": finite(prediction.score),
        "threshold": finite(prediction.threshold),
        "threshold_source": prediction.threshold_source,
        "is_anomalous": bool(prediction.is_anomalous),
        "defects": [defect_json(d) for d in prediction.defects],
        "prompt_version": prediction.prompt_version,
        "timing": {"ms_per_image": round(batch_ms / batch_size, 3), "batch_size": batch_size},
    }


def error_record(path: Path, error: str) -> dict[str, Any]:
    """One stdout line for an image that could not be scored."""
    return {"path": str(path), "error": error}


def emit(record: dict[str, Any]) -> None:
    typer.echo(json.dumps(record, allow_nan=False))


# --- score ------------------------------------------------------------------------------------------------
def run_score(
    cfg: InspectConfig,
    arguments: list[Path],
    product_class: str,
    checkpoint: Path | None,
    out_dir: Path | None,
    batch_size: int | None,
    threshold: float | None,
    profiles: Path | None = None,
) -> int:
    """Score every input, print its line, write its overlay; returns how many inputs failed."""
    product_class = product_class.strip()
    if not product_class:
        fail("--class must not be empty")
    paths = expand_inputs(arguments)
    targets = None
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            fail(f"--out: cannot create folder {out_dir}: {exc.strerror}")
        targets = overlay_paths(paths, out_dir)
    batch_size = batch_size or cfg.engine.batch_size
    model = with_profiles(cfg.model, profiles)
    engine = open_engine(model, checkpoint, batch_size, prompt_dir=cfg.agent.prompt_dir)
    set_thresholds(engine, cfg.thresholds, threshold, [product_class])
    try:
        engine.classes.setup(product_class, save=False)  # the line's class profile, when it has one
    except ValueError as exc:
        fail(f"--class: {exc}")
    log.info("threshold", product_class=product_class, **threshold_origin(engine, product_class))
    if engine.device.type == "cuda":  # so the first batch's timing is not CUDA start-up
        engine.warmup()
    failed = 0
    for group in read_in_batches(paths, batch_size, cfg.model.max_frame_pixels):
        failed += score_group(engine, group, paths, product_class, targets)
    log.info("done", inputs=len(paths), failed=failed, prompt_version=engine.prompt_version)
    return failed


def predict_batch(engine: Engine, frames: list[np.ndarray], product_class: str) -> list[Prediction | FrameError] | str:
    """One result per frame, or why the whole batch failed (a device error), so the run goes on."""
    if not frames:
        return []
    try:
        return engine.predict(frames, [product_class] * len(frames))
    except RuntimeError as exc:
        log.exception("batch failed", images=len(frames))
        return f"scoring failed: {exc}"


def score_group(
    engine: Engine,
    group: list[tuple[int, np.ndarray | str]],
    paths: list[Path],
    product_class: str,
    targets: list[Path] | None,
) -> int:
    """Score one batch, print a line per input in input order, write overlays; returns how many failed."""
    frames = [(index, item) for index, item in group if not isinstance(item, str)]
    outcome = predict_batch(engine, [frame for _, frame in frames], product_class)
    batch_ms = engine.stats.last_batch_ms
    predictions = {} if isinstance(outcome, str) else dict(zip([i for i, _ in frames], outcome, strict=True))
    failed = 0
    for index, item in group:
        path = paths[index]
        error = item if isinstance(item, str) else outcome if isinstance(outcome, str) else None
        if error is None and not predictions[index].ok:
            error = predictions[index].reason
        if error is not None:
            failed += 1
            log.warning("image not scored", path=str(path), error=error)
            emit(error_record(path, error))
            continue
        assert not isinstance(item, str)  # an unread image is an error, handled above
        prediction = predictions[index]
        record = prediction_record(path, prediction, batch_ms, len(frames))
        if targets is not None and not write_overlay(item, prediction, targets[index], record):
            failed += 1
        emit(record)
    return failed


def write_overlay(frame: np.ndarray, prediction: Prediction, target: Path, record: dict[str, Any]) -> bool:
    """Draw and save one overlay; notes the file (or the problem) in the image's record."""
    import cv2

    from agent.overlay import draw_overlay

    try:
        written, reason = cv2.imwrite(str(target), draw_overlay(frame, prediction)), "cv2.imwrite failed"
    except cv2.error as exc:
        written, reason = False, str(exc).strip()
    if written:
        record["overlay"] = str(target)
    else:
        record["overlay_error"] = f"cannot write {target}: {reason}"
    return bool(written)


# --- the verb ---------------------------------------------------------------------------------------------
def score(
    images: Annotated[
        list[Path], typer.Argument(metavar="IMAGE", help="Image files or folders of images.", show_default=False)
    ],
    product_class: Annotated[
        str, typer.Option("--class", help="Product class of every image, e.g. 'bottle'.", show_default=False)
    ],
    checkpoint: CheckpointOption = None,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for overlay PNGs <stem>_overlay.png (heat map, defect boxes, verdict), "
            "image-sized; a repeated stem gets <stem>-2_overlay.png.",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", min=1, max=1024, help="Images per batch; default: [engine].batch_size."),
    ] = None,
    threshold: Annotated[
        float | None,
        typer.Option(
            "--threshold",
            min=0.0,
            max=1.0,
            help="Image-score threshold for this class, over [thresholds] and its calibration.",
        ),
    ] = None,
    profiles: ProfilesOption = None,
) -> None:
    cfg = load_for_verb(config)
    failed = run_score(cfg, images, product_class, checkpoint, out, batch_size, threshold, profiles)
    raise typer.Exit(1 if failed else 0)
