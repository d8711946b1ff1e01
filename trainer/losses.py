"""Training losses of AnomalyCLIP/GenCLIP: focal + Dice per layer map, image and defect-type cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def focal_loss(probs: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, eps: float = 1e-6) -> torch.Tensor:
    """Focal loss of (normal, abnormal) probabilities [N, 2, H, W] against a {0, 1} mask [N, H, W]."""
    p_true = torch.where(target > 0.5, probs[:, 1], probs[:, 0]).clamp(eps, 1.0)
    return (-((1.0 - p_true) ** gamma) * p_true.log()).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - Dice per image, averaged; pred and target [N, H, W] in [0, 1]."""
    pred, target = pred.flatten(1), target.flatten(1)
    dice = (2 * (pred * target).sum(1) + smooth) / (pred.sum(1) + target.sum(1) + smooth)
    return (1.0 - dice).mean()


def pixel_loss(layer_logits: torch.Tensor, masks: torch.Tensor, image_size: int, gamma: float) -> torch.Tensor:
    """Sum over layers of focal + Dice(abnormal, mask) + Dice(normal, 1 - mask).

    layer_logits [N, L, HW, 2] on the patch grid; masks [N, S, S] in {0, 1}. The per-layer
    probabilities are upsampled bilinearly to the image size first, as the reference code does.
    """
    n, layers, hw, _ = layer_logits.shape
    side = int(hw**0.5)
    probs = layer_logits.float().softmax(dim=-1)  # [N, L, HW, 2]
    probs = probs.permute(0, 1, 3, 2).reshape(n * layers, 2, side, side)
    probs = F.interpolate(probs, size=(image_size, image_size), mode="bilinear", align_corners=False)
    probs = probs.view(n, layers, 2, image_size, image_size)
    total = layer_logits.new_zeros((), dtype=torch.float32)
    for i in range(layers):
        p = probs[:, i]
        total = total + focal_loss(p, masks, gamma) + dice_loss(p[:, 1], masks) + dice_loss(p[:, 0], 1.0 - masks)
    return total


def image_loss(global_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of (normal, abnormal) logits [N, 2] of the global feature against labels [N]."""
    return F.cross_entropy(global_logits.float(), labels)


def top_patch_loss(layer_logits: torch.Tensor, labels: torch.Tensor, share: float = 0.01) -> torch.Tensor:
    """Image-level supervision of the maps (multiple-instance): the mean of each layer's top patches
    must be low on good parts and high on defective ones. BCE, mean over layers.

    The global score alone cannot teach the maps where a defect is, and with image labels only
    the maps are what localises it; this term lets image-level-only data train them.
    """
    n, layers, hw, _ = layer_logits.shape
    k = max(1, round(hw * share))
    abnormal = (layer_logits[..., 1] - layer_logits[..., 0]).float()  # logit of p_abn
    top = abnormal.topk(k, dim=2).values.mean(dim=2)  # [N, L]
    target = labels.float().view(n, 1).expand(n, layers)
    return F.binary_cross_entropy_with_logits(top, target)


def defect_type_loss(
    defect_logits: torch.Tensor, masks: torch.Tensor, defect_index: torch.Tensor, coverage: float = 0.5
) -> torch.Tensor | None:
    """Cross-entropy over defect types on anomalous patches of images whose type is known, mean over layers.

    defect_logits [N, L, HW, K]; masks [N, S, S]; defect_index [N] (-1 = unknown). A patch counts as
    anomalous when at least `coverage` of its pixels are. None when no patch qualifies.
    """
    n, layers, hw, _ = defect_logits.shape
    side = int(hw**0.5)
    patch_cover = F.adaptive_avg_pool2d(masks.unsqueeze(1), side).view(n, hw)
    use = (patch_cover >= coverage) & (defect_index >= 0).view(n, 1)
    if not use.any():
        return None
    targets = defect_index.view(n, 1).expand(n, hw)[use]
    logits = defect_logits.permute(0, 2, 1, 3)[use]  # [P, L, K]
    total = F.cross_entropy(logits[:, 0].float(), targets)
    for i in range(1, layers):
        total = total + F.cross_entropy(logits[:, i].float(), targets)
    return total / layers
