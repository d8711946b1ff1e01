"""Small builders shared by the tests: tiny configs, perturbed checkpoints, random frames."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.backbone import Backbone
from model.checkpoint import save_model
from model.config import EngineConfig
from model.genclip import GenClip


def tiny_config(**overrides: Any) -> EngineConfig:
    """genclip-tiny on the CPU, as tests and CI run it."""
    overrides.setdefault("pretrained", "random")
    return EngineConfig(backbone="genclip-tiny", device="cpu", **overrides)


def frames(count: int, seed: int = 0, size: tuple[int, int] = (120, 160)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(count)]


def perturbed_checkpoint(
    path: Path,
    backbone: Backbone,
    config: EngineConfig,
    seed: int = 1,
    scale: float = 0.05,
    meta: dict[str, Any] | None = None,
) -> GenClip:
    """A checkpoint whose learned tensors differ from the untrained ones by seeded noise."""
    model = GenClip(backbone, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(model.prompts.parameters()) + list(model.adapters.parameters()):
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    save_model(path, model, backbone, config.image_size, meta)
    return model
