"""A product class's memory of normal patches: the few-shot branch fused with zero-shot GenCLIP.

Contract.
- A `PatchMemory` holds, per used layer, L2-normalised patch features of good parts of one class
  ([L, M, C], the same M patch positions in every layer) and where each row came from (`origins`:
  image index * grid^2 + patch index). Features are the layer tokens after ln_post (`"tokens"`, the
  default: independent of the learned prompts, so a prompt swap keeps the memory) or the adapted patch
  features the maps use (`"adapted"`: tied to one prompt version). Rounded to fp16 and normalised again
  when built (`stored_precision`), so a memory read back from its file scores exactly as the one built
  in process.
- The few-shot map of a frame is, per patch, 1 - the largest cosine similarity to the memory, averaged
  over layers; on the engine's device, as chunked matrix products over the memory rows inside the batch
  (`few_shot_map`). A row may leave one memory image out (`exclude`): how the references score
  themselves (leave-one-out) for the fusion statistics and the calibration. With a single image in
  the memory, leaving it out leaves only the patch's own 3x3 neighbourhood out.
- Fusion (`fuse`) happens on the patch grid, before the one upsample-and-blur: each branch is
  normalised by good-part statistics (`MemoryStats`: the references' zero-shot maps and their
  leave-one-out few-shot maps), the few-shot map is expressed in zero-shot units and mixed with weight
  b: linear `(1 - b) * zs + b * fs` or a weighted harmonic mean; clamped to [0, 1]. A class without a
  memory, or with b = 0, never reaches this module: its scores are exactly the zero-shot ones.
- Large memories may be cut to a configured number of patches by PatchCore's greedy coreset
  (`greedy_coreset`, over the layers' features concatenated, so every layer keeps the same patches).
- Files: safetensors beside the class profile (`memory_path`), with a JSON header carrying the identity
  (backbone, weights, image size, layers, V-V start, feature kind, width, grid) that must equal the
  running engine's (`check_identity`, refused with `MemoryFileError` naming the field), the reference
  digest, the per-image digests and sources, and the statistics.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file

FORMAT = "genclip-patch-memory"
FORMAT_VERSION = 1
METADATA_KEY = "genclip"
FeatureKind = Literal["tokens", "adapted"]
Fusion = Literal["linear", "harmonic"]
CHUNK_ELEMENTS = 1 << 24  # similarity entries per matrix product (64 MiB in fp32)
MIN_SCALE = 1e-6
IDENTITY_FIELDS = (
    "backbone",
    "weights",
    "image_size",
    "layers",
    "vv_from_layer",
    "features",
    "width",
    "grid",
)


class MemoryFileError(ValueError):
    """A memory file that cannot be used: unreadable, not ours, or built for another model; names the problem."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class MemoryIdentity:
    """What a memory's features mean: the model and layers they came from, and which features."""

    backbone: str
    weights: str
    image_size: int
    layers: tuple[int, ...]
    vv_from_layer: int | None
    features: str  # FeatureKind
    width: int
    grid: int

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}


@dataclass(frozen=True)
class BranchStats:
    """Location and scale of one branch's patch-grid values on good parts."""

    location: float
    scale: float

    @classmethod
    def of(cls, maps: torch.Tensor) -> BranchStats:
        values = maps.double().flatten()
        return cls(float(values.mean()), max(float(values.std(unbiased=False)), MIN_SCALE))


@dataclass(frozen=True)
class MemoryStats:
    """Good-part statistics of both branches, measured on `images` references with these prompts."""

    zero_shot: BranchStats
    few_shot: BranchStats
    images: int
    prompt_digest: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryStats:
        return cls(
            BranchStats(**data["zero_shot"]),
            BranchStats(**data["few_shot"]),
            int(data["images"]),
            str(data["prompt_digest"]),
        )


@dataclass(frozen=True, eq=False)
class PatchMemory:
    """One class's memory of normal patches (see the module docstring); immutable, replaced as a whole."""

    features: torch.Tensor  # [L, M, C] fp32, normalised, on the engine's device
    origins: torch.Tensor  # [M] int64 on the same device: image index * grid^2 + patch index
    identity: MemoryIdentity
    image_digests: tuple[str, ...]  # per image, sha256 of its pixels (model.digests.sha256_frames of one frame)
    sources: tuple[str, ...]  # per image: "reference" or "confirmed:<part id>"
    reference_digest: str | None  # sha256_frames of the reference set it was built from
    coreset: int  # patches kept (0: all)
    stats: MemoryStats | None = None
    built_at: str = field(default_factory=now_iso)
    updated_at: str = field(default_factory=now_iso)

    @property
    def images(self) -> int:
        return len(self.image_digests)

    @property
    def confirmed(self) -> int:
        return sum(s.startswith("confirmed:") for s in self.sources)

    @property
    def patches(self) -> int:
        return int(self.features.shape[1])

    @property
    def nbytes(self) -> int:
        return self.features.numel() * self.features.element_size() + self.origins.numel() * 8

    @property
    def digest(self) -> str:
        """The memory's identity: its model identity, images, coreset size and statistics."""
        data = {
            "identity": self.identity.as_dict(),
            "images": list(self.image_digests),
            "coreset": self.coreset,
            "stats": self.stats.as_dict() if self.stats else None,
        }
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def image_index(self, digest: str) -> int:
        """The memory image with these pixels, or -1."""
        try:
            return self.image_digests.index(digest)
        except ValueError:
            return -1

    def with_stats(self, stats: MemoryStats) -> PatchMemory:
        return replace(self, stats=stats, updated_at=now_iso())


