"""`genclip synth`: synthetic defects on good images, written as training data for a new product."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer


def synth(
    source: Annotated[str, typer.Option(help="Folder of good images, or texture:FAMILY (woven, grain, ...).")],
    out: Annotated[Path, typer.Option(help="Output root; an MVTec-style <class>/ folder is written in it.")],
    count: Annotated[int, typer.Option(min=1, help="Test images to make: 30 % good, the rest with defects.")] = 100,
    seed: Annotated[int, typer.Option(help="Same seed, same images.")] = 0,
    kinds: Annotated[
        str | None, typer.Option(help="Comma-separated defect kinds; default all (scratch, crack, hole, ...).")
    ] = None,
    class_name: Annotated[str | None, typer.Option("--class", help="Class name; default the folder name.")] = None,
    foreground: Annotated[
        str,
        typer.Option(
            help="Where defects go: auto (the object, told from a plain background; the whole image when "
            "none is found, as for textures), all (anywhere: fabric, wood, tiles), or a folder of masks "
            "(non-zero = product; each image's relative path, as .png)."
        ),
    ] = "auto",
) -> None:
    """Blend synthetic defects (with exact masks) onto good images: training data for a new product."""
    from trainer.synth import synth_command

    kind_list = [k.strip() for k in kinds.split(",") if k.strip()] if kinds else None
    source_arg: Any = source if source.startswith("texture:") else Path(source)
    code = synth_command(source_arg, out, count, seed, kind_list, class_name, foreground)
    if code:
        raise typer.Exit(code)
