"""The engine: batches of frames of mixed product classes in, predictions out.

Called from one worker thread. Prompts live in an immutable `PromptState` that
`load_prompts` builds beside the running one and swaps in with one reference
assignment, so a batch in flight finishes on the prompts it started with and a
bad file never disturbs the running state. Text work is cached: the query-only
features once per prompt version, defect-type features once per class and
version, class-name decisions (CNF) and frozen token embeddings once per class.
Only the vision-enhanced prompts, which depend on each image, are encoded per
batch. The engine does no I/O except reading a checkpoint when asked to.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch

from model import checkpoint as ckpt
from model.backbone import Backbone, load_backbone
from model.cnf import TEMPLATE, CnfDecision, decide, not_filtered
from model.config import EngineConfig
from model.genclip import GenClip, ImageFeatures, prompt_shape
from model.preprocess import InvalidFrameError, Preprocessor, check_frame
from model.prompts import PromptShape, Suffix
from model.regions import Defect, find_defects
from model.scoring import gaussian_blur, global_abnormal_probability, grid_to_image, image_score, scaled_sigma

log = structlog.stdlib.get_logger("model.engine")
UNTRAINED = "untrained"


@dataclass
class Prediction:
    """The engine's verdict on one frame."""

    product_class: str
    score: float
    threshold: float
    threshold_source: str  # "config", "checkpoint" or "default"
    is_anomalous: bool
    anomaly_map: np.ndarray  # float32, frame height x width, values in [0, 1]
    defects: list[Defect]
    prompt_version: str
    global_score: float
    map_max: float


@dataclass
class ClassText:
    """Per class and prompt version: the words used and the defect-type text features."""

    used_name: str
    suffix: Suffix
    defect_names: list[str]
    defect_text: torch.Tensor  # [K, D]


@dataclass
class PromptState:
    """One prompt version: its model view (shared frozen towers, own learned tensors) and text cache."""

    model: GenClip
    version: str
    meta: dict[str, Any]
    query_text: torch.Tensor  # F_Q [2, D]
    classes: dict[str, ClassText] = field(default_factory=dict)


@dataclass
class EngineStats:
    """Counters for tests, logs and metrics."""

    batches: int = 0
    frames: int = 0
    class_text_builds: int = 0
    class_text_hits: int = 0
    prompt_swaps: int = 0
    last_batch_ms: float = 0.0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"[model].device is '{name}' but no CUDA device is available (use 'auto' or 'cpu')")
    return device


