"""GenCLIP as one plain nn.Module: frozen CLIP towers plus the learned prompts and adapters.

Shared by the engine (inference) and the trainer (losses); it knows nothing of
frames, caches or training loops. Only `prompts` and `adapters` have gradients.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import Backbone
from model.config import EngineConfig
from model.memory import MemoryGroup, apply_memory
from model.prompts import PatchAdapters, PromptLearner, PromptShape, Suffix
from model.scoring import (
    abnormal_probability,
    global_abnormal_probability,
    image_score,
    scaled_sigma,
    state_logits,
    upsample_and_blur,
)
from model.text import TextEncoder
from model.vision import PatchEncoder, VisionOutput, default_layers

QUERY_CLASS_WORD = "object"


@dataclass
class ImageFeatures:
    """Per batch: normalised global embedding [B, D], patch features [B, L, HW, D], MVP offsets [B, L, W]."""

    global_embedding: torch.Tensor
    patches: torch.Tensor
    vision_prompts: torch.Tensor
    grid: int
    tokens: list[torch.Tensor] | None = None  # the used layers' ln_post tokens [B, HW, W] (the patch memory's)


@dataclass(frozen=True)
class ScoringSettings:
    """The numbers that turn features into maps and scores; a calibration is only valid for the same ones."""

    image_size: int
    branch_weight: float
    score_alpha: float
    blur_sigma: float  # at 518 px, scaled with image_size

    @classmethod
    def from_config(cls, config: EngineConfig) -> ScoringSettings:
        return cls(config.image_size, config.branch_weight, config.score_alpha, config.blur_sigma)

    @property
    def sigma(self) -> float:
        return scaled_sigma(self.blur_sigma, self.image_size)


@dataclass
class DefectGroup:
    """Images of one product class in a batch and that class's defect-type text features [K, D]."""

    indices: torch.Tensor
    defect_text: torch.Tensor


@dataclass
class Scores:
    """What the scoring path gives for a batch: image scores, the global term, model-size maps, type probabilities."""

    scores: torch.Tensor  # [B]
    global_probability: torch.Tensor  # [B]
    maps: torch.Tensor  # [B, S, S], fp32
    type_probabilities: list[torch.Tensor]  # per DefectGroup: [n, g, g, K]
    branch_maps: tuple[torch.Tensor, torch.Tensor] | None = None  # zero-shot, few-shot grid maps [B, HW] (collect)


def head_precision(device_type: str) -> contextlib.AbstractContextManager:
    """Everything after the towers runs in fp32, so a threshold calibrated in fp32 holds under bf16 towers."""
    return torch.autocast(device_type, enabled=False)


def prompt_shape(backbone: Backbone, config: EngineConfig, layers: int) -> PromptShape:
    return PromptShape(
        query_tokens=config.query_tokens,
        state_tokens=config.state_tokens,
        defect_tokens=config.defect_tokens,
        layers=layers,
        vision_width=backbone.vision_width,
        text_width=backbone.text_width,
        embed_dim=backbone.embed_dim,
    )


