"""FLOPs per image of the towers and of the per-image text prompts, counted by torch, not estimated.

    .venv/bin/python -m bench.flops --backbone ViT-L-14-336 --image-size 518

Counts one image through `torch.utils.flop_counter.FlopCounterMode` (matrix products and
attention; elementwise work is not counted): the image tower with its V-V stream, the
dual-branch text (one normal/abnormal prompt pair per layer and image, built from the
image), and the defect-type and query text that the engine builds once per class.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

from agent.logs import configure_logging
from model import Engine, EngineConfig


def count(backbone: str, image_size: int | None) -> dict[str, float]:
    """GFLOP per image: vision tower (+ V-V), per-image text, and per-class text (built once)."""
    config = EngineConfig(backbone=backbone, pretrained="random", device="cpu")
    if image_size:
        config = config.model_copy(update={"image_size": image_size})
    engine = Engine(config, max_batch=1)
    engine.classes.register("bottle")
    model = engine.snapshot.prompts.model
    text = engine.snapshot.classes["bottle"].text
    images = torch.zeros(1, 3, engine.config.image_size, engine.config.image_size)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as vision_count:
            out = model.vision(images)
        feats = model.image_features(out)
        suffixes, lengths = model.pad_suffixes([text.suffix])
        with FlopCounterMode(display=False) as text_count:
            model.state_text_padded(suffixes, lengths, feats.vision_prompts)
        with FlopCounterMode(display=False) as class_count:
            model.defect_text(list(text.defect_names), "bottle")
            model.query_text()
    return {
        "backbone": backbone,
        "image_size": engine.config.image_size,
        "vision_gflop": round(vision_count.get_total_flops() / 1e9, 2),
        "per_image_text_gflop": round(text_count.get_total_flops() / 1e9, 3),
        "per_class_text_gflop": round(class_count.get_total_flops() / 1e9, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", action="append", help="repeatable; default genclip-tiny")
    parser.add_argument("--image-size", type=int, action="append", help="repeatable; default native")
    args = parser.parse_args()
    configure_logging("bench", "WARNING", "console", stream=sys.stderr)
    for backbone in args.backbone or ["genclip-tiny"]:
        for size in args.image_size or [None]:
            print(json.dumps(count(backbone, size)), flush=True)


if __name__ == "__main__":
    main()
