"""Multi-layer patch features from a frozen open_clip ViT, with AnomalyCLIP's value-value stream.

The CLIP stream runs unchanged (it gives the global image feature); beside it,
from block `vv_from` on, a second stream adds value-value attention outputs
computed from `ln_1` of the CLIP stream, and has no MLP. Patch tokens of the
used layers come from that second stream where it exists. Nothing is written in
place, so each used layer keeps its own tokens (AnomalyCLIP issues #18, #64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.backbone import OpenClipModule


@dataclass
class VisionOutput:
    """What one image batch gives: the CLIP image embedding and per-layer patch tokens."""

    global_embedding: torch.Tensor  # [B, D], CLIP's own image embedding (ln_post, proj), not normalised
    layer_tokens: list[torch.Tensor]  # per used layer: [B, HW, width], ln_post applied
    grid: int  # patches per side


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, head width] -> [B, T, width]."""
    b, heads, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, heads * d)


def default_layers(depth: int) -> list[int]:
    """depth/4, depth/2, 3*depth/4, depth (1-based), as in AnomalyCLIP's 6, 12, 18, 24 for 24 blocks."""
    return sorted({max(1, round(depth * k / 4)) for k in (1, 2, 3, 4)})


def resize_position_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Bilinear (align_corners=False) resize of the patch position grid; the class position is kept."""
    old = round((pos.shape[0] - 1) ** 0.5)
    if old == grid:
        return pos.clone()
    patches = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches.float(), size=(grid, grid), mode="bilinear", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(pos.dtype)
    return torch.cat([pos[:1], patches], dim=0)


def _standard_block(block: nn.Module) -> bool:
    """An open_clip ResidualAttentionBlock with plain multi-head self-attention (no extra norms)."""
    attn = getattr(block, "attn", None)
    return (
        isinstance(attn, nn.MultiheadAttention)
        and attn._qkv_same_embed_dim
        and attn.bias_k is None
        and not attn.add_zero_attn
        and isinstance(getattr(block, "ln_attn", nn.Identity()), nn.Identity)
        and all(hasattr(block, name) for name in ("ln_1", "ln_2", "ls_1", "ls_2", "mlp"))
    )


class PatchEncoder(nn.Module):
    """Runs the frozen ViT once and returns the global embedding plus the used layers' patch tokens."""

    position_embedding: torch.Tensor  # a buffer

    def __init__(self, visual: OpenClipModule, image_size: int, layers: list[int], vv_from: int | None) -> None:
        super().__init__()
        patch = visual.conv1.kernel_size[0]
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the backbone's patch size {patch}")
        depth = len(visual.transformer.resblocks)
        if layers[-1] > depth:
            raise ValueError(f"layers {layers} reach past the backbone's {depth} blocks")
        self.visual: OpenClipModule = visual
        self.layers = list(layers)
        self.vv_from = vv_from
        self.grid = image_size // patch
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        self.register_buffer(
            "position_embedding", resize_position_embedding(visual.positional_embedding.detach(), self.grid)
        )

    def _block(self, block: OpenClipModule, x: torch.Tensor) -> torch.Tensor:
        if self.batch_first and _standard_block(block):
            return self.sdpa_block(block, x)
        if self.batch_first:
            return block(x)
        return block(x.transpose(0, 1)).transpose(0, 1)

    @staticmethod
    def sdpa_block(block: OpenClipModule, x: torch.Tensor) -> torch.Tensor:
        """open_clip's residual block with `F.scaled_dot_product_attention` for its self-attention.

        Same weights and arithmetic as `block(x)`, but torch's fused attention kernels (flash or
        memory-efficient on CUDA, a tiled kernel on the CPU) never hold the [B, heads, T, T] matrix
        that nn.MultiheadAttention's fast path builds: at 512 px (1025 tokens) that matrix made a
        batch of 8 slower per image than a batch of 1 on the CPU.
        """
        q, k, v = PatchEncoder._qkv(block, x)
        x = x + block.ls_1(block.attn.out_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v))))
        return x + block.ls_2(block.mlp(block.ln_2(x)))

    @staticmethod
    def sdpa_block_with_vv(block: OpenClipModule, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`sdpa_block(block, x)` and the V-V stream's update `ls_1(value_value_attention(block, ln_1(x)))`,
        sharing one ln_1 and one qkv projection: the V-V stream's v is the CLIP stream's v."""
        q, k, v = PatchEncoder._qkv(block, x)
        update = block.ls_1(block.attn.out_proj(_merge_heads(F.scaled_dot_product_attention(v, v, v))))
        x = x + block.ls_1(block.attn.out_proj(_merge_heads(F.scaled_dot_product_attention(q, k, v))))
        return x + block.ls_2(block.mlp(block.ln_2(x))), update

    @staticmethod
    def _qkv(block: OpenClipModule, x: torch.Tensor) -> torch.Tensor:
        """q, k, v stacked as [3, B, heads, T, head width], from ln_1(x) and the block's in-projection."""
        b, t, width = x.shape
        heads = block.attn.num_heads
        qkv = F.linear(block.ln_1(x), block.attn.in_proj_weight, block.attn.in_proj_bias)
        return qkv.view(b, t, 3, heads, width // heads).permute(2, 0, 3, 1, 4)

    @staticmethod
    def value_value_attention(block: OpenClipModule, x: torch.Tensor) -> torch.Tensor:
        """softmax(v v^T / sqrt(d)) v per head, with the block's own v projection and out_proj."""
        attn = block.attn
        width = x.shape[-1]
        heads = attn.num_heads
        weight = attn.in_proj_weight[2 * width :]
        bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
        v = F.linear(x, weight, bias)
        b, t, _ = v.shape
        v = v.view(b, t, heads, width // heads).transpose(1, 2)
        return attn.out_proj(_merge_heads(F.scaled_dot_product_attention(v, v, v)))

    def forward(self, images: torch.Tensor) -> VisionOutput:
        visual = self.visual
        x = visual.conv1(images.to(visual.conv1.weight.dtype))
        x = x.flatten(2).transpose(1, 2)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.position_embedding.to(x.dtype)
        x = visual.ln_pre(x)
        vv: torch.Tensor | None = None
        taken: list[torch.Tensor] = []
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            if self.vv_from is None or index < self.vv_from:
                x = self._block(block, x)
            elif self.batch_first and _standard_block(block):
                x_in = x
                x, update = self.sdpa_block_with_vv(block, x)
                vv = (x_in if vv is None else vv) + update
            else:
                update = block.ls_1(self.value_value_attention(block, block.ln_1(x)))
                vv = (x if vv is None else vv) + update
                x = self._block(block, x)
            if index in self.layers:
                taken.append(vv if vv is not None else x)
        global_embedding = visual.ln_post(x[:, 0])
        if visual.proj is not None:
            global_embedding = global_embedding @ visual.proj
        tokens = [visual.ln_post(t[:, 1:]) for t in taken]
        return VisionOutput(global_embedding=global_embedding, layer_tokens=tokens, grid=self.grid)
