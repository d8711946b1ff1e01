"""The engine: batches of frames of mixed product classes in, one result per frame out.

Where things are. This module: the device, precision, prompt versions (install, swap) and the scoring
path (`launch`, `predict`, `warmup`). `model/classes.py` (`engine.classes`): product classes, class
words, calibration and which threshold a frame is judged with. `model/batch.py`: a launched batch on
its way to the host. `model/postprocess.py`: where one frame's scores become a `Prediction` (verdict,
map level, defect regions). `model/state.py`: the `Snapshot` a batch runs on.

Threading contract. One thread (the device thread) calls `predict`, `launch`, `warmup`,
`install_prompts` (and `load_prompts`), `classes.register`, `classes.setup` and `classes.calibrate`.
Everything a batch uses (prompts, text features, class profiles, thresholds) sits in one immutable
`Snapshot` that `launch` takes once at its start; every change builds a new snapshot under the
snapshot cell's write lock and publishes it with one reference assignment, so a batch in flight
finishes on the state it started with. `predict` is `launch` (the device part) then `outcomes()`
(the host part: maps, regions), which may run on another thread while the device thread launches the
next batch. `prepare_prompts` (reading, hashing and validating a checkpoint, on the CPU) may run on any
thread; `classes.set_thresholds` too. With CUDA graphs (compile on CUDA), call `warmup` on the device
thread: graphs are recorded per thread.

Classes are set up explicitly with `classes.register` (see `model/profile.py`); `predict` never decides
a class word, and a frame of an unregistered class gets an error, not a guess.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol

import numpy as np
import structlog
import torch

from model import checkpoint as ckpt
from model.backbone import Backbone, load_backbone
from model.batch import HostTransfer, Item, PendingBatch
from model.checkpoint_files import resolve_checkpoint
from model.classes import ClassRegistry, ClassSetupError
from model.config import EngineConfig, normalise_class_name
from model.genclip import DefectGroup, GenClip, Scores, ScoringSettings, head_precision, prompt_shape
from model.memory import ClassMemory, MemoryGroup, MemoryIdentity, normalised_tokens
from model.outcomes import FrameError, Prediction
from model.postprocess import Assemble, RegionSettings, assemble
from model.preprocess import InvalidFrameError, Preprocessor, check_frame
from model.profile import CalibrationSettings, ClassProfile
from model.prompts import PromptShape
from model.state import ClassText, EngineStats, PromptState, Snapshot, SnapshotCell
from model.vision import VisionOutput

__all__ = ["ClassSetupError", "Engine", "EngineInfo", "PreparedPrompts", "normalise_class_name"]

log = structlog.stdlib.get_logger("model.engine")
UNTRAINED = "untrained"


class MemoryRequest(NamedTuple):
    """How one frame of a batch uses its class's patch memory: fused with it, leaving memory image `exclude`
    out (-1: none), or, with `collect`, not fused but both branches' grid maps returned (statistics)."""

    use: ClassMemory
    exclude: int = -1
    collect: bool = False


class ScoreBatch(Protocol):
    """The engine's one scoring path (`Engine._score`), as the class registry's scorer calls it."""

    def __call__(
        self,
        prompts: PromptState,
        texts: list[ClassText],
        frames: list[np.ndarray],
        memory: Sequence[MemoryRequest | None] | None = None,
    ) -> tuple[Scores, list[list[int]]]: ...


@dataclass(frozen=True)
class PreparedPrompts:
    """A validated checkpoint, ready to install: learned tensors loaded into a model on the CPU."""

    model: GenClip
    version: str
    digest: str
    meta: Mapping[str, Any]
    path: str


@dataclass(frozen=True)
class EngineInfo:
    """What the engine runs: model, device, precision, prompt version, batch shapes, classes (logged at start)."""

    backbone: str
    weights: str
    device: str
    precision: str
    image_size: int
    layers: list[int]
    vv_from_layer: int | None
    prompt_version: str
    batch_sizes: list[int]
    classes: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


