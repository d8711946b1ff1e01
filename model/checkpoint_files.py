"""Where checkpoints are on disk: a file, or the newest one published into a folder.

Torch-free on purpose: the agent's watcher and `genclip config check` use it without
loading the engine. A trainer publishes by writing a temporary (or hidden) name and
renaming it into place, so those names are never taken.
"""

from __future__ import annotations

import os
from pathlib import Path

CHECKPOINT_SUFFIX = ".safetensors"
UNPUBLISHED_SUFFIXES = (".tmp", ".part")  # a writer's names before the rename that publishes the file


def is_unpublished(name: str) -> bool:
    """Hidden files and the temporary names a writer uses before renaming a checkpoint into place."""
    return name.startswith(".") or name.endswith(UNPUBLISHED_SUFFIXES)


def published_checkpoints(directory: Path) -> list[Path]:
    """The published `*.safetensors` in `directory`, newest first (by mtime, then name); [] when none."""
    found: list[tuple[int, str]] = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        if is_unpublished(entry.name) or not entry.name.endswith(CHECKPOINT_SUFFIX):
            continue
        try:
            if entry.is_file():
                found.append((entry.stat().st_mtime_ns, entry.name))
        except FileNotFoundError:  # removed while we looked
            continue
    return [Path(directory) / name for _, name in sorted(found, reverse=True)]


def newest_checkpoint(directory: Path) -> Path | None:
    """The newest published `*.safetensors` in `directory`, or None."""
    return next(iter(published_checkpoints(directory)), None)


def resolve_checkpoint(path: Path) -> Path | None:
    """A checkpoint file as given, or the newest *.safetensors in a folder of published ones (None if empty)."""
    path = Path(os.path.expanduser(path))
    if path.is_dir():
        return newest_checkpoint(path)
    return path


def checkpoint_candidates(prompt_dir: Path | None, checkpoint: Path | None) -> list[Path]:
    """The checkpoints a line may start on, best first: those published into `prompt_dir` (the agent's
    [agent].prompt_dir, where the trainer publishes), newest first, then [model].checkpoint (a file, or a
    folder's checkpoints newest first)."""
    found = published_checkpoints(Path(os.path.expanduser(prompt_dir))) if prompt_dir is not None else []
    if checkpoint is not None:
        path = Path(os.path.expanduser(checkpoint))
        found += published_checkpoints(path) if path.is_dir() else [path]
    return list(dict.fromkeys(found))
