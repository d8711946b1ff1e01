"""The engine: batches of frames of mixed product classes in, one result per frame out.

Threading contract. One thread (the device thread) calls `predict`, `warmup`,
`register_class`, `calibrate_class` and `install_prompts`. Everything a batch uses
(prompts, text features, class profiles, thresholds) sits in one immutable
`Snapshot` that `predict` takes once at its start; every change builds a new
snapshot and publishes it with one reference assignment, so a batch in flight
finishes on the state it started with. `predict` is `launch` (the device part)
then `outcomes()` (the host part: maps, regions), which may run on another thread
while the device thread launches the next batch. `prepare_prompts` (reading, hashing and
validating a checkpoint, on the CPU) may run on any thread; `set_thresholds`
too. With CUDA graphs (compile on CUDA), call `warmup` on the device thread:
graphs are recorded per thread.

Classes are set up explicitly with `register_class` (see `model/profile.py`);
`predict` never decides a class word, and a frame of an unregistered class gets
an error, not a guess.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import structlog
import torch

from model import checkpoint as ckpt
from model.backbone import Backbone, load_backbone
from model.checkpoint_files import resolve_checkpoint
from model.cnf import TEMPLATE, CnfDecision, decide
from model.config import EngineConfig, normalise_class_name
from model.digests import sha256_frames
from model.genclip import DefectGroup, GenClip, Scores, ScoringSettings, prompt_shape
from model.outcomes import FrameError, Prediction
from model.preprocess import InvalidFrameError, Preprocessor, check_frame
from model.profile import Calibration, ClassProfile, ProfileError, profile_path
from model.prompts import PromptShape, Suffix
from model.regions import find_defects, region_threshold
from model.vision import VisionOutput

log = structlog.stdlib.get_logger("model.engine")
UNTRAINED = "untrained"
References = Sequence[np.ndarray] | Callable[[], Sequence[np.ndarray]]


class ClassSetupError(ValueError):
    """A product class cannot be set up as asked (too few reference images, a word CLIP cannot fit...)."""


@dataclass(frozen=True)
class ClassText:
    """Per class and prompt version: the frozen suffix embedding and the defect-type text features."""

    suffix: Suffix
    defect_names: tuple[str, ...]
    defect_text: torch.Tensor  # [K, D], fp32


@dataclass(frozen=True)
class PromptState:
    """One prompt version: its model view (shared frozen towers, own learned tensors) and query text."""

    model: GenClip
    version: str
    digest: str  # sha256 of the checkpoint bytes, or "untrained"
    meta: Mapping[str, Any]
    query_text: torch.Tensor  # F_Q [2, D], fp32
    path: str | None = None


@dataclass(frozen=True)
class ClassEntry:
    """A registered class in one snapshot: its profile, text and effective threshold."""

    profile: ClassProfile
    text: ClassText
    threshold: float
    threshold_source: str
    stale_reason: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """Everything one batch uses; never mutated once published."""

    prompts: PromptState
    classes: Mapping[str, ClassEntry]
    overrides: Mapping[str, tuple[float, str]]  # class -> (threshold, "config" or "command")


@dataclass(frozen=True)
class PreparedPrompts:
    """A validated checkpoint, ready to install: learned tensors loaded into a model on the CPU."""

    model: GenClip
    version: str
    digest: str
    meta: Mapping[str, Any]
    path: str


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


@dataclass
class EngineStats:
    """Counters for tests, logs and metrics."""

    batches: int = 0
    frames: int = 0
    frame_errors: int = 0
    class_text_builds: int = 0
    prompt_swaps: int = 0
    oom_splits: int = 0
    last_batch_ms: float = 0.0


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
        self._write_lock = threading.RLock()
        self._saving: set[str] = set()  # classes whose profile is saved back to [model].profile_dir
        self._references: dict[str, Callable[[], Sequence[np.ndarray]]] = {}
        self._stale_logged: set[tuple[str, str]] = set()
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self.fault_hook: Callable[[int], None] | None = None  # tests: called with each sub-batch size
        self._precision, why = tower_precision(config.precision, self.device)
        precision = self._precision
        if why:
            log.warning("precision not available here", requested=config.precision, used=precision, reason=why)
        tower = self._base.vision
        if precision != "fp32":
            # The frozen image tower's weights kept in bf16/fp16: under autocast alone every fp32 weight is
            # converted on every call (about 60 ms per ViT-B-16 forward on a CPU, a third of it at batch 1).
            # A copy, so the fp32 tower stays for export and for the trainer sharing this backbone.
            tower = copy.deepcopy(tower).to(torch.bfloat16 if precision == "bf16" else torch.float16)
        self._vision: Callable[[torch.Tensor], VisionOutput] = tower
        if config.compile:
            torch._dynamo.config.recompile_limit = max(8, len(self.batch_sizes) + 2)
            if self.device.type == "cuda":  # CUDA graphs over the fixed batch shapes
                self._vision = torch.compile(tower, mode="reduce-overhead", dynamic=False)
            else:  # the frozen tower's weights folded in as constants, pre-packed for the CPU's matrix kernels
                self._vision = torch.compile(tower, dynamic=False, options={"freezing": True})
        checkpoint = resolve_checkpoint(config.checkpoint) if config.checkpoint else None
        if config.checkpoint is not None and checkpoint is None:
            log.warning("no checkpoint in folder yet; running untrained prompts", folder=str(config.checkpoint))
        prompts = self._untrained() if checkpoint is None else self._install_state(self.prepare_prompts(checkpoint))
        self._snapshot = Snapshot(prompts=prompts, classes=MappingProxyType({}), overrides=MappingProxyType({}))
        log.info("engine ready", **self.info())

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
        with self._write_lock:
            old = self._snapshot
            prompts = self._install_state(prepared)
            classes, recalibrated = {}, []
            for name, entry in old.classes.items():
                text = self._class_text(prompts.model, entry.profile)
                profile = entry.profile
                if profile.calibration is not None and name in self._references:
                    profile = self._recalibrate(prompts, name, profile, text)
                    recalibrated.append(profile)
                classes[name] = self._entry(prompts, profile, text, old.overrides)
            self._publish(Snapshot(prompts, MappingProxyType(classes), old.overrides))
            self.stats.prompt_swaps += 1
        for profile in recalibrated:  # a restart then scores as now, and history/ keeps the previous calibration
            self._save_profile(profile)
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
        return self._snapshot

    @property
    def prompt_version(self) -> str:
        return self._snapshot.prompts.version

    @property
    def prompt_metadata(self) -> dict[str, Any]:
        return dict(self._snapshot.prompts.meta)

    def _publish(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot  # one reference assignment: a batch in flight keeps its own

    # --- classes -----------------------------------------------------------------------------------------
    def scoring_settings(self, class_word: str) -> dict[str, Any]:
        """What a calibration depends on besides the prompts; compared key by key."""
        return {
            "backbone": self.backbone.name,
            "weights": self.backbone.weights,
            "image_size": self.config.image_size,
            "layers": list(self.layers),
            "vv_from_layer": self.vv_from,
            "branch_weight": self.config.branch_weight,
            "score_alpha": self.config.score_alpha,
            "blur_sigma": self.config.blur_sigma,
            "temperature": self.config.temperature,
            "precision": self.precision,
            "class_word": class_word,
        }

    def set_thresholds(self, thresholds: Mapping[str, float], sources: Mapping[str, str] | None = None) -> None:
        """Per-class thresholds that win over calibrations; any thread. Their source is "config" unless
        `sources` says otherwise for a class (the agent: "command", set by an operator over MQTT)."""
        given = {normalise_class_name(k): v for k, v in (sources or {}).items()}
        overrides = MappingProxyType(
            {(n := normalise_class_name(k)): (float(v), given.get(n, "config")) for k, v in thresholds.items()}
        )
        with self._write_lock:
            old = self._snapshot
            classes = {name: self._entry(old.prompts, e.profile, e.text, overrides) for name, e in old.classes.items()}
            self._publish(Snapshot(old.prompts, MappingProxyType(classes), overrides))

    def threshold(self, product_class: str) -> tuple[float, str]:
        """The threshold a frame of this class would be judged with now, and where it comes from."""
        name = normalise_class_name(product_class)
        entry = self._snapshot.classes.get(name)
        if entry is not None:
            return entry.threshold, entry.threshold_source
        if name in self._snapshot.overrides:
            return self._snapshot.overrides[name]
        return self.config.default_threshold, "default"

    def _entry(
        self, prompts: PromptState, profile: ClassProfile, text: ClassText, overrides: Mapping[str, tuple[float, str]]
    ) -> ClassEntry:
        name = profile.product_class
        if name in overrides:
            return ClassEntry(profile, text, *overrides[name])
        calibration = profile.calibration
        if calibration is None:
            return ClassEntry(profile, text, self.config.default_threshold, "default")
        stale = calibration.stale_because(prompts.digest, self.scoring_settings(profile.class_word))
        if stale is None:
            return ClassEntry(profile, text, calibration.threshold, "calibration")
        if (name, prompts.digest) not in self._stale_logged:
            self._stale_logged.add((name, prompts.digest))
            log.warning(
                "calibration does not hold; using the default threshold",
                product_class=name,
                reason=stale,
                default_threshold=self.config.default_threshold,
            )
        return ClassEntry(profile, text, self.config.default_threshold, "stale-calibration", stale)

    def _class_text(self, model: GenClip, profile: ClassProfile) -> ClassText:
        self.stats.class_text_builds += 1
        names = list(profile.defect_types)
        with torch.inference_mode(), self._autocast():
            defect_text = model.defect_text(names, profile.class_word).float()
        return ClassText(model.suffix(profile.class_word), tuple(names), defect_text)

    def _check_fits_context(self, model: GenClip, word: str, defect_names: Sequence[str]) -> None:
        """Refuse a class word (with the defect names) that would not fit CLIP's context."""
        shape = model.shape
        longest = max([len(model.text.word_ids(f"{d} {word}.")) for d in defect_names], default=0)
        need = max(
            1 + shape.query_tokens + shape.state_tokens + len(model.text.word_ids(f"{word}.")) + 1,
            1 + shape.defect_tokens + shape.state_tokens + longest + 1,
        )
        if need > model.text.context_length:
            raise ClassSetupError(
                f"class word '{word}' is too long: its prompts need {need} tokens, "
                f"CLIP's context holds {model.text.context_length}"
            )

    def _decide_word(self, name: str, frames: Sequence[np.ndarray]) -> tuple[str, str, CnfDecision | None]:
        """The class word and its source: configured, CNF on reference frames, or the plain name."""
        cfg = self.config
        configured = cfg.class_words.get(name)
        if configured:
            return configured, "config", None
        if not cfg.cnf:
            return name, "cnf-off", None
        generic = cfg.cnf_generic_names
        if name.lower() in {g.lower() for g in generic}:
            return name, "generic", None
        if not frames:
            return name, "unfiltered", None
        embeddings = self._global_embeddings(frames)
        model = self._snapshot.prompts.model
        with torch.inference_mode(), self._autocast():
            texts = model.text.encode_texts([TEMPLATE.format(n) for n in [name, *generic]]).float()
        decision = decide(name, embeddings, texts[0], texts[1:], list(generic), cfg.cnf_margin)
        return decision.used_name, "cnf", decision

    def _global_embeddings(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """CLIP's own normalised image embeddings (frozen, no prompts), in chunks of the largest batch."""
        out = []
        for start in range(0, len(frames), self.batch_sizes[-1]):
            chunk = frames[start : start + self.batch_sizes[-1]]
            with torch.inference_mode(), self._autocast():
                vision = self._base.vision(self.preprocess(chunk))
            out.append(torch.nn.functional.normalize(vision.global_embedding.float(), dim=-1))
        return torch.cat(out)

    def register_class(
        self,
        product_class: str,
        references: References = (),
        *,
        profile: ClassProfile | None = None,
        calibrate: bool | None = None,
    ) -> ClassProfile:
        """Set a product class up for scoring (device thread); returns its profile.

        - `profile`: a saved profile; its class word is kept when made for this backbone and weights.
        - `references`: frames of good parts (or a function that reads them): they decide the class word
          by CNF when no profile or configured word does (at least `min_reference_images`), and calibrate
          the threshold when `calibrate` (default: when references are given). A loader is kept, so
          `install_prompts` recalibrates the class on new prompts.
        - neither: the plain class name, reported as class_word_source "unfiltered".
        Raises ClassSetupError (or InvalidFrameError for a bad reference frame) naming the problem.
        """
        name = normalise_class_name(product_class)
        loader = references if callable(references) else None
        frames = [check_frame(f, i) for i, f in enumerate(references() if loader else references)]
        if frames and len(frames) < self.config.min_reference_images:
            raise ClassSetupError(
                f"class '{name}': {len(frames)} reference image(s) of good parts are too few to decide its class "
                f"word or threshold; give at least {self.config.min_reference_images} "
                f"([model].min_reference_images)"
            )
        defect_types = tuple(self.config.defect_vocabulary(name))
        model = self._snapshot.prompts.model
        usable = profile is not None and (profile.backbone, profile.weights) == (
            self.backbone.name,
            self.backbone.weights,
        )
        if profile is not None and not usable:
            log.warning("profile made for other CLIP weights; deciding the class word again", product_class=name)
        if usable and name not in self.config.class_words:
            assert profile is not None
            new = replace(profile, product_class=name, defect_types=defect_types)
        else:
            word, source, decision = self._decide_word(name, frames)
            new = ClassProfile(
                product_class=name,
                class_word=word,
                class_word_source=source,  # type: ignore[arg-type]
                backbone=self.backbone.name,
                weights=self.backbone.weights,
                defect_types=defect_types,
                cnf=decision.as_dict() if decision else None,
                reference_images=len(frames),
                reference_digest=sha256_frames(frames) if frames else None,
                calibration=profile.calibration if profile is not None else None,
            )
            log.info("class word decided", product_class=name, class_word=word, source=source)
        self._check_fits_context(model, new.class_word, defect_types)
        with self._write_lock:
            old = self._snapshot
            text = self._class_text(old.prompts.model, new)
            if loader is not None:
                self._references[name] = loader
            if (calibrate if calibrate is not None else bool(frames)) and frames:
                new = self._calibrated(old.prompts, new, text, frames, self._quantile(new))
            classes = {**old.classes, name: self._entry(old.prompts, new, text, old.overrides)}
            self._publish(Snapshot(old.prompts, MappingProxyType(classes), old.overrides))
        return new

    def setup_class(self, product_class: str, references: References = (), *, save: bool = True) -> ClassProfile:
        """register_class with the line's profile from [model].profile_dir when there is one; a profile
        decided or calibrated anew is saved back there, so a restart scores identically."""
        name = normalise_class_name(product_class)
        directory = self.config.profile_dir
        saved: ClassProfile | None = None
        if directory is not None and profile_path(directory, name).is_file():
            try:
                saved = ClassProfile.load(profile_path(directory, name))
            except ProfileError as exc:
                log.warning("class profile unusable; setting the class up again", product_class=name, error=str(exc))
        profile = self.register_class(name, references, profile=saved)
        if save and directory is not None:
            self._saving.add(name)
            if profile != saved:
                self._save_profile(profile)
        return profile

    def _save_profile(self, profile: ClassProfile) -> None:
        """Into [model].profile_dir, for classes set up from there with saving on (the agent's)."""
        name, directory = profile.product_class, self.config.profile_dir
        if directory is None or name not in self._saving:
            return
        try:
            profile.save(profile_path(directory, name))
        except OSError as exc:
            log.warning("cannot save class profile", product_class=name, error=str(exc))

    def _quantile(self, profile: ClassProfile) -> float:
        return profile.calibration.quantile if profile.calibration else self.config.calibration_quantile

    def _calibrated(
        self, prompts: PromptState, profile: ClassProfile, text: ClassText, frames: Sequence[np.ndarray], q: float
    ) -> ClassProfile:
        scores = self._score_only(prompts, text, frames)
        calibration = Calibration.from_scores(
            scores,
            q,
            prompts.version,
            prompts.digest,
            self.scoring_settings(profile.class_word),
            margin=self.config.calibration_margin,
        )
        log.info(
            "class calibrated",
            product_class=profile.product_class,
            threshold=round(calibration.threshold, 6),
            images=calibration.images,
            rule=calibration.rule,
            prompt_version=prompts.version,
        )
        return profile.with_calibration(calibration)

    def _recalibrate(self, prompts: PromptState, name: str, profile: ClassProfile, text: ClassText) -> ClassProfile:
        try:
            frames = [check_frame(f, i) for i, f in enumerate(self._references[name]())]
        except Exception as exc:  # a reference folder that went away must not block a prompt swap
            log.warning("reference images unreadable; calibration will be stale", product_class=name, error=str(exc))
            return profile
        if not frames:
            return profile
        return self._calibrated(prompts, profile, text, frames, self._quantile(profile))

    def calibrate_class(self, product_class: str, frames: Sequence[np.ndarray], quantile: float) -> ClassProfile:
        """Measure a registered class's threshold on good parts with the running prompts (device thread)."""
        name = normalise_class_name(product_class)
        checked = [check_frame(f, i) for i, f in enumerate(frames)]
        if not checked:
            raise ClassSetupError(f"class '{name}': no good images to calibrate on")
        with self._write_lock:
            old = self._snapshot
            entry = old.classes.get(name)
            if entry is None:
                raise ClassSetupError(f"class '{name}' is not registered")
            profile = self._calibrated(old.prompts, entry.profile, entry.text, checked, quantile)
            classes = {**old.classes, name: self._entry(old.prompts, profile, entry.text, old.overrides)}
            self._publish(Snapshot(old.prompts, MappingProxyType(classes), old.overrides))
        return profile

    def _score_only(self, prompts: PromptState, text: ClassText, frames: Sequence[np.ndarray]) -> np.ndarray:
        scores = []
        step = self.batch_sizes[-1]
        for start in range(0, len(frames), step):
            chunk = list(frames[start : start + step])
            with torch.inference_mode(), self._autocast():
                out, _ = self._score(prompts, [text] * len(chunk), chunk)
            scores.append(out.scores[: len(chunk)].float().cpu().numpy())  # not the padding rows
        return np.concatenate(scores)

    def profile(self, product_class: str) -> ClassProfile | None:
        entry = self._snapshot.classes.get(normalise_class_name(product_class))
        return entry.profile if entry else None

    def registered_classes(self) -> list[str]:
        return sorted(self._snapshot.classes)

    def class_info(self, product_class: str) -> dict[str, Any]:
        """What the engine knows about a product class: class word and why, vocabulary, threshold and why."""
        name = normalise_class_name(product_class)
        entry = self._snapshot.classes.get(name)
        value, source = self.threshold(name)
        if entry is None:
            return {"product_class": name, "registered": False, "threshold": value, "threshold_source": source}
        p = entry.profile
        return {
            "product_class": name,
            "registered": True,
            "class_word": p.class_word,
            "class_word_source": p.class_word_source,
            "cnf": p.cnf,
            "defect_types": list(p.defect_types),
            "threshold": value,
            "threshold_source": source,
            "stale_reason": entry.stale_reason,
            "calibration": None
            if p.calibration is None
            else {k: getattr(p.calibration, k) for k in ("threshold", "quantile", "images", "prompt_version")},
        }

    def info(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.name,
            "weights": self.backbone.weights,
            "device": str(self.device),
            "precision": self.precision,
            "image_size": self.config.image_size,
            "layers": self.layers,
            "vv_from_layer": self.vv_from,
            "prompt_version": self.prompt_version,
            "batch_sizes": self.batch_sizes,
            "classes": self.registered_classes(),
        }

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
        snap = self._snapshot
        pending = PendingBatch(self, snap, len(frames), started)
        good: list[tuple[int, np.ndarray, str]] = []
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

    def _run(self, snap: Snapshot, items: list[tuple[int, np.ndarray, str]], pending: PendingBatch) -> None:
        """Queue a sub-batch; on out-of-memory, free the cache and retry in halves."""
        try:
            if self.fault_hook is not None:
                self.fault_hook(len(items))
            with torch.inference_mode(), self._autocast():
                texts = [snap.classes[name].text for _, _, name in items]
                out, groups = self._score(snap.prompts, texts, [frame for _, frame, _ in items])
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
        self, prompts: PromptState, texts: list[ClassText], frames: list[np.ndarray]
    ) -> tuple[Scores, list[list[int]]]:
        """The one scoring path, on a batch padded to a fixed size so compiled graphs are reused."""
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
        )
        return out, list(groups.values())

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

    def _assemble(
        self, snap: Snapshot, entry: ClassEntry, frame: np.ndarray, host: dict[str, Any], j: int, index: int
    ) -> Prediction | FrameError:
        score = float(host["scores"][j])
        global_p = float(host["global"][j])
        anomaly_map = host["maps"][j].copy()  # owned: holds no reference to the batch's buffer
        map_max = float(anomaly_map.max())
        if not (np.isfinite(score) and np.isfinite(global_p) and np.isfinite(map_max)):
            # NaN compares false with any threshold: it would pass a part as OK. Say so instead.
            name = entry.profile.product_class
            return FrameError(index, name, f"the engine produced a non-finite score ({score}, map max {map_max})")
        is_ng = score >= entry.threshold
        map_t = region_threshold(entry.threshold, global_p, self.config.score_alpha, map_max, is_ng)
        defects = (  # an OK frame's map stays below map_t everywhere: no regions to look for
            find_defects(
                anomaly_map,
                map_t,
                frame.shape[:2],
                host["types"].get(j),
                list(entry.text.defect_names),
                self.config.min_defect_area,
                keep_peak=True,
            )
            if is_ng
            else []
        )
        return Prediction(
            product_class=entry.profile.product_class,
            score=score,
            threshold=entry.threshold,
            threshold_source=entry.threshold_source,
            is_anomalous=is_ng,
            anomaly_map=anomaly_map,
            frame_size=(int(frame.shape[0]), int(frame.shape[1])),
            defects=defects,
            prompt_version=snap.prompts.version,
            global_score=global_p,
            map_max=map_max,
            map_threshold=map_t,
            class_word=entry.profile.class_word,
            class_word_source=entry.profile.class_word_source,
        )

    def warmup(self) -> float:
        """Run every padded batch size once on this thread (compile, CUDA graphs, kernels); returns seconds.

        Call it on the thread that will call `predict`: CUDA graph trees are recorded per thread.
        """
        started = time.perf_counter()
        prompts = self._snapshot.prompts
        size = self.config.image_size
        word = next(iter(self._snapshot.classes.values()), None)
        text = word.text if word else self._class_text(prompts.model, self._placeholder_profile())
        frame = np.zeros((size, size, 3), np.uint8)
        for batch in self.batch_sizes:
            with torch.inference_mode(), self._autocast():
                HostTransfer(*self._score(prompts, [text] * batch, [frame] * batch), batch).result()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    def _placeholder_profile(self) -> ClassProfile:
        return ClassProfile(
            "object", "object", "generic", self.backbone.name, self.backbone.weights, tuple(self.config.defect_types)
        )

    # --- export ------------------------------------------------------------------------------------------
    def cpu_copy(self) -> tuple[GenClip, PromptState]:
        """A CPU fp32 copy of the running prompt model (for export), leaving the engine on its device."""
        prompts = self._snapshot.prompts
        model = copy.deepcopy(prompts.model).to("cpu").float().eval()
        return model, replace(prompts, model=model, query_text=prompts.query_text.detach().to("cpu").float())