CPU_BF16_MIN_TEXT_ROWS = 32  # per-image text prompts in a batch from which bf16 beats fp32 on a CPU (batch 4 on)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 matrix products in hardware (AVX512-BF16 or AMX), so bf16 is faster."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def tower_precision(requested: str, device: torch.device) -> tuple[str, str | None]:
    """The precision the towers run in on `device`, and why it differs from `requested` (None if it does not).

    bf16 runs on CUDA and on CPUs with native bf16 (on an AMX Xeon the ViT-B-16 tower ~4x fp32 at batch 8,
    2.5-3.2x end to end); fp16
    runs on CUDA only. Elsewhere emulated low precision would be slower than fp32, so fp32 it is.
    """
    if requested == "fp32" or device.type == "cuda":
        return requested, None
    if device.type == "cpu" and requested == "bf16":
        if cpu_has_native_bf16():
            return "bf16", None
        return "fp32", "this CPU has no native bf16 (AVX512-BF16 or AMX): emulated bf16 is slower than fp32"
    return "fp32", f"{requested} runs on CUDA only; on {device.type} the towers run in fp32"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"[model].device is '{name}' but no CUDA device is available (use 'auto' or 'cpu')")
    return device


def batch_sizes_up_to(largest: int) -> list[int]:
    """Powers of two below `largest`, then `largest`: the only batch shapes the towers ever see."""
    sizes, size = [], 1
    while size < largest:
        sizes.append(size)
        size *= 2
    return [*sizes, largest]


def calibration_settings(
    backbone: Backbone, config: EngineConfig, base: GenClip, precision: str
) -> CalibrationSettings:
    """What a calibration on an engine depends on besides the prompts (the class word is set per class)."""
    return CalibrationSettings(
        backbone=backbone.name,
        weights=backbone.weights,
        image_size=config.image_size,
        layers=tuple(base.layers),
        vv_from_layer=base.vv_from,
        branch_weight=config.branch_weight,
        score_alpha=config.score_alpha,
        blur_sigma=config.blur_sigma,
        temperature=config.temperature,
        precision=precision,
        class_word="",
    )


