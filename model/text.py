"""CLIP's frozen text transformer, fed with prompts assembled in token-embedding space.

With the causal mask, the EOT output depends only on the tokens up to EOT, so the
transformer runs on the first (max EOT position + 1) positions of a batch instead
of all 77. That changes no number and saves most of the text cost.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import OpenClipModule


class TextEncoder(nn.Module):
    """Prompt embeddings [N, T, W] plus EOT positions -> normalised text features [N, D]."""

    attn_mask: torch.Tensor | None  # a buffer

    def __init__(self, clip: OpenClipModule, tokenizer: OpenClipModule) -> None:
        super().__init__()
        text: OpenClipModule = getattr(clip, "text", clip)
        self.token_embedding: nn.Embedding = text.token_embedding
        self.positional_embedding: torch.Tensor = text.positional_embedding
        self.transformer: OpenClipModule = text.transformer
        self.ln_final: nn.Module = text.ln_final
        self.text_projection: torch.Tensor | nn.Linear | None = text.text_projection
        self.register_buffer("attn_mask", text.attn_mask, persistent=False)
        self.batch_first = getattr(text.transformer, "batch_first", True)
        self.tokenizer = tokenizer
        self.sot_id = int(tokenizer.sot_token_id)
        self.eot_id = int(tokenizer.eot_token_id)
        self.context_length = self.positional_embedding.shape[0]
        self.calls = 0  # text-transformer runs, for cache tests and metrics

    @property
    def width(self) -> int:
        return self.token_embedding.embedding_dim

    def word_ids(self, text: str) -> list[int]:
        """BPE ids of `text`, without start/end tokens."""
        return list(self.tokenizer.encode(text))

    def embed(self, ids: list[int] | torch.Tensor) -> torch.Tensor:
        """Frozen token embeddings for ids; [len, W]."""
        device = self.token_embedding.weight.device
        ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        return self.token_embedding(ids)

    def forward(self, prompts: torch.Tensor, eot: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """Encode prompts [N, T, W] whose EOT tokens sit at positions `eot` [N]."""
        self.calls += 1
        length = int(eot.max()) + 1 if truncate else prompts.shape[1]
        if length > self.context_length:
            raise ValueError(f"prompt of {length} tokens exceeds CLIP's context of {self.context_length}")
        x = prompts[:, :length] + self.positional_embedding[:length].to(prompts.dtype)
        mask = self.attn_mask[:length, :length] if self.attn_mask is not None else None
        if self.batch_first:
            x = self.transformer(x, attn_mask=mask)
        else:
            x = self.transformer(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)
        x = self.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if self.text_projection is not None:
            x = self.text_projection(x) if isinstance(self.text_projection, nn.Linear) else x @ self.text_projection
        return F.normalize(x.float(), dim=-1)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """Plain CLIP text features of whole sentences (for Class Name Filtering)."""
        rows = [[*[self.sot_id, *self.word_ids(t)][: self.context_length - 1], self.eot_id] for t in texts]
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long, device=self.token_embedding.weight.device)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.as_tensor(row)
        eot = torch.as_tensor([len(r) - 1 for r in rows], device=ids.device)
        return self(self.token_embedding(ids), eot)
