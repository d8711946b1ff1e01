"""The learned parts of GenCLIP: prompt tokens, vision prompts (MVP) and patch adapters.

Prompts are built in CLIP's token-embedding space:
  normal    [SOT][Q + V_i][N] <class> . [EOT]
  abnormal  [SOT][Q + V_i][A] <class> . [EOT]
  defect d  [SOT][W][A] <d> <class> . [EOT]
where V_i = M_i(mean patch token of layer i) is the Multi-layer Vision Prompt.
Tokens start from the embeddings of plain words ("a photo of a", "flawless ...",
"damaged ...") so untrained prompts behave like hand-written ones; M_i start
at zero and the adapters A_i at CLIP's own output projection, so an untrained
model is plain CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.text import TextEncoder

QUERY_INIT = "a photo of a"
NORMAL_INIT = "flawless perfect good normal"
ABNORMAL_INIT = "damaged broken defective anomalous"
DEFECT_INIT = "photo of"
INIT_SEED = 111


@dataclass(frozen=True)
class PromptShape:
    """Lengths and widths that fix the learned tensors' shapes (and the checkpoint's)."""

    query_tokens: int
    state_tokens: int
    defect_tokens: int
    layers: int
    vision_width: int
    text_width: int
    embed_dim: int


@dataclass
class Suffix:
    """Frozen embeddings of '<words> . [EOT]' for one class (or defect name + class)."""

    embedding: torch.Tensor  # [S, W]
    length: int


def _init_tokens(text: TextEncoder, words: str, count: int, generator: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        ids = text.word_ids(words)[:count]
        base = text.embed(ids).float().cpu() if ids else torch.empty(0, text.width)
    pad = torch.randn(count - base.shape[0], text.width, generator=generator) * 0.02
    return torch.cat([base, pad], dim=0)


class PromptLearner(nn.Module):
    """Q, N, A, W tokens and the per-layer MVP maps M_i; assembles prompt embeddings."""

    def __init__(self, shape: PromptShape, text: TextEncoder | None = None) -> None:
        super().__init__()
        self.shape = shape
        generator = torch.Generator().manual_seed(INIT_SEED)
        w = shape.text_width
        if text is not None:
            self.query = nn.Parameter(_init_tokens(text, QUERY_INIT, shape.query_tokens, generator))
            self.normal = nn.Parameter(_init_tokens(text, NORMAL_INIT, shape.state_tokens, generator))
            self.abnormal = nn.Parameter(_init_tokens(text, ABNORMAL_INIT, shape.state_tokens, generator))
            self.defect = nn.Parameter(_init_tokens(text, DEFECT_INIT, shape.defect_tokens, generator))
        else:
            self.query = nn.Parameter(torch.zeros(shape.query_tokens, w))
            self.normal = nn.Parameter(torch.zeros(shape.state_tokens, w))
            self.abnormal = nn.Parameter(torch.zeros(shape.state_tokens, w))
            self.defect = nn.Parameter(torch.zeros(shape.defect_tokens, w))
        mvp = [nn.Linear(shape.vision_width, w) for _ in range(shape.layers)]
        for m in mvp:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.mvp = nn.ModuleList(mvp)

    def vision_prompts(self, layer_tokens: list[torch.Tensor]) -> torch.Tensor:
        """V_i for each image and layer from the mean patch token: [B, L, W]."""
        return torch.stack([m(t.mean(dim=1)) for m, t in zip(self.mvp, layer_tokens, strict=True)], dim=1)

    def state_prompts(
        self, sot: torch.Tensor, suffixes: torch.Tensor, suffix_lengths: torch.Tensor, offsets: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Normal/abnormal prompt embeddings.

        suffixes [K, S, W] (padded), suffix_lengths [K]; offsets [K, L, W] (MVP) or None.
        Returns embeddings [K, L', 2, T, W] (L' = L, or 1 without offsets) and EOT positions [K, L', 2].
        """
        k, s, w = suffixes.shape
        query = self.query.to(suffixes.dtype)
        if offsets is None:
            q = query.expand(k, 1, -1, -1)
        else:
            q = query.unsqueeze(0).unsqueeze(0) + offsets.to(suffixes.dtype).unsqueeze(2)
        layers = q.shape[1]
        q = q.unsqueeze(2).expand(k, layers, 2, -1, -1)
        states = torch.stack([self.normal, self.abnormal]).to(suffixes.dtype)
        states = states.expand(k, layers, 2, -1, -1)
        start = sot.to(suffixes.dtype).expand(k, layers, 2, 1, w)
        tail = suffixes.view(k, 1, 1, s, w).expand(k, layers, 2, s, w)
        prompts = torch.cat([start, q, states, tail], dim=3)
        head = 1 + self.shape.query_tokens + self.shape.state_tokens
        eot = (head + suffix_lengths - 1).view(k, 1, 1).expand(k, layers, 2)
        return prompts, eot

    def defect_prompts(
        self, sot: torch.Tensor, suffixes: torch.Tensor, suffix_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[SOT][W][A] <defect> <class> . [EOT] for K defect names: embeddings [K, T, W], EOT [K]."""
        k, _s, w = suffixes.shape
        head = torch.cat([self.defect, self.abnormal]).to(suffixes.dtype).expand(k, -1, -1)
        prompts = torch.cat([sot.to(suffixes.dtype).expand(k, 1, w), head, suffixes], dim=1)
        eot = 1 + self.shape.defect_tokens + self.shape.state_tokens + suffix_lengths - 1
        return prompts, eot


class PatchAdapters(nn.Module):
    """A_i: per-layer linear maps from the vision width to the joint space, starting at CLIP's projection."""

    def __init__(self, shape: PromptShape, projection: torch.Tensor | None = None) -> None:
        super().__init__()
        maps = [nn.Linear(shape.vision_width, shape.embed_dim) for _ in range(shape.layers)]
        with torch.no_grad():
            for m in maps:
                if projection is not None:
                    m.weight.copy_(projection.detach().t().float())
                else:
                    nn.init.eye_(m.weight)
                nn.init.zeros_(m.bias)
        self.maps = nn.ModuleList(maps)

    def forward(self, layer_tokens: list[torch.Tensor]) -> torch.Tensor:
        """Normalised patch features [B, L, HW, D]."""
        feats = [m(t) for m, t in zip(self.maps, layer_tokens, strict=True)]
        return torch.nn.functional.normalize(torch.stack(feats, dim=1).float(), dim=-1)
