"""Prompt checkpoints: only the learned tensors, in safetensors, with a JSON header.

The header (safetensors metadata key "genclip") names the backbone and its
weights, image size, layers, prompt lengths, defect vocabulary, training data,
metrics and calibrated thresholds. Loading checks it against the running
engine and refuses a mismatch naming the field. Nothing is ever unpickled, and
files are written atomically (temporary file, fsync, rename) so a watcher never
reads half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.backbone import Backbone
from model.genclip import GenClip

FORMAT = "genclip-prompts"
FORMAT_VERSION = 1
METADATA_KEY = "genclip"
# Fields that must equal the running engine's for the learned tensors to mean anything.
IDENTITY_FIELDS = (
    "backbone",
    "weights",
    "image_size",
    "layers",
    "vv_from_layer",
    "vision_width",
    "text_width",
    "embed_dim",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, not ours, or for another model."""


def _package_version() -> str:
    try:
        return version("genclip-inspect")
    except PackageNotFoundError:
        return "0.0.0+source"


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, write: Any) -> None:
    """Call write(tmp_path), fsync it, and rename over `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write learned tensors + metadata atomically."""
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    header.setdefault("created_at", datetime.now(UTC).isoformat(timespec="seconds"))
    payload = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    write_atomic(path, lambda tmp: save_file(payload, str(tmp), metadata={METADATA_KEY: json.dumps(header)}))


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON header alone (cheap: no tensor is read)."""
    return _open(path)[1]


def _open(path: Path, with_tensors: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            raw = (fh.metadata() or {}).get(METADATA_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()} if with_tensors else {}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file without a GenCLIP header (not a prompt checkpoint)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt GenCLIP header ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: header format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {meta.get('format_version')} is not supported "
            f"(this engine reads version {FORMAT_VERSION})"
        )
    for tensor_name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{path}: tensor {tensor_name} holds NaN or infinite values")
    return tensors, meta


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and header; raises CheckpointError saying what is wrong."""
    return _open(path, with_tensors=True)


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint made for another backbone, size or layer set, naming the field."""
    for field in IDENTITY_FIELDS:
        have, want = meta.get(field), expected.get(field)
        if isinstance(have, list | tuple):
            have = list(have)
        if isinstance(want, list | tuple):
            want = list(want)
        if have != want:
            raise CheckpointError(
                f"{source}: field '{field}' is {have!r} in the checkpoint but {want!r} in the running engine; "
                f"use a checkpoint trained for this model, or set [model] to match it"
            )


def model_identity(backbone: Backbone, model: GenClip, image_size: int) -> dict[str, Any]:
    """The IDENTITY_FIELDS of a model: what a checkpoint records and later must match."""
    return {
        "backbone": backbone.name,
        "weights": backbone.weights,
        "image_size": image_size,
        "layers": list(model.layers),
        "vv_from_layer": model.vv_from,
        "vision_width": backbone.vision_width,
        "text_width": backbone.text_width,
        "embed_dim": backbone.embed_dim,
    }


def save_model(
    path: Path, model: GenClip, backbone: Backbone, image_size: int, meta: dict[str, Any] | None = None
) -> None:
    """Save a model's learned tensors with the full header (identity, prompt lengths, package version)."""
    header = {
        **model_identity(backbone, model, image_size),
        "query_tokens": model.shape.query_tokens,
        "state_tokens": model.shape.state_tokens,
        "defect_tokens": model.shape.defect_tokens,
        "package_version": _package_version(),
        **(meta or {}),
    }
    header.setdefault("thresholds", {})
    save_checkpoint(path, model.learned_state(), header)


def update_metadata(path: Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a checkpoint with some header fields changed (e.g. calibrated thresholds), atomically."""
    tensors, meta = read_checkpoint(path)
    meta.update(changes)
    save_checkpoint(path, tensors, meta)
    return meta
