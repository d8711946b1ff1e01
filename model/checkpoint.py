"""Prompt checkpoints: only the learned tensors, in safetensors, with a JSON header.

The header (safetensors metadata key "genclip") names the backbone and its
weights, image size, layers, prompt lengths, defect vocabulary, training data,
and metrics (thresholds live in class profiles, not here). Loading checks it against the running
engine and refuses a mismatch naming the field. Nothing is ever unpickled, and
files are written atomically (temporary file, fsync, rename) so a watcher never
reads half a file.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

from model.backbone import Backbone
from model.digests import sha256_bytes
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


def _refuse_pickle(head: bytes, source: str) -> None:
    """Name a pickle (torch.save's zip or legacy format, pickle.dump) for what it is; it is never loaded.

    `head` is the first 9 bytes. A safetensors file starts with its header's length (8 bytes, little
    endian) and then '{': a header of 2944 bytes starts with 0x80 like a pickle does, so the '{'
    decides first.
    """
    if head[8:9] == b"{":
        return
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        raise CheckpointError(
            f"{source}: not a readable safetensors file: it is a pickle (torch.save or pickle.dump), which is "
            "never loaded, since loading it could run any code; use a checkpoint written by `genclip train`"
        )


def _package_version() -> str:
    try:
        return version("genclip-inspect")
    except PackageNotFoundError:
        return "0.0.0+source"


def write_atomic(path: Path, write: Any, mode: int = 0o644) -> None:
    """Call write(tmp_path), fsync it, and rename over `path` in one step; the file gets `mode`.

    0644 by default, so a service running as another user can read what a trainer published.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, mode)
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


@dataclass(frozen=True)
class CheckpointFile:
    """A checkpoint read once: its tensors, header and the digest of exactly those bytes."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    digest: str


def read_metadata(path: Path) -> dict[str, Any]:
    """The JSON header alone (reads only the header bytes)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            size_bytes = fh.read(8)
            _refuse_pickle(size_bytes + fh.read(1), str(path))
            fh.seek(8)
            if len(size_bytes) < 8:
                raise CheckpointError(f"{path}: not a readable safetensors file (too short)")
            (size,) = struct.unpack("<Q", size_bytes)
            if size > 100_000_000:
                raise CheckpointError(f"{path}: not a readable safetensors file (header size {size})")
            header = fh.read(size)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    return _parse_header(size_bytes + header, str(path))


def _parse_header(data: bytes, source: str) -> dict[str, Any]:
    _refuse_pickle(data[:9], source)
    if len(data) < 8:
        raise CheckpointError(f"{source}: not a readable safetensors file (too short)")
    (size,) = struct.unpack("<Q", data[:8])
    if size > len(data) - 8:
        raise CheckpointError(f"{source}: not a readable safetensors file (truncated header)")
    try:
        header = json.loads(data[8 : 8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{source}: not a readable safetensors file ({exc})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    raw = metadata.get(METADATA_KEY) if isinstance(metadata, dict) else None
    if not isinstance(raw, str):
        raise CheckpointError(f"{source}: safetensors file without a GenCLIP header (not a prompt checkpoint)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{source}: corrupt GenCLIP header ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{source}: corrupt GenCLIP header (a JSON {type(meta).__name__}, not an object)")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{source}: header format is {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: checkpoint format version {meta.get('format_version')} is not supported "
            f"(this engine reads version {FORMAT_VERSION})"
        )
    return meta


def parse_checkpoint(data: bytes, source: str) -> CheckpointFile:
    """Tensors and header from a checkpoint's bytes; raises CheckpointError saying what is wrong."""
    meta = _parse_header(data, source)
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: not a readable safetensors file ({exc})") from None
    for tensor_name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{source}: tensor {tensor_name} holds NaN or infinite values")
    return CheckpointFile(tensors=tensors, meta=meta, digest=sha256_bytes(data))


def read_checkpoint(path: Path) -> CheckpointFile:
    """Read a checkpoint file once (so digest and tensors always belong together) and parse it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror})") from None
    return parse_checkpoint(data, str(path))


def identity_mismatch(meta: dict[str, Any], expected: dict[str, Any]) -> tuple[str, Any, Any] | None:
    """The first IDENTITY_FIELDS entry where `meta` differs from `expected`: (field, meta's, expected's)."""
    for field in IDENTITY_FIELDS:
        have, want = meta.get(field), expected.get(field)
        if isinstance(have, list | tuple):
            have = list(have)
        if isinstance(want, list | tuple):
            want = list(want)
        if have != want:
            return field, have, want
    return None


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], source: str) -> None:
    """Refuse a checkpoint made for another backbone, size or layer set, naming the field."""
    mismatch = identity_mismatch(meta, expected)
    if mismatch is not None:
        field, have, want = mismatch
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
    save_checkpoint(path, model.learned_state(), header)


def update_metadata(path: Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a checkpoint with some header fields changed, atomically."""
    found = read_checkpoint(path)
    meta = {**found.meta, **changes}
    save_checkpoint(path, found.tensors, meta)
    return meta
