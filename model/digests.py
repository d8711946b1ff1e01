"""SHA-256 of files and frames: how weights, checkpoints and reference sets are identified."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_frames(frames: Iterable[np.ndarray]) -> str:
    """One digest over frames' shapes, dtypes and pixels: the identity of a reference set."""
    digest = hashlib.sha256()
    for frame in frames:
        digest.update(f"{frame.shape}{frame.dtype.str}".encode())
        digest.update(np.ascontiguousarray(frame).data)
    return digest.hexdigest()