class HostTransfer:
    """The real (unpadded) rows of every output of a sub-batch, on their way to host memory.

    On a GPU: one asynchronous device-to-host copy into pinned memory, with an event to wait on, so
    nothing syncs until the results are wanted (one sync per batch). On a CPU: views, no copy.
    """

    def __init__(self, out: Scores, groups: list[list[int]], n: int) -> None:
        self._types_rows = [[(k, i) for k, i in enumerate(indices) if i < n] for indices in groups]
        parts = [out.scores[:n], out.global_probability[:n], out.maps[:n]]
        for rows, probs in zip(self._types_rows, out.type_probabilities, strict=True):
            parts.append(probs[[k for k, _ in rows]] if len(rows) < probs.shape[0] else probs)
        self._shapes = [tuple(p.shape) for p in parts]
        self._lock = threading.Lock()
        self._pieces: list[np.ndarray] | None = None
        if parts[0].device.type == "cuda":
            flat = torch.cat([p.float().reshape(-1) for p in parts])
            self._staging: torch.Tensor | None = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self._staging.copy_(flat, non_blocking=True)  # the pinned block comes from torch's cache
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(flat.device))
        else:  # already in host memory
            self._pieces = [p.float().numpy() for p in parts]

    def wait(self) -> None:
        """Block until the copy has landed (the device has finished this sub-batch).

        Then the values move to ordinary memory and the pinned block goes back to torch's cache at once:
        batches waiting for the result thread hold no pinned memory, which stays a few batches' worth.
        """
        with self._lock:
            if self._pieces is not None:
                return
            self._event.synchronize()
            values = self._staging.numpy().copy()
            self._staging = None
            pieces, start = [], 0
            for shape in self._shapes:
                size = int(np.prod(shape))
                pieces.append(values[start : start + size].reshape(shape))
                start += size
            self._pieces = pieces

    def result(self) -> dict[str, Any]:
        self.wait()
        scores, global_p, maps, *type_blocks = self._pieces
        types: dict[int, np.ndarray] = {}
        for rows, block in zip(self._types_rows, type_blocks, strict=True):
            for j, (_, i) in enumerate(rows):
                types[i] = block[j]
        return {"scores": scores, "global": global_p, "maps": maps, "types": types}