class GenClip(nn.Module):
    """Frozen CLIP + learned prompts: image features, text features, layer maps."""

    sot: torch.Tensor  # a buffer: the start-of-text token's embedding

    def __init__(self, backbone: Backbone, config: EngineConfig, shape: PromptShape | None = None) -> None:
        super().__init__()
        layers = config.layers or default_layers(backbone.depth)
        if layers[-1] > backbone.depth:
            raise ValueError(f"[model].layers {layers} reach past {backbone.name}'s {backbone.depth} blocks")
        vv_from = (config.vv_from_layer or layers[0]) if config.vv_attention else None
        self.layers = layers
        self.vv_from = vv_from
        self.temperature = config.temperature
        self.vision = PatchEncoder(backbone.clip.visual, config.image_size, layers, vv_from)
        self.text = TextEncoder(backbone.clip, backbone.tokenizer)
        self.shape = shape or prompt_shape(backbone, config, len(layers))
        self.prompts = PromptLearner(self.shape, self.text)
        self.adapters = PatchAdapters(self.shape, backbone.clip.visual.proj)
        with torch.no_grad():
            self.register_buffer("sot", self.text.embed([self.text.sot_id]).detach().clone(), persistent=False)
        self.vision.requires_grad_(False)
        self.text.requires_grad_(False)

    def learned_state(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint holds: prompts.* and adapters.*."""
        state = {f"prompts.{k}": v for k, v in self.prompts.state_dict().items()}
        state.update({f"adapters.{k}": v for k, v in self.adapters.state_dict().items()})
        return state

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        prompts = {k.removeprefix("prompts."): v for k, v in state.items() if k.startswith("prompts.")}
        adapters = {k.removeprefix("adapters."): v for k, v in state.items() if k.startswith("adapters.")}
        self.prompts.load_state_dict(prompts, strict=True)
        self.adapters.load_state_dict(adapters, strict=True)

    def train(self, mode: bool = True) -> GenClip:
        """Only the learned parts switch mode; the frozen towers stay in eval (no dropout)."""
        super().train(mode)
        self.vision.eval()
        self.text.eval()
        return self

    # --- images -----------------------------------------------------------------------------
    def encode_image(self, images: torch.Tensor) -> ImageFeatures:
        """images: normalised [B, 3, S, S]."""
        with torch.no_grad():
            out = self.vision(images)
        return self.image_features(out)

    def image_features(self, out: VisionOutput) -> ImageFeatures:
        """Learned adapters and vision prompts on top of the frozen tower's output."""
        tokens = [t.detach().float() for t in out.layer_tokens]
        return ImageFeatures(
            global_embedding=F.normalize(out.global_embedding.detach().float(), dim=-1),
            patches=self.adapters(tokens),
            vision_prompts=self.prompts.vision_prompts(tokens),
            grid=out.grid,
            tokens=tokens,
        )

    # --- text ------------------------------------------------------------------------------
    def suffix(self, words: str) -> Suffix:
        """Frozen embeddings of '<words>.' + EOT."""
        ids = [*self.text.word_ids(f"{words}."), self.text.eot_id]
        with torch.no_grad():
            return Suffix(embedding=self.text.embed(ids).detach(), length=len(ids))

    def pad_suffixes(self, suffixes: list[Suffix]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack suffixes into [K, S, W] (zero padded after EOT; the causal mask makes padding inert)."""
        longest = max(s.length for s in suffixes)
        width = suffixes[0].embedding.shape[1]
        out = suffixes[0].embedding.new_zeros(len(suffixes), longest, width)
        for i, s in enumerate(suffixes):
            out[i, : s.length] = s.embedding
        lengths = torch.as_tensor([s.length for s in suffixes], device=out.device)
        return out, lengths

    def state_text(self, suffixes: list[Suffix], vision_prompts: torch.Tensor | None) -> torch.Tensor:
        """(normal, abnormal) text features: [K, L, 2, D] with MVP offsets [K, L, W], or [K, 1, 2, D] without."""
        padded, lengths = self.pad_suffixes(suffixes)
        return self.state_text_padded(padded, lengths, vision_prompts)

    def state_text_padded(
        self, padded: torch.Tensor, lengths: torch.Tensor, vision_prompts: torch.Tensor | None, truncate: bool = True
    ) -> torch.Tensor:
        """state_text for suffixes already stacked as [K, S, W] with lengths [K]."""
        prompts, eot = self.prompts.state_prompts(self.sot, padded, lengths, vision_prompts)
        k, layers, two, t, w = prompts.shape
        feats = self.text(prompts.reshape(-1, t, w), eot.reshape(-1), truncate=truncate)
        return feats.view(k, layers, two, -1)

    def query_text(self) -> torch.Tensor:
        """F_Q: query-only (normal, abnormal) features for the word 'object', no MVP: [2, D]."""
        return self.state_text([self.suffix(QUERY_CLASS_WORD)], None)[0, 0]

    def defect_text(self, defect_names: list[str], class_word: str) -> torch.Tensor:
        """Features of '[W][A] <defect> <class> .' per defect name: [K, D]."""
        padded, lengths = self.pad_suffixes([self.suffix(f"{d} {class_word}") for d in defect_names])
        prompts, eot = self.prompts.defect_prompts(self.sot, padded, lengths)
        return self.text(prompts, eot)

    # --- maps ------------------------------------------------------------------------------
    def layer_logits(self, features: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """[B, L, HW, 2] logits of patches against text [2, D] or [B, L, 2, D]."""
        return state_logits(features.patches, text, self.temperature)

    def layer_maps(self, features: ImageFeatures, text: torch.Tensor) -> torch.Tensor:
        """Per-layer anomaly maps p_abn on the patch grid: [B, L, HW]."""
        return abnormal_probability(self.layer_logits(features, text))

    def defect_logits(self, features: ImageFeatures, defect_text: torch.Tensor) -> torch.Tensor:
        """[B, L, HW, K] logits of patches against K defect-type features."""
        return features.patches @ defect_text.float().t() / self.temperature

    # --- the one scoring path (engine, warm-up, export, trainer validation) ----------------------------
    def score(
        self,
        images: torch.Tensor,
        query_text: torch.Tensor,
        suffixes: torch.Tensor,
        suffix_lengths: torch.Tensor,
        settings: ScoringSettings,
        defect_groups: Sequence[DefectGroup] = (),
        *,
        vision: Callable[[torch.Tensor], VisionOutput] | None = None,
        truncate_text: bool = True,
        text_in_fp32: bool = False,
        memory: Sequence[MemoryGroup] = (),
    ) -> Scores:
        """Normalised images [B, 3, S, S] -> scores and maps.

        suffixes [B, T, W] / suffix_lengths [B]: each image's class words (see `pad_suffixes`).
        The towers run under whatever autocast the caller set; the head always in fp32.
        `vision` replaces the image tower (a torch.compile'd or low-precision copy); `text_in_fp32` runs the
        per-image text outside the caller's autocast. `memory`: rows fused with their class's patch memory
        (`model/memory.py`); without it, the zero-shot maps exactly.
        """
        out = (vision if vision is not None else self.vision)(images)
        with head_precision(images.device.type):
            feats = self.image_features(out)
        enhanced = None
        if settings.branch_weight > 0:
            fp32 = torch.autocast(images.device.type, enabled=False) if text_in_fp32 else contextlib.nullcontext()
            with fp32:
                enhanced = self.state_text_padded(
                    suffixes, suffix_lengths, feats.vision_prompts, truncate=truncate_text
                )
        return self.head(feats, query_text, enhanced, settings, defect_groups, memory)

    def head(
        self,
        feats: ImageFeatures,
        query_text: torch.Tensor,
        enhanced_text: torch.Tensor | None,
        settings: ScoringSettings,
        defect_groups: Sequence[DefectGroup] = (),
        memory: Sequence[MemoryGroup] = (),
    ) -> Scores:
        """Cosines, softmax, fusion, blur, image score and defect-type probabilities, in fp32."""
        with head_precision(feats.patches.device.type):
            query_text = query_text.float()
            fused = self.layer_maps(feats, query_text).mean(dim=1)
            if enhanced_text is not None:
                enhanced = self.layer_maps(feats, enhanced_text.float()).mean(dim=1)
                fused = settings.branch_weight * enhanced + (1.0 - settings.branch_weight) * fused
            branches = None
            if memory:
                assert feats.tokens is not None
                fused, branches = apply_memory(fused, feats.tokens, feats.patches, memory)
            maps = upsample_and_blur(fused, settings.image_size, settings.sigma)
            global_p = global_abnormal_probability(feats.global_embedding, query_text, self.temperature)
            scores = image_score(global_p, maps, settings.score_alpha)
            types = []
            g = feats.grid
            for group in defect_groups:
                sub = ImageFeatures(
                    feats.global_embedding[group.indices], feats.patches[group.indices], feats.vision_prompts, g
                )
                probs = self.defect_logits(sub, group.defect_text).softmax(dim=-1).mean(dim=1)
                types.append(probs.view(len(group.indices), g, g, -1))
        return Scores(
            scores=scores, global_probability=global_p, maps=maps, type_probabilities=types, branch_maps=branches
        )