@dataclass(frozen=True, eq=False)
class ClassMemory:
    """What a class scores with: its memory, the weight b of the few-shot branch, and the fusion."""

    memory: PatchMemory
    weight: float
    fusion: str  # Fusion

    def describe(self) -> str:
        """What a calibration on the fused score depends on (kept in `CalibrationSettings.memory`)."""
        return f"{self.memory.digest[:16]} b={self.weight:g} {self.fusion} {self.memory.identity.features}"


@dataclass(frozen=True, eq=False)
class MemoryGroup:
    """Rows of a batch scored with one class memory. `exclude` [n]: a memory image each row leaves out
    (-1: none; None: no row does). `collect`: no fusion, return both branches' grid maps (statistics)."""

    indices: torch.Tensor
    use: ClassMemory
    exclude: torch.Tensor | None = None
    collect: bool = False


# --- building ------------------------------------------------------------------------------------------------
def normalised_tokens(tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """ln_post layer tokens, per layer [B, HW, W] -> normalised [B, L, HW, W] in fp32."""
    return F.normalize(torch.stack([t.float() for t in tokens], dim=1), dim=-1)


def stored_precision(features: torch.Tensor) -> torch.Tensor:
    """Features as a memory keeps them: rounded to fp16 (as its file stores them), normalised again, in fp32.
    The same for a memory built in process and one read back: both score alike, bit for bit."""
    return F.normalize(features.to(torch.float16).float(), dim=-1)


def greedy_coreset(features: torch.Tensor, size: int, projection: int = 128, seed: int = 0) -> torch.Tensor:
    """PatchCore's greedy (k-center) coreset: indices of `size` rows of `features` [M, C], each the row
    farthest from those taken so far, distances in a random projection to `projection` dims (PatchCore's
    speed-up). Starts from row 0, so the same features give the same rows."""
    m = features.shape[0]
    if size >= m:
        return torch.arange(m, device=features.device)
    x = features.float()
    if x.shape[1] > projection:
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(x.shape[1], projection, generator=generator) / math.sqrt(projection)
        x = x @ matrix.to(x.device)
    chosen = torch.empty(size, dtype=torch.long, device=x.device)
    chosen[0] = 0
    nearest = torch.linalg.vector_norm(x - x[0], dim=1)
    for i in range(1, size):
        pick = torch.argmax(nearest)
        chosen[i] = pick
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(x - x[pick], dim=1))
    return chosen


