"""`genclip export onnx`: the engine's image path for some classes as an ONNX graph, checked against torch.

Torch and ONNX are imported inside the verb so that `genclip config check` stays quick.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from agent.images import DEFAULT_MAX_PIXELS, UnreadableImageError, is_image_file, read_frame
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
from cli.score import CheckpointOption, emit, finite, log

if TYPE_CHECKING:
    import numpy as np

    from agent.config import InspectConfig

ONNX_TOLERANCE = 1e-3
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")  # the 'export' extra

EXPORT_ONNX_HELP = """Export the image path for some product classes as an ONNX graph, checked against torch.

The graph takes RGB images in [0, 1] already resized to [model].image_size
(N x 3 x S x S) and a class index per image (the position in --classes), and
returns image scores (N) and anomaly maps (N x S x S). Prompts are folded in.

With --reference DIR, the images of good parts in DIR/<class>/ decide each
class word (class name filtering; at least [model].min_reference_images, at
most 64 are used) and calibrate its threshold. Otherwise the class's profile
in --profiles (default [model].profile_dir; `genclip calibrate --profiles`
writes it) is used, or the class name as given. Thresholds as `genclip score`
decides them: [thresholds], else the calibration, else the default. Prompts:
--checkpoint, else the newest checkpoint in [agent].prompt_dir, else
[model].checkpoint (as the agent starts).

The model's metadata properties (genclip.*) hold what running it needs: the
classes in class-index order, their thresholds and where each came from,
image size and resize, normalisation, prompt version, backbone, inputs and
outputs (docs/engine.md has an onnxruntime example).

Prints one JSON line with each class's threshold and its source, and the
largest differences between onnxruntime and torch on random input; exits 1 if
either is above 1e-3, and then writes no file (the graph is moved to --out
only once it has passed). Needs the 'export' extra (onnx, onnxscript,
onnxruntime).
"""

export_app = typer.Typer(no_args_is_help=True)


def reference_frames(folder: Path, limit: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
    """Up to `limit` readable images from `folder` (sorted), for the class-name decision."""
    frames: list[np.ndarray] = []
    for path in sorted(p for p in folder.iterdir() if is_image_file(p)):
        if len(frames) == limit:
            break
        try:
            frames.append(read_frame(path, max_pixels))
        except UnreadableImageError as exc:
            log.warning("reference image skipped", path=str(path), error=str(exc))
    return frames


def run_export_onnx(
    cfg: InspectConfig,
    classes: list[str],
    out: Path,
    checkpoint: Path | None,
    reference: Path | None,
    profiles: Path | None = None,
) -> bool:
    """Export, check against torch, print the result line; True when within tolerance (only then is `out` written)."""
    missing = [name for name in ONNX_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        fail(f"export onnx needs {', '.join(missing)}: pip install -e '.[export]'")
    if reference is not None and not reference.is_dir():
        fail(f"--reference: folder not found: {reference}")
    from model import ClassSetupError
    from model.export import export_checked

    model = with_profiles(cfg.model, profiles)
    engine = open_engine(model, checkpoint, cfg.engine.batch_size, prompt_dir=cfg.agent.prompt_dir)
    set_thresholds(engine, cfg.thresholds, None, classes)
    for name in classes:
        folder = reference / name if reference is not None else None
        frames = []
        if folder is not None and folder.is_dir():
            frames = reference_frames(folder, 64, cfg.model.max_frame_pixels)
        try:
            profile = engine.classes.setup(name, frames, save=False)
        except ClassSetupError as exc:
            fail(str(exc))
        log.info("class registered", product_class=name, images=len(frames), class_word=profile.class_word)
    with contextlib.redirect_stdout(sys.stderr):  # torch.onnx prints progress; stdout is for the result
        diffs, ok = export_checked(engine, classes, out, ONNX_TOLERANCE)
    used = {name: engine.classes.status(name).class_word for name in classes}
    thresholds = {name: threshold_origin(engine, name) for name in classes}
    result = {name: finite(value) for name, value in diffs.items()}
    emit(
        {
            "path": str(out),
            "classes": classes,
            "used_names": used,
            "thresholds": thresholds,
            **result,
            "tolerance": ONNX_TOLERANCE,
            "ok": ok,
        }
    )
    if not ok:
        log.error("ONNX output differs from torch; nothing written", path=str(out), tolerance=ONNX_TOLERANCE, **diffs)
    return ok


def parse_classes(text: str | None, cfg: InspectConfig) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c'] (duplicates dropped, order kept); none given -> the cameras' classes."""
    names = [n.strip() for n in text.split(",")] if text is not None else cfg.product_classes()
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        fail("no product classes: give --classes a,b,c (or cameras in the config)")
    return names


@export_app.command("onnx", help=EXPORT_ONNX_HELP)
def onnx(
    out: Annotated[Path, typer.Option("--out", help="ONNX file to write.", show_default=False)],
    classes: Annotated[
        str | None,
        typer.Option(
            "--classes",
            help="Comma-separated product classes, in class-index order (default: the cameras' classes).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOption = None,
    checkpoint: CheckpointOption = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            "--reference",
            help="Folder with a sub-folder of images per class, DIR/<class>/, to decide class names.",
            show_default=False,
        ),
    ] = None,
    profiles: ProfilesOption = None,
) -> None:
    cfg = load_for_verb(config)
    ok = run_export_onnx(cfg, parse_classes(classes, cfg), out, checkpoint, reference, profiles)
    raise typer.Exit(0 if ok else 1)
