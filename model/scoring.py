"""From features to anomaly maps and scores; plain tensor functions shared by engine and trainer.

With two prompts, the per-patch softmax gives p_abn = 1 - p_norm, so the layer map
(p_abn + 1 - p_norm) / 2 of AnomalyCLIP and AdaCLIP is p_abn itself: computed here as
sigmoid((cos_abn - cos_norm) / tau). Bilinear upsampling is linear, so combining
layers and branches on the patch grid and upsampling once gives the same map as
upsampling every layer first, as the reference code does. The blur is linear and
separable too, so upsampling and blur together are one [S, g] matrix per axis:
map = U G U^T, about 100x cheaper than blurring the full-size map (`upsample_and_blur`).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F


def state_logits(patches: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits [.., HW, 2] of patch features against (normal, abnormal) text features.

    patches [B, L, HW, D]; text [2, D] (shared) or [B, L, 2, D] (per image and layer).
    """
    sims = patches @ text.t() if text.dim() == 2 else torch.einsum("blpd,blkd->blpk", patches, text)
    return sims.float() / temperature


def abnormal_probability(logits: torch.Tensor) -> torch.Tensor:
    """p_abn of a (normal, abnormal) softmax: the layer's anomaly map."""
    return torch.sigmoid(logits[..., 1] - logits[..., 0])


def global_abnormal_probability(image: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """Abnormal probability of normalised image embeddings [B, D] against query-only text [2, D]."""
    logits = image.float() @ text.float().t() / temperature
    return torch.softmax(logits, dim=-1)[:, 1]


def gaussian_kernel(sigma: float, device: torch.device | None = None) -> torch.Tensor:
    """1-D Gaussian with scipy's default truncation (radius = int(4 sigma + 0.5))."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def _symmetric_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    size = x.shape[dim]
    if radius <= size:
        before = x.narrow(dim, 0, radius).flip(dim)
        after = x.narrow(dim, size - radius, radius).flip(dim)
        return torch.cat([before, x, after], dim=dim)
    index = torch.arange(-radius, size + radius, device=x.device)
    period = 2 * size
    index = index % period
    index = torch.where(index >= size, period - 1 - index, index)
    return x.index_select(dim, index)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, H, W] maps on their device; edges as scipy's 'reflect' mode."""
    if sigma <= 0:
        return maps
    kernel = gaussian_kernel(sigma, maps.device).to(maps.dtype)
    radius = (kernel.numel() - 1) // 2
    x = maps.unsqueeze(1)
    x = _symmetric_pad(x, radius, dim=3)
    x = F.conv2d(x, kernel.view(1, 1, 1, -1))
    x = _symmetric_pad(x, radius, dim=2)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def scaled_sigma(sigma_at_518: float, image_size: int) -> float:
    """The blur sigma for an input size, scaled from the papers' 4 px at 518 px."""
    return sigma_at_518 * image_size / 518.0


def grid_to_image(maps: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear (align_corners=False) upsampling of [B, HW] patch maps or [B, h, w] maps to size."""
    if maps.dim() == 2:
        side = math.isqrt(maps.shape[1])
        maps = maps.view(maps.shape[0], side, side)
    size = (size, size) if isinstance(size, int) else size
    return F.interpolate(maps.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)


def image_score(global_probability: torch.Tensor, maps: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * global + (1 - alpha) * max(map), per image."""
    return alpha * global_probability + (1.0 - alpha) * maps.flatten(1).amax(dim=1)


OPERATOR_CACHE_SIZE = 32
_operators: dict[tuple[int, int, float, str], torch.Tensor] = {}
_operators_lock = threading.Lock()


def upsample_blur_operator(grid: int, size: int, sigma: float, device: str = "cpu") -> torch.Tensor:
    """U [size, grid]: bilinear upsampling (align_corners=False) then the scipy-style Gaussian, along one axis.

    Built in float64 from the same functions the full-size path uses, so U G U^T equals
    gaussian_blur(grid_to_image(G)) to float rounding. A plain tensor even when first built
    under inference mode, so the trainer can backpropagate through it. Cached per
    (grid, size, sigma, device), except when built inside a trace (torch.export, ONNX export,
    torch.compile): that one is a fake tensor that must die with the trace, or every later
    call would get it back (and `.numpy()` on a score would fail).
    """
    key = (grid, size, float(sigma), str(device))
    cached = _operators.get(key)
    if cached is not None:
        return cached
    operator = _build_upsample_blur_operator(grid, size, float(sigma), str(device))
    if not torch.compiler.is_compiling():
        with _operators_lock:
            while len(_operators) >= OPERATOR_CACHE_SIZE:
                _operators.pop(next(iter(_operators)))  # the oldest
            _operators[key] = operator
    return operator


def _build_upsample_blur_operator(grid: int, size: int, sigma: float, device: str) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        basis = torch.eye(grid, dtype=torch.float64).view(grid, 1, 1, grid)  # each patch column alone
        rows = F.interpolate(basis, size=(1, size), mode="bilinear", align_corners=False)  # [g, 1, 1, S]
        if sigma > 0:
            kernel = gaussian_kernel(sigma).to(torch.float64)
            radius = (kernel.numel() - 1) // 2
            rows = F.conv2d(_symmetric_pad(rows, radius, dim=3), kernel.view(1, 1, 1, -1))
        return rows.view(grid, size).t().contiguous().float().to(device)


def upsample_and_blur(maps: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """[B, HW] square patch maps -> [B, size, size]: gaussian_blur(grid_to_image(maps, size), sigma), as U G U^T."""
    side = math.isqrt(maps.shape[1])
    op = upsample_blur_operator(side, size, float(sigma), str(maps.device))
    return op @ maps.float().view(-1, side, side) @ op.t()
