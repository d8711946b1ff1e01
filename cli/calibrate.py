"""`genclip calibrate`: a class's word and threshold from images of good parts, saved as its profile.

Exit codes: 0 done, 1 the calibration failed or some images could not be read, 2 bad
arguments or configuration.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.options import ConfigOption, ProfilesOption, fail, load_for_verb, open_engine

if TYPE_CHECKING:
    from model.profile import ClassProfile


def calibrate(
    product_class: Annotated[str, typer.Option("--class", help="Product class of the good images.")],
    good: Annotated[
        Path,
        typer.Option(
            help="Folder of images of good parts of this class only (an MVTec root or class folder: its "
            "train/good). Subfolders only with --recursive."
        ),
    ],
    checkpoint: Annotated[
        Path | None,
        typer.Option(
            help="Prompts to calibrate for; default: those the line runs ([agent].prompt_dir, else [model].checkpoint)."
        ),
    ] = None,
    profiles: ProfilesOption = None,
    quantile: Annotated[
        float | None,
        typer.Option(min=0.5, max=0.9999, help="Share of good parts to pass; default [model].calibration_quantile."),
    ] = None,
    min_images: Annotated[
        int | None,
        typer.Option(
            "--min-images",
            min=1,
            help="Fewest good images to calibrate on; default: [trainer].calibrate_min_images.",
        ),
    ] = None,
    recursive: Annotated[bool, typer.Option("--recursive", help="Also read images in subfolders.")] = False,
    config: ConfigOption = None,
    print_only: Annotated[bool, typer.Option("--print-only", help="Print the result; write no profile.")] = False,
) -> None:
    """Decide a class's word and threshold from good parts; write its profile (<profiles>/<class>.json).

    An earlier profile of the class is kept in <profiles>/history/<class>/ and the change is printed.
    """
    from model import ClassSetupError
    from trainer.calibrate import calibrate as run_calibration

    cfg = load_for_verb(config)
    folder = profiles or cfg.model.profile_dir
    if folder is None and not print_only:
        fail("no profile folder: give --profiles DIR or set [model].profile_dir (or use --print-only)")
    q = quantile if quantile is not None else cfg.model.calibration_quantile
    needed = min_images if min_images is not None else cfg.trainer.calibrate_min_images
    source, paths = good_paths(good, product_class, recursive, needed)
    engine = open_engine(cfg.model, checkpoint, cfg.engine.batch_size, prompt_dir=cfg.agent.prompt_dir)
    try:
        result = run_calibration(engine, product_class, paths, q, min_images=needed)
    except (ClassSetupError, ValueError) as exc:
        fail(str(exc), 1)
    for line in result.skipped:
        typer.echo(f"skipped {line}", err=True)
    c = result.profile.calibration
    assert c is not None
    typer.echo(f"# {product_class} from {source}: {c.describe()}")
    typer.echo(
        f"# class word '{result.profile.class_word}' ({result.profile.class_word_source}); prompts {c.prompt_version}"
    )
    if not print_only:
        assert folder is not None
        save_profile(folder, result.profile)
    typer.echo(f"[thresholds]\n{json.dumps(result.profile.product_class)} = {c.threshold:.6f}")
    if result.skipped:
        raise typer.Exit(1)


def good_paths(good: Path, product_class: str, recursive: bool, needed: int) -> tuple[Path, list[Path]]:
    """The folder of good images and the image files in it, or exit 2 when there are fewer than `needed`."""
    from trainer.calibrate import CalibrationInputError, good_folder, good_images

    try:
        source = good_folder(good, product_class)
        paths = good_images(good, product_class, recursive=recursive)
    except CalibrationInputError as exc:
        fail(str(exc))
    if len(paths) < needed:
        fail(
            f"class '{product_class}': {len(paths)} image file(s) in {source}"
            + ("" if recursive else " (subfolders not searched; --recursive)")
            + f"; calibration needs at least {needed} good images ([trainer].calibrate_min_images, --min-images)"
        )
    return source, paths


def save_profile(folder: Path, profile: ClassProfile) -> None:
    """Write the class's profile into `folder` and print where, and what changed from the one it replaces."""
    from model.profile import ClassProfile, ProfileError, profile_path
    from trainer.calibrate import describe_change

    target = profile_path(folder, profile.product_class)
    try:
        previous = ClassProfile.load(target) if target.is_file() else None
    except ProfileError:
        previous = None
    change = describe_change(previous, profile)
    profile.save(target)
    typer.echo(f"# profile {target}" + (f"; {change} (old one kept in {target.parent / 'history'})" if change else ""))