class DeviceScorer:
    """The engine's device side as the class registry sees it (`model.classes.ClassScorer`): class texts,
    CLIP's own embeddings for Class Name Filtering, and good parts scored through the engine's one path."""

    def __init__(
        self,
        base: GenClip,
        preprocess: Preprocessor,
        score: ScoreBatch,
        chunk: int,
        autocast: Callable[[], contextlib.AbstractContextManager],
        stats: EngineStats,
    ) -> None:
        self._base = base
        self._preprocess = preprocess
        self._score = score
        self._chunk = chunk
        self._autocast = autocast
        self._stats = stats

    def class_text(self, model: GenClip, profile: ClassProfile) -> ClassText:
        self._stats.class_text_builds += 1
        names = list(profile.defect_types)
        with torch.inference_mode(), self._autocast():
            defect_text = model.defect_text(names, profile.class_word).float()
        return ClassText(model.suffix(profile.class_word), tuple(names), defect_text)

    def image_embeddings(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """CLIP's own normalised image embeddings (frozen, no prompts), in chunks of the largest batch."""
        out = []
        for start in range(0, len(frames), self._chunk):
            chunk = frames[start : start + self._chunk]
            with torch.inference_mode(), self._autocast():
                vision = self._base.vision(self._preprocess(chunk))
            out.append(torch.nn.functional.normalize(vision.global_embedding.float(), dim=-1))
        return torch.cat(out)

    def text_embeddings(self, model: GenClip, texts: Sequence[str]) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            return model.text.encode_texts(list(texts)).float()

    @property
    def device(self) -> torch.device:
        return self._base.sot.device

    def _requests(
        self, memory: ClassMemory | None, exclude: Sequence[int] | None, start: int, n: int, collect: bool = False
    ) -> list[MemoryRequest | None] | None:
        if memory is None:
            return None
        return [MemoryRequest(memory, exclude[start + i] if exclude else -1, collect) for i in range(n)]

    def good_scores(
        self,
        prompts: PromptState,
        text: ClassText,
        frames: Sequence[np.ndarray],
        memory: ClassMemory | None = None,
        exclude: Sequence[int] | None = None,
    ) -> np.ndarray:
        scores = []
        for start in range(0, len(frames), self._chunk):
            chunk = list(frames[start : start + self._chunk])
            requests = self._requests(memory, exclude, start, len(chunk))
            with torch.inference_mode(), self._autocast():
                if requests is None:
                    out, _ = self._score(prompts, [text] * len(chunk), chunk)
                else:
                    out, _ = self._score(prompts, [text] * len(chunk), chunk, requests)
            scores.append(out.scores[: len(chunk)].float().cpu().numpy())  # not the padding rows
        return np.concatenate(scores)

    def branch_maps(
        self,
        prompts: PromptState,
        text: ClassText,
        frames: Sequence[np.ndarray],
        memory: ClassMemory,
        exclude: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        zero_shot, few_shot = [], []
        for start in range(0, len(frames), self._chunk):
            chunk = list(frames[start : start + self._chunk])
            requests = self._requests(memory, exclude, start, len(chunk), collect=True)
            with torch.inference_mode(), self._autocast():
                out, _ = self._score(prompts, [text] * len(chunk), chunk, requests)
            assert out.branch_maps is not None
            zero_shot.append(out.branch_maps[0][: len(chunk)].float())
            few_shot.append(out.branch_maps[1][: len(chunk)].float())
        return torch.cat(zero_shot), torch.cat(few_shot)

    def patch_features(self, model: GenClip, frames: Sequence[np.ndarray], kind: str) -> torch.Tensor:
        out = []
        for start in range(0, len(frames), self._chunk):
            chunk = frames[start : start + self._chunk]
            with torch.inference_mode(), self._autocast():
                vision = self._base.vision(self._preprocess(chunk))
            with torch.inference_mode(), head_precision(self.device.type):
                feats = model.image_features(vision)
                assert feats.tokens is not None
                out.append(normalised_tokens(feats.tokens) if kind == "tokens" else feats.patches.float())
        return torch.cat(out)


class Engine:
    """GenCLIP inference on one device; see the module docstring for the threading contract."""

    def __init__(self, config: EngineConfig, *, backbone: Backbone | None = None, max_batch: int = 8) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.backbone = backbone or load_backbone(
            config.backbone,
            config.pretrained,
            allow_download=config.allow_download,
            cache_dir=config.cache_dir,
            model_config=config.model_config_file,
        )
        self.backbone.clip.to(self.device)
        if config.image_size % self.backbone.patch_size:
            raise ValueError(
                f"[model].image_size {config.image_size} is not a multiple of {config.backbone}'s "
                f"patch size {self.backbone.patch_size}"
            )
        self._base = GenClip(self.backbone, config).to(self.device).eval()
        self.layers = self._base.layers
        self.vv_from = self._base.vv_from
        self.settings = ScoringSettings.from_config(config)
        self.preprocess = Preprocessor(config.image_size, self.backbone.mean, self.backbone.std, self.device)
        self.batch_sizes = batch_sizes_up_to(max(1, max_batch))
        self.stats = EngineStats()
        self.assemble: Assemble = functools.partial(
            assemble, RegionSettings(config.score_alpha, config.min_defect_area)
        )  # an attribute, so a bench can time it
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self.fault_hook: Callable[[int], None] | None = None  # tests: called with each sub-batch size
        self._precision, why = tower_precision(config.precision, self.device)
        if why:
            log.warning("precision not available here", requested=config.precision, used=self._precision, reason=why)
        self._vision = self._tower(config)
        checkpoint = resolve_checkpoint(config.checkpoint) if config.checkpoint else None
        if config.checkpoint is not None and checkpoint is None:
            log.warning("no checkpoint in folder yet; running untrained prompts", folder=str(config.checkpoint))
        prompts = self._untrained() if checkpoint is None else self._install_state(self.prepare_prompts(checkpoint))
        self._cell = SnapshotCell(Snapshot(prompts, MappingProxyType({}), MappingProxyType({})))
        scorer = DeviceScorer(
            self._base,
            self.preprocess,
            self._late_score,
            self.batch_sizes[-1],
            self._autocast,
            self.stats,
        )
        settings = calibration_settings(self.backbone, config, self._base, self._precision)
        self.classes = ClassRegistry(config, self._cell, scorer, settings, self.memory_identity)
        log.info("engine ready", **self.info().as_dict())

    def _late_score(
        self,
        prompts: PromptState,
        texts: list[ClassText],
        frames: list[np.ndarray],
        memory: Sequence[MemoryRequest | None] | None = None,
    ) -> tuple[Scores, list[list[int]]]:
        """`_score`, looked up at each call: a test may replace it (with the three-argument form)."""
        if memory is None:
            return self._score(prompts, texts, frames)
        return self._score(prompts, texts, frames, memory)

    def memory_identity(self, prompts: PromptState) -> MemoryIdentity:
        """What a patch memory built on this engine (and, for adapted features, these prompts) is."""
        adapted = self.config.memory_features == "adapted"
        return MemoryIdentity(
            backbone=self.backbone.name,
            weights=self.backbone.weights,
            image_size=self.config.image_size,
            layers=tuple(self.layers),
            vv_from_layer=self.vv_from,
            features=f"adapted:{prompts.digest[:16]}" if adapted else "tokens",
            width=self.backbone.embed_dim if adapted else self.backbone.vision_width,
            grid=self.config.image_size // self.backbone.patch_size,
        )

    # --- precision ---------------------------------------------------------------------------------------
    @property
    def precision(self) -> str:
        """The towers' effective precision: the configured one where this device runs it natively."""
        return self._precision

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision != "fp32":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def _tower(self, config: EngineConfig) -> Callable[[torch.Tensor], VisionOutput]:
        """The image tower batches run: in the towers' precision, compiled when [model].compile."""
        tower = self._base.vision
        if self._precision != "fp32":
            # The frozen image tower's weights kept in bf16/fp16: under autocast alone every fp32 weight is
            # converted on every call (about 60 ms per ViT-B-16 forward on a CPU, a third of it at batch 1).
            # A copy, so the fp32 tower stays for export and for the trainer sharing this backbone.
            tower = copy.deepcopy(tower).to(torch.bfloat16 if self._precision == "bf16" else torch.float16)
        if not config.compile:
            return tower
        torch._dynamo.config.recompile_limit = max(8, len(self.batch_sizes) + 2)
        if self.device.type == "cuda":  # CUDA graphs over the fixed batch shapes
            return torch.compile(tower, mode="reduce-overhead", dynamic=False)
        # the frozen tower's weights folded in as constants, pre-packed for the CPU's matrix kernels
        return torch.compile(tower, dynamic=False, options={"freezing": True})

    # --- prompts -----------------------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to run on this engine."""
        return ckpt.model_identity(self.backbone, self._base, self.config.image_size)

    def _untrained(self) -> PromptState:
        with torch.inference_mode(), self._autocast():
            query = self._base.query_text().float()
        return PromptState(self._base, UNTRAINED, UNTRAINED, MappingProxyType({}), query)

    def _shape_from(self, meta: Mapping[str, Any], source: str) -> PromptShape:
        """The prompt lengths a checkpoint's header declares, within the bounds [model] allows: the model
        is built from them before its tensors are checked, so a damaged header must not make it huge."""
        lengths = {}
        for name in ("query_tokens", "state_tokens", "defect_tokens"):
            if name not in meta:
                raise ckpt.CheckpointError(f"{source}: header lacks prompt lengths ('{name}')")
            value = meta[name]
            most = next(m.le for m in EngineConfig.model_fields[name].metadata if hasattr(m, "le"))
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= most:
                raise ckpt.CheckpointError(f"{source}: header field '{name}' is {value!r}, not a length of 1 to {most}")
            lengths[name] = value
        return replace(prompt_shape(self.backbone, self.config, len(self.layers)), **lengths)

    def prepare_prompts(self, path: Path) -> PreparedPrompts:
        """Read a checkpoint once, validate it against this engine, build its prompt model. Any thread: the
        only device work is looking up a few token embeddings; installing it is `install_prompts`'s job.

        Raises CheckpointError naming the problem; nothing of the running engine changes.
        """
        found = ckpt.read_checkpoint(Path(path))
        ckpt.check_compatible(found.meta, self.identity(), str(path))
        model = GenClip(self.backbone, self.config, self._shape_from(found.meta, str(path)))
        try:
            model.load_learned_state(found.tensors)
        except RuntimeError as exc:
            raise ckpt.CheckpointError(f"{path}: learned tensors do not fit this model: {exc}") from None
        version = f"{Path(path).stem}@{found.digest[:12]}"
        return PreparedPrompts(model, version, found.digest, MappingProxyType(dict(found.meta)), str(path))

    def _install_state(self, prepared: PreparedPrompts) -> PromptState:
        model = prepared.model.to(self.device).eval()
        with torch.inference_mode(), self._autocast():
            query = model.query_text().float()
        return PromptState(model, prepared.version, prepared.digest, prepared.meta, query, prepared.path)

    def install_prompts(self, prepared: PreparedPrompts, *, announce: bool = True) -> str:
        """Swap validated prompts in (device thread): class texts rebuilt and classes with reference
        images recalibrated on the new prompts first, so the next batch runs entirely on the new version.
        `announce=False` logs the swap at DEBUG (the trainer swaps every epoch)."""
        with self._cell.write_lock:
            old = self._cell.current
            prompts = self._install_state(prepared)
            classes, recalibrated = self.classes.rebuilt_for(prompts, old)
            self._cell.publish(Snapshot(prompts, classes, old.overrides))
            self.stats.prompt_swaps += 1
        for profile in recalibrated:  # a restart then scores as now, and history/ keeps the previous calibration
            self.classes.save(profile)
        (log.info if announce else log.debug)(
            "prompts loaded", version=prompts.version, previous=old.prompts.version, path=prepared.path
        )
        return prompts.version

    def load_first_usable(self, candidates: Sequence[Path]) -> list[str]:
        """Load the first checkpoint of `candidates` (best first) this engine accepts; returns why each one
        before it was refused. A checkpoint refused while a line ran (another backbone, truncated, a pickle)
        stays in its folder: a restart must come up on the prompts the line ran with, not stay down.
        Raises CheckpointError listing every refusal when none is usable (untrained prompts would score
        nonsense); with no candidates the prompts stay as they are."""
        refused: list[str] = []
        for path in candidates:
            try:
                self.load_prompts(path)
            except (ckpt.CheckpointError, OSError) as exc:
                log.error("checkpoint refused; trying the one before it", path=str(path), error=str(exc))
                refused.append(str(exc) if str(path) in str(exc) else f"{path}: {exc}")
                continue
            if refused:
                log.warning("running an older checkpoint", path=str(path), refused=len(refused))
            return refused
        if refused:
            raise ckpt.CheckpointError("no usable prompt checkpoint: " + "; ".join(refused))
        return refused

    def load_prompts(self, path: Path, *, announce: bool = True) -> str:
        """prepare_prompts + install_prompts, for callers on the device thread; returns the new version."""
        return self.install_prompts(self.prepare_prompts(path), announce=announce)

    @property
    def snapshot(self) -> Snapshot:
        """What the next batch will run on (published as a whole; see `model/state.py`)."""
        return self._cell.current

    @property
    def prompt_version(self) -> str:
        return self._cell.current.prompts.version

    @property
    def prompt_metadata(self) -> dict[str, Any]:
        """The running checkpoint's JSON header."""
        return dict(self._cell.current.prompts.meta)

    def info(self) -> EngineInfo:
        return EngineInfo(
            backbone=self.backbone.name,
            weights=self.backbone.weights,
            device=str(self.device),
            precision=self.precision,
            image_size=self.config.image_size,
            layers=list(self.layers),
            vv_from_layer=self.vv_from,
            prompt_version=self.prompt_version,
            batch_sizes=list(self.batch_sizes),
            classes=self.classes.names(),
        )

    # --- inference ---------------------------------------------------------------------------------------
    def predict(self, frames: Sequence[object], classes: Sequence[object]) -> list[Prediction | FrameError]:
        """Score frames (uint8/uint16 BGR HxWx3 or gray HxW, any sizes) of registered classes.

        One result per frame, in order: a Prediction, or a FrameError naming the problem.
        """
        return self.launch(frames, classes).outcomes()

    def launch(self, frames: Sequence[object], classes: Sequence[object]) -> PendingBatch:
        """Queue a batch on the device and return at once; `outcomes()` of the result gives `predict`'s list.

        The host part of a result (copying the map, finding defect regions) waits for `outcomes()`, which
        may run on another thread: the agent builds one batch's results while the device scores the next.
        On a GPU the device work itself is queued asynchronously; on a CPU it is done when this returns.
        """
        if len(frames) != len(classes):
            raise ValueError(f"{len(frames)} frames but {len(classes)} class names")
        started = time.perf_counter()
        snap = self._cell.current
        pending = PendingBatch(snap, len(frames), started, self.assemble, self.stats)
        good: list[Item] = []
        for i, (frame, raw_name) in enumerate(zip(frames, classes, strict=True)):
            label = raw_name if isinstance(raw_name, str) else repr(raw_name)
            try:
                name = normalise_class_name(raw_name)
                label = name
                if name not in snap.classes:
                    raise ValueError(f"unknown product class '{name}' (not registered with the engine)")
                checked = check_frame(frame, i)
                pixels = checked.shape[0] * checked.shape[1]
                if pixels > self.config.max_frame_pixels:
                    raise ValueError(
                        f"frame of {checked.shape[1]}x{checked.shape[0]} px is over the limit of "
                        f"{self.config.max_frame_pixels} pixels ([model].max_frame_pixels)"
                    )
                good.append((i, checked, name))
            except InvalidFrameError as exc:
                pending.fail(FrameError(i, label, exc.reason))
            except ValueError as exc:
                pending.fail(FrameError(i, label, str(exc)))
        step = self.batch_sizes[-1]
        for start in range(0, len(good), step):
            self._run(snap, good[start : start + step], pending)
        self.stats.batches += 1
        self.stats.frames += len(frames)
        self.stats.frame_errors += pending.errors
        return pending

    def _run(self, snap: Snapshot, items: list[Item], pending: PendingBatch) -> None:
        """Queue a sub-batch; on out-of-memory, free the cache and retry in halves."""
        try:
            if self.fault_hook is not None:
                self.fault_hook(len(items))
            with torch.inference_mode(), self._autocast():
                texts = [snap.classes[name].text for _, _, name in items]
                uses = [snap.classes[name].memory for _, _, name in items]
                batch = [frame for _, frame, _ in items]
                if any(use is not None for use in uses):
                    requests = [None if use is None else MemoryRequest(use) for use in uses]
                    out, groups = self._score(snap.prompts, texts, batch, requests)
                else:
                    out, groups = self._score(snap.prompts, texts, batch)
                pending.add(items, HostTransfer(out, groups, len(items)))
        except torch.OutOfMemoryError:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) == 1:
                index, _, name = items[0]
                log.error("out of device memory on a single frame", index=index)
                pending.fail(FrameError(index, name, "out of device memory"))
                return
            self.stats.oom_splits += 1
            log.warning("out of device memory; retrying the batch in halves", frames=len(items))
            half = len(items) // 2
            self._run(snap, items[:half], pending)
            self._run(snap, items[half:], pending)

    def _score(
        self,
        prompts: PromptState,
        texts: list[ClassText],
        frames: list[np.ndarray],
        memory: Sequence[MemoryRequest | None] | None = None,
    ) -> tuple[Scores, list[list[int]]]:
        """The one scoring path, on a batch padded to a fixed size so compiled graphs are reused. `memory`: per
        frame, how it uses its class's patch memory (None: zero-shot, exactly as without memories)."""
        n = len(frames)
        padded = next(s for s in self.batch_sizes if s >= n)
        images = self.preprocess(frames)
        if padded > n:
            images = torch.cat([images, images.new_zeros(padded - n, *images.shape[1:])])
        model = prompts.model
        suffixes, lengths = model.pad_suffixes([t.suffix for t in texts] + [texts[0].suffix] * (padded - n))
        groups: dict[int, list[int]] = {}
        for i, text in enumerate(texts):
            groups.setdefault(id(text), []).append(i)
        by_id = {id(t): t for t in texts}
        defect_groups = [DefectGroup(self._index_tensor(idx), by_id[key].defect_text) for key, idx in groups.items()]
        # The suffixes are padded to the batch's longest, so the prompts are already as short as the text
        # tower needs: no truncation, and no device-to-host read of the EOT positions inside the forward.
        out = model.score(
            images,
            prompts.query_text,
            suffixes,
            lengths,
            self.settings,
            defect_groups,
            vision=self._vision,
            truncate_text=False,
            text_in_fp32=self._text_in_fp32(padded),
            memory=self._memory_groups(memory or ()),
        )
        return out, list(groups.values())

    def _memory_groups(self, requests: Sequence[MemoryRequest | None]) -> list[MemoryGroup]:
        """The batch's rows grouped by class memory: row indices on the device built once per pattern, the
        left-out images copied to the device only when a row leaves one out (calibration, statistics)."""
        rows: dict[tuple[int, bool], list[int]] = {}
        for i, request in enumerate(requests):
            if request is not None:
                rows.setdefault((id(request.use), request.collect), []).append(i)
        groups = []
        for indices in rows.values():
            first = requests[indices[0]]
            assert first is not None
            left_out = [requests[i].exclude for i in indices]  # type: ignore[union-attr]
            exclude = torch.as_tensor(left_out, device=self.device) if max(left_out) >= 0 else None
            groups.append(MemoryGroup(self._index_tensor(indices), first.use, exclude, first.collect))
        return groups

    def _text_in_fp32(self, batch: int) -> bool:
        """On the CPU, bf16 matrix products pay a fixed cost per call (weights converted and repacked), which
        the few rows of a small batch's per-image text prompts cannot repay: 8 prompts ran in 250 ms in fp32
        and 390-480 ms in bf16 on ViT-B-16's text tower, 64 prompts in 850-1035 and 520-640 ms."""
        rows = batch * 2 * len(self.layers)
        return self.device.type == "cpu" and self.precision != "fp32" and rows < CPU_BF16_MIN_TEXT_ROWS

    def _index_tensor(self, indices: list[int]) -> torch.Tensor:
        """Row indices on the device, built once per pattern: no host-to-device copy per batch."""
        key = tuple(indices)
        tensor = self._indices.get(key)
        if tensor is None:
            if len(self._indices) >= 1024:
                self._indices.clear()
            tensor = self._indices[key] = torch.as_tensor(indices, device=self.device)
        return tensor

    def warmup(self) -> float:
        """Run every padded batch size once on this thread (compile, CUDA graphs, kernels); returns seconds.

        Call it on the thread that will call `predict`: CUDA graph trees are recorded per thread.
        """
        started = time.perf_counter()
        prompts = self._cell.current.prompts
        size = self.config.image_size
        text = self.classes.any_text()
        frame = np.zeros((size, size, 3), np.uint8)
        for batch in self.batch_sizes:
            with torch.inference_mode(), self._autocast():
                HostTransfer(*self._score(prompts, [text] * batch, [frame] * batch), batch).result()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    # --- export ------------------------------------------------------------------------------------------
    def cpu_copy(self) -> tuple[GenClip, PromptState]:
        """A CPU fp32 copy of the running prompt model (for export), leaving the engine on its device."""
        prompts = self._cell.current.prompts
        model = copy.deepcopy(prompts.model).to("cpu").float().eval()
        return model, replace(prompts, model=model, query_text=prompts.query_text.detach().to("cpu").float())