class PendingBatch:
    """A launched batch: its device work queued, its results built on the first `outcomes()` call."""

    def __init__(self, engine: Engine, snap: Snapshot, size: int, started: float) -> None:
        self._engine = engine
        self._snap = snap
        self._started = started
        self._results: list[Prediction | FrameError | None] = [None] * size
        self._parts: list[tuple[list[tuple[int, np.ndarray, str]], HostTransfer]] = []
        self._lock = threading.Lock()
        self._built = False
        self.errors = 0
        self.seconds: float | None = None  # launch to results on the host, once known

    def fail(self, error: FrameError) -> None:
        self._results[error.index] = error
        self.errors += 1

    def add(self, items: list[tuple[int, np.ndarray, str]], transfer: HostTransfer) -> None:
        self._parts.append((items, transfer))

    def wait(self) -> None:
        """Block until the device has finished this batch (not the host part)."""
        for _, transfer in self._parts:
            transfer.wait()
        if self.seconds is None:
            self.seconds = time.perf_counter() - self._started

    def outcomes(self) -> list[Prediction | FrameError]:
        """One result per frame, in order; safe to call from any thread, more than once."""
        with self._lock:
            if not self._built:
                self.wait()
                snap = self._snap
                for items, transfer in self._parts:
                    host = transfer.result()
                    for j, (index, frame, name) in enumerate(items):
                        self._results[index] = self._engine._assemble(snap, snap.classes[name], frame, host, j, index)
                self._parts = []  # the device outputs and frames are no longer needed
                self._built = True
                self._engine.stats.last_batch_ms = (time.perf_counter() - self._started) * 1000
        return list(self._results)  # type: ignore[arg-type]
