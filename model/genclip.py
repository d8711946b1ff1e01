"""GenCLIP as one plain nn.Module: frozen CLIP towers plus the learned prompts and adapters.

Shared by the engine (inference) and the trainer (losses); it knows nothing of
frames, caches or training loops. Only `prompts` and `adapters` have gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import Backbone
from model.config import EngineConfig
from model.prompts import PatchAdapters, PromptLearner, PromptShape, Suffix
from model.scoring import abnormal_probability, state_logits
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
        tokens = [t.detach() for t in out.layer_tokens]
        return ImageFeatures(
            global_embedding=F.normalize(out.global_embedding.detach().float(), dim=-1),
            patches=self.adapters(tokens),
            vision_prompts=self.prompts.vision_prompts(tokens),
            grid=out.grid,
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