def _rows(features: torch.Tensor, first_image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, L, HW, C] per-image features -> memory rows [L, N*HW, C] and their origins [N*HW]."""
    n, layers, hw, c = features.shape
    rows = features.permute(1, 0, 2, 3).reshape(layers, n * hw, c)
    origins = torch.arange(n * hw, device=features.device, dtype=torch.long) + first_image * hw
    return rows, origins


def _cut(rows: torch.Tensor, origins: torch.Tensor, coreset: int) -> tuple[torch.Tensor, torch.Tensor]:
    if coreset <= 0 or rows.shape[1] <= coreset:
        return rows, origins
    joined = rows.permute(1, 0, 2).reshape(rows.shape[1], -1)  # one vector per patch: every layer
    keep = greedy_coreset(joined, coreset)
    return rows[:, keep], origins[keep]


def build_memory(
    features: torch.Tensor,
    identity: MemoryIdentity,
    image_digests: Sequence[str],
    sources: Sequence[str],
    reference_digest: str | None,
    coreset: int = 0,
) -> PatchMemory:
    """A memory from per-image normalised features [N, L, HW, C] (see `normalised_tokens`)."""
    if features.shape[0] != len(image_digests) or len(sources) != len(image_digests):
        raise ValueError("one digest and one source per image")
    rounded = stored_precision(features)
    rows, origins = _cut(*_rows(rounded, 0), coreset)
    return PatchMemory(
        rows.contiguous(), origins, identity, tuple(image_digests), tuple(sources), reference_digest, coreset
    )


def add_images(
    memory: PatchMemory,
    features: torch.Tensor,
    image_digests: Sequence[str],
    sources: Sequence[str],
    max_images: int,
) -> PatchMemory:
    """`memory` with images added (features [N, L, HW, C]); images already in it are skipped. Beyond
    `max_images`, the oldest confirmed images go first (references stay), then the coreset is cut again."""
    new = [i for i, d in enumerate(image_digests) if d not in memory.image_digests]
    new = list({image_digests[i]: i for i in new}.values())  # one of each
    if not new:
        return memory
    hw = memory.identity.grid**2
    rounded = stored_precision(features[new])
    rows, origins = _rows(rounded, memory.images)
    rows = torch.cat([memory.features, rows.to(memory.features.device)], dim=1)
    origins = torch.cat([memory.origins, origins.to(memory.origins.device)])
    digests = [*memory.image_digests, *(image_digests[i] for i in new)]
    kinds = [*memory.sources, *(sources[i] for i in new)]
    if len(digests) > max_images:
        drop = [i for i, s in enumerate(kinds) if s.startswith("confirmed:")][: len(digests) - max_images]
        keep_images = [i for i in range(len(digests)) if i not in set(drop)]
        renumber = torch.full((len(digests),), -1, dtype=torch.long, device=origins.device)
        renumber[torch.as_tensor(keep_images, device=origins.device)] = torch.arange(
            len(keep_images), device=origins.device
        )
        image = renumber[origins // hw]
        kept = image >= 0
        rows, origins = rows[:, kept], image[kept] * hw + origins[kept] % hw
        digests = [digests[i] for i in keep_images]
        kinds = [kinds[i] for i in keep_images]
    rows, origins = _cut(rows, origins, memory.coreset)
    return replace(
        memory,
        features=rows.contiguous(),
        origins=origins,
        image_digests=tuple(digests),
        sources=tuple(kinds),
        updated_at=now_iso(),
    )


# --- searching and fusing -----------------------------------------------------------------------------------
def _excluded(memory: PatchMemory, origins: torch.Tensor, exclude: torch.Tensor, hw: int) -> torch.Tensor:
    """[B, HW, chunk] True where a query patch of row b may not match a memory row: from its left-out image
    (any patch of it; with one image in the memory, the patch's own 3x3 neighbourhood)."""
    image = origins // hw
    same = image.view(1, 1, -1) == exclude.view(-1, 1, 1)  # [B, 1, chunk]
    if memory.images > 1:
        return same
    grid = memory.identity.grid
    place = origins % hw
    query = torch.arange(hw, device=origins.device)
    near = ((query.view(-1, 1) // grid - place.view(1, -1) // grid).abs() <= 1) & (
        (query.view(-1, 1) % grid - place.view(1, -1) % grid).abs() <= 1
    )
    return same & near.unsqueeze(0)


def few_shot_map(query: torch.Tensor, memory: PatchMemory, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """1 - max cosine similarity to the memory, averaged over layers: query [B, L, HW, C] normalised -> [B, HW].

    The memory's rows are taken in chunks so one product holds at most CHUNK_ELEMENTS similarities.
    """
    b, layers, hw, _ = query.shape
    bank = memory.features
    chunk = max(1, CHUNK_ELEMENTS // max(1, b * hw))
    total = query.new_zeros(b, hw)
    for layer in range(layers):
        best = query.new_full((b, hw), -2.0)
        for start in range(0, bank.shape[1], chunk):
            sims = query[:, layer] @ bank[layer, start : start + chunk].t()  # [B, HW, chunk]
            if exclude is not None:
                mask = _excluded(memory, memory.origins[start : start + chunk], exclude, hw)
                sims = sims.masked_fill(mask, -2.0)
            best = torch.maximum(best, sims.amax(dim=-1))
        total += 1.0 - best
    return total / layers


def fuse(zero_shot: torch.Tensor, few_shot: torch.Tensor, use: ClassMemory) -> torch.Tensor:
    """Grid maps of both branches -> the fused map, in zero-shot units, clamped to [0, 1]."""
    stats = use.memory.stats
    if stats is None:
        raise ValueError("a memory without good-part statistics cannot be fused")
    zs, fs, b = stats.zero_shot, stats.few_shot, use.weight
    if use.fusion == "harmonic":  # each branch as a ratio to its good-part mean, weighted harmonic mean
        r_zs = (zero_shot / max(zs.location, MIN_SCALE)).clamp_min(MIN_SCALE)
        r_fs = (few_shot / max(fs.location, MIN_SCALE)).clamp_min(MIN_SCALE)
        fused = zs.location / ((1.0 - b) / r_zs + b / r_fs)
    else:  # z-scores of both branches, mixed, back in zero-shot units
        in_zero_shot_units = zs.location + zs.scale * (few_shot - fs.location) / fs.scale
        fused = (1.0 - b) * zero_shot + b * in_zero_shot_units
    return fused.clamp(0.0, 1.0)


def apply_memory(
    zero_shot: torch.Tensor, tokens: Sequence[torch.Tensor], patches: torch.Tensor, groups: Sequence[MemoryGroup]
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The batch's zero-shot grid maps [B, HW] with each group's rows fused with its memory; and, when a
    group collects, both branches' grid maps (few-shot 0 where no group collects)."""
    fused = zero_shot
    collected = zero_shot.new_zeros(zero_shot.shape) if any(g.collect for g in groups) else None
    for group in groups:
        kind = group.use.memory.identity.features
        query = normalised_tokens([t[group.indices] for t in tokens]) if kind == "tokens" else patches[group.indices]
        few = few_shot_map(query, group.use.memory, group.exclude)
        if group.collect:
            assert collected is not None
            collected = collected.index_copy(0, group.indices, few)
        else:
            fused = fused.index_copy(0, group.indices, fuse(zero_shot[group.indices], few, group.use))
    return fused, (zero_shot, collected) if collected is not None else None


# --- files ----------------------------------------------------------------------------------------------------
def memory_path(profile_file: Path) -> Path:
    """`<dir>/<class>.memory.safetensors` beside the class's `<dir>/<class>.json`."""
    return Path(profile_file).with_name(Path(profile_file).stem + ".memory.safetensors")


def save_memory(path: Path, memory: PatchMemory) -> Path:
    """Write atomically: features in fp16 (as built), origins, and the JSON header."""
    from model.checkpoint import write_atomic

    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "identity": memory.identity.as_dict(),
        "image_digests": list(memory.image_digests),
        "sources": list(memory.sources),
        "reference_digest": memory.reference_digest,
        "coreset": memory.coreset,
        "stats": memory.stats.as_dict() if memory.stats else None,
        "built_at": memory.built_at,
        "updated_at": memory.updated_at,
        "digest": memory.digest,
    }
    tensors = {
        "features": memory.features.detach().to("cpu", torch.float16).contiguous(),
        "origins": memory.origins.detach().to("cpu").contiguous(),
    }
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(header)}))
    return path


def check_identity(found: Mapping[str, Any], expected: MemoryIdentity, source: str) -> None:
    """Refuse a memory built for another backbone, weights, image size, layer set or feature kind."""
    want = expected.as_dict()
    for name in IDENTITY_FIELDS:
        have = found.get(name)
        if have != want[name]:
            raise MemoryFileError(
                f"{source}: patch memory built for {name} {have!r}, the running engine has {want[name]!r}; "
                "rebuild it from good parts (`genclip calibrate`, or the class's [references] at start)"
            )


def load_memory(path: Path, expected: MemoryIdentity, device: torch.device | str = "cpu") -> PatchMemory:
    """Read and check a memory file; raises MemoryFileError naming the file and the problem."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MemoryFileError(f"{path}: no such memory file") from None
    except OSError as exc:
        raise MemoryFileError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        (size,) = (int.from_bytes(data[:8], "little"),)
        header = json.loads(data[8 : 8 + size])["__metadata__"][METADATA_KEY]
        meta = json.loads(header)
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise MemoryFileError(f"{path}: not a readable patch memory file ({str(exc)[:160]})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MemoryFileError(f"{path}: not a GenCLIP patch memory (format {meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise MemoryFileError(f"{path}: patch memory format version {meta.get('format_version')} is not supported")
    identity = meta.get("identity")
    if not isinstance(identity, dict):
        raise MemoryFileError(f"{path}: patch memory header has no identity")
    check_identity(identity, expected, str(path))
    try:
        features = stored_precision(tensors["features"])
        origins = tensors["origins"].long()
        digests = tuple(str(d) for d in meta["image_digests"])
        sources = tuple(str(s) for s in meta["sources"])
        stats = MemoryStats.from_dict(meta["stats"]) if meta.get("stats") else None
    except (KeyError, TypeError, ValueError) as exc:
        raise MemoryFileError(f"{path}: patch memory field missing or of the wrong type ({exc})") from None
    layers, rows, width = features.shape
    if layers != len(expected.layers) or width != expected.width or origins.shape != (rows,):
        raise MemoryFileError(f"{path}: tensors of shape {tuple(features.shape)} do not fit its header")
    if len(digests) != len(sources) or (rows and int(origins.max()) >= len(digests) * expected.grid**2):
        raise MemoryFileError(f"{path}: patch origins and image list disagree")
    if not torch.isfinite(features).all():
        raise MemoryFileError(f"{path}: features hold NaN or infinite values")
    return PatchMemory(
        features.to(device),
        origins.to(device),
        expected,
        digests,
        sources,
        meta.get("reference_digest"),
        int(meta.get("coreset", 0)),
        stats,
        str(meta.get("built_at", "")),
        str(meta.get("updated_at", "")),
    )