class Engine:
    """GenCLIP inference on one device; see the module docstring for the threading contract."""

    def __init__(self, config: EngineConfig, *, backbone: Backbone | None = None) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.backbone = backbone or load_backbone(
            config.backbone, config.pretrained, allow_download=config.allow_download, cache_dir=config.cache_dir
        )
        self.backbone.clip.to(self.device)
        if config.image_size % self.backbone.patch_size:
            raise ValueError(
                f"[model].image_size {config.image_size} is not a multiple of {config.backbone}'s "
                f"patch size {self.backbone.patch_size}"
            )
        base = GenClip(self.backbone, config).to(self.device).eval()
        self._base = base
        self.layers = base.layers
        self.vv_from = base.vv_from
        self.preprocess = Preprocessor(config.image_size, self.backbone.mean, self.backbone.std, self.device)
        self.sigma = scaled_sigma(config.blur_sigma, config.image_size)
        self.stats = EngineStats()
        self._swap_lock = threading.Lock()
        self._cnf: dict[str, CnfDecision] = {}
        self._suffixes: dict[str, Suffix] = {}
        self._threshold_overrides: dict[str, float] = {}
        self._vision = base.vision
        if config.compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None  # CUDA graphs on the GPU
            self._vision = torch.compile(base.vision, mode=mode, dynamic=False)
        self._state = self._build_state(config.checkpoint, base=base)
        log.info("engine ready", **self.info())

    # --- prompt states ---------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        """What a checkpoint must match to run on this engine."""
        return ckpt.model_identity(self.backbone, self._base, self.config.image_size)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.config.precision != "fp32":
            dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
            return torch.autocast("cuda", dtype=dtype)
        return contextlib.nullcontext()

    def _build_state(self, path: Path | None, base: GenClip | None = None) -> PromptState:
        if path is None:
            model = base or GenClip(self.backbone, self.config).to(self.device).eval()
            version, meta = UNTRAINED, {}
        else:
            tensors, meta = ckpt.read_checkpoint(path)
            ckpt.check_compatible(meta, self.identity(), str(path))
            shape = self._shape_from(meta, str(path))
            model = GenClip(self.backbone, self.config, shape)
            try:
                model.load_learned_state(tensors)
            except RuntimeError as exc:
                raise ckpt.CheckpointError(f"{path}: learned tensors do not fit this model: {exc}") from None
            model = model.to(self.device).eval()
            version = f"{Path(path).stem}@{ckpt.file_digest(path)[:12]}"
        with torch.inference_mode(), self._autocast():
            query_text = model.query_text()
        return PromptState(model=model, version=version, meta=meta, query_text=query_text)

    def _shape_from(self, meta: dict[str, Any], source: str) -> PromptShape:
        base = prompt_shape(self.backbone, self.config, len(self.layers))
        try:
            return PromptShape(
                query_tokens=int(meta["query_tokens"]),
                state_tokens=int(meta["state_tokens"]),
                defect_tokens=int(meta["defect_tokens"]),
                layers=base.layers,
                vision_width=base.vision_width,
                text_width=base.text_width,
                embed_dim=base.embed_dim,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ckpt.CheckpointError(f"{source}: header lacks prompt lengths ({exc})") from None

    def load_prompts(self, path: Path) -> str:
        """Validate a checkpoint and swap it in between batches; returns the new prompt version.

        On any problem the running prompts stay in place and CheckpointError says why.
        """
        new = self._build_state(Path(path))
        old = self._state
        with torch.inference_mode(), self._autocast():
            for name in list(old.classes):
                new.classes[name] = self._make_class_text(new, name)
        with self._swap_lock:
            self._state = new
            self.stats.prompt_swaps += 1
        log.info("prompts loaded", version=new.version, previous=old.version, path=str(path))
        return new.version

    @property
    def prompt_version(self) -> str:
        return self._state.version

    @property
    def prompt_metadata(self) -> dict[str, Any]:
        return dict(self._state.meta)

    # --- classes -----------------------------------------------------------------------------
    def set_thresholds(self, thresholds: dict[str, float]) -> None:
        """Per-class image-score thresholds from the line's config; they win over the checkpoint's."""
        self._threshold_overrides = dict(thresholds)

    def threshold(self, product_class: str) -> tuple[float, str]:
        if product_class in self._threshold_overrides:
            return float(self._threshold_overrides[product_class]), "config"
        calibrated = self._state.meta.get("thresholds", {})
        if product_class in calibrated:
            return float(calibrated[product_class]), "checkpoint"
        return self.config.default_threshold, "default"

    def register_class(self, name: str, reference_frames: Sequence[np.ndarray] = ()) -> CnfDecision:
        """Decide the class name now (CNF) from reference frames of good or any parts of that class."""
        frames = [check_frame(f, i) for i, f in enumerate(reference_frames)]
        with torch.inference_mode(), self._autocast():
            embeddings = None
            if frames:
                images = self.preprocess(frames)
                embeddings = self._state.model.image_features(self._vision(images)).global_embedding
            return self._decide_name(name, embeddings)

    def _decide_name(self, name: str, image_embeddings: torch.Tensor | None) -> CnfDecision:
        if name in self._cnf:
            return self._cnf[name]
        model = self._state.model
        generic = self.config.cnf_generic_names
        if not self.config.cnf:
            decision = not_filtered(name, "class name filtering is off")
        elif name.strip().lower() in {g.lower() for g in generic}:
            decision = not_filtered(name, "already a generic name")
        elif image_embeddings is None or image_embeddings.shape[0] == 0:
            return not_filtered(name, "no reference images yet")
        else:
            texts = model.text.encode_texts([TEMPLATE.format(n) for n in [name, *generic]])
            decision = decide(name, image_embeddings, texts[0], texts[1:], list(generic), self.config.cnf_margin)
        self._cnf[name] = decision
        log.info("class name decision", product_class=name, used_name=decision.used_name, reason=decision.reason)
        return decision

    def _suffix(self, model: GenClip, words: str) -> Suffix:
        if words not in self._suffixes:
            self._suffixes[words] = model.suffix(words)
        return self._suffixes[words]

    def _make_class_text(self, state: PromptState, name: str) -> ClassText:
        decision = self._cnf.get(name) or not_filtered(name, "undecided")
        defect_names = self.config.defect_vocabulary(name)
        self.stats.class_text_builds += 1
        return ClassText(
            used_name=decision.used_name,
            suffix=self._suffix(state.model, decision.used_name),
            defect_names=defect_names,
            defect_text=state.model.defect_text(defect_names, decision.used_name),
        )

    def _class_text(self, state: PromptState, name: str, embeddings: torch.Tensor) -> ClassText:
        cached = state.classes.get(name)
        if cached is not None:
            self.stats.class_text_hits += 1
            return cached
        self._decide_name(name, embeddings)
        text = self._make_class_text(state, name)
        if name in self._cnf:  # only cache once the name is decided for good
            state.classes[name] = text
        return text

    def class_info(self, name: str) -> dict[str, Any]:
        """What the engine knows about a product class: CNF decision, vocabulary, threshold."""
        decision = self._cnf.get(name)
        value, source = self.threshold(name)
        return {
            "product_class": name,
            "used_name": decision.used_name if decision else None,
            "cnf": decision.as_dict() if decision else None,
            "defect_types": self.config.defect_vocabulary(name),
            "threshold": value,
            "threshold_source": source,
            "text_cached": name in self._state.classes,
        }

    def info(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone.name,
            "weights": self.backbone.weights,
            "device": str(self.device),
            "precision": self.config.precision if self.device.type == "cuda" else "fp32",
            "image_size": self.config.image_size,
            "layers": self.layers,
            "vv_from_layer": self.vv_from,
            "prompt_version": self._state.version,
            "classes": sorted(self._cnf),
        }

    # --- inference ---------------------------------------------------------------------------
    def predict(self, frames: Sequence[np.ndarray], classes: Sequence[str]) -> list[Prediction]:
        """Score a batch of frames (uint8/uint16 BGR HxWx3 or gray HxW, any sizes) of mixed classes."""
        if len(frames) != len(classes):
            raise ValueError(f"{len(frames)} frames but {len(classes)} class names")
        if not frames:
            return []
        checked = [check_frame(f, i) for i, f in enumerate(frames)]
        for i, name in enumerate(classes):
            if not isinstance(name, str) or not name.strip():
                raise InvalidFrameError(i, f"product class must be a non-empty string, got {name!r}")
        state = self._state
        started = time.perf_counter()
        with torch.inference_mode(), self._autocast():
            out = self._forward(state, checked, list(classes))
        predictions = self._assemble(state, checked, list(classes), out)
        self.stats.batches += 1
        self.stats.frames += len(frames)
        self.stats.last_batch_ms = (time.perf_counter() - started) * 1000
        return predictions

    def _forward(self, state: PromptState, frames: list[np.ndarray], classes: list[str]) -> dict[str, Any]:
        model, cfg = state.model, self.config
        images = self.preprocess(frames)
        feats = model.image_features(self._vision(images))
        groups: dict[str, list[int]] = {}
        for i, name in enumerate(classes):
            groups.setdefault(name, []).append(i)
        texts = {name: self._class_text(state, name, feats.global_embedding[idx]) for name, idx in groups.items()}
        fused = model.layer_maps(feats, state.query_text).mean(dim=1)
        if cfg.branch_weight > 0:
            vision_text = model.state_text([texts[c].suffix for c in classes], feats.vision_prompts)
            enhanced = model.layer_maps(feats, vision_text).mean(dim=1)
            fused = cfg.branch_weight * enhanced + (1.0 - cfg.branch_weight) * fused
        maps = gaussian_blur(grid_to_image(fused, cfg.image_size), self.sigma)
        global_p = global_abnormal_probability(feats.global_embedding, state.query_text, model.temperature)
        scores = image_score(global_p, maps, cfg.score_alpha)
        type_probs = self._type_probabilities(model, feats, groups, texts)
        frame_maps = self._frame_maps(maps, frames)
        return {
            "scores": scores.float().cpu().numpy(),
            "global": global_p.float().cpu().numpy(),
            "maps": maps.float().cpu().numpy(),
            "frame_maps": frame_maps,
            "types": type_probs,
        }

    def _type_probabilities(
        self,
        model: GenClip,
        feats: ImageFeatures,
        groups: dict[str, list[int]],
        texts: dict[str, ClassText],
    ) -> dict[int, np.ndarray]:
        """Per image: defect-type probabilities on the patch grid [g, g, K], averaged over layers."""
        out: dict[int, np.ndarray] = {}
        g = feats.grid
        for name, indices in groups.items():
            idx = torch.as_tensor(indices, device=feats.patches.device)
            sub = ImageFeatures(feats.global_embedding[idx], feats.patches[idx], feats.vision_prompts[idx], g)
            probs = model.defect_logits(sub, texts[name].defect_text).softmax(dim=-1).mean(dim=1)
            probs = probs.view(len(indices), g, g, -1).float().cpu().numpy()
            for j, i in enumerate(indices):
                out[i] = probs[j]
        return out

    def _frame_maps(self, maps: torch.Tensor, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Upsample each map to its frame's size on the device (one call per distinct size)."""
        result: list[np.ndarray | None] = [None] * len(frames)
        sizes: dict[tuple[int, int], list[int]] = {}
        for i, frame in enumerate(frames):
            sizes.setdefault(frame.shape[:2], []).append(i)
        for size, indices in sizes.items():
            idx = torch.as_tensor(indices, device=maps.device)
            up = grid_to_image(maps[idx], size).clamp_(0.0, 1.0).cpu().numpy()
            for j, i in enumerate(indices):
                result[i] = up[j]
        return result  # type: ignore[return-value]

    def _assemble(
        self, state: PromptState, frames: list[np.ndarray], classes: list[str], out: dict[str, Any]
    ) -> list[Prediction]:
        predictions = []
        for i, name in enumerate(classes):
            threshold, source = self.threshold(name)
            text = state.classes.get(name)
            defect_names = text.defect_names if text else self.config.defect_vocabulary(name)
            score = float(out["scores"][i])
            defects = find_defects(
                out["maps"][i],
                threshold,
                frames[i].shape[:2],
                out["types"].get(i),
                defect_names,
                self.config.min_defect_area,
            )
            predictions.append(
                Prediction(
                    product_class=name,
                    score=score,
                    threshold=threshold,
                    threshold_source=source,
                    is_anomalous=score >= threshold,
                    anomaly_map=out["frame_maps"][i].astype(np.float32, copy=False),
                    defects=defects,
                    prompt_version=state.version,
                    global_score=float(out["global"][i]),
                    map_max=float(out["maps"][i].max()),
                )
            )
        return predictions

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run dummy batches so the first real frame is not slow (CUDA kernels, compile); returns seconds."""
        started = time.perf_counter()
        size = self.config.image_size
        state = self._state
        with torch.inference_mode(), self._autocast():
            for batch in batch_sizes:
                images = torch.zeros(batch, 3, size, size, device=self.device)
                feats = state.model.image_features(self._vision(images))
                suffix = self._suffix(state.model, "object")
                state.model.layer_maps(feats, state.model.state_text([suffix] * batch, feats.vision_prompts))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - started
