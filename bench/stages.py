"""Where the time of `Engine.predict` goes, per stage, at batch 1 against batch 8.

    python -m bench.stages --backbone ViT-B-16 --image-size 512 --rounds 5
    python -m bench.stages --maps          # the anomaly-map head: full-size blur vs one matrix

Each stage of the engine's scoring path is wrapped with a timer (preprocessing, vision
tower, adapters and vision prompts, per-image text, head, regions); rounds interleave batch
1, batch 8 and batch 8 with the tower run one image at a time. Per-round ratios b1/variant
(above 1: the variant is faster) are printed for the total, the tower and the rest.
"""

from __future__ import annotations

import argparse
import collections
import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch


def _timed(store: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        began = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            store[name] += time.perf_counter() - began

    return wrapper


def stage_times(backbone: str, image_size: int | None, precision: str, rounds: int, batch: int = 8) -> None:
    from model import Engine, EngineConfig
    from model.vision import VisionOutput

    config = EngineConfig(backbone=backbone, pretrained="random", device="cpu", precision=precision)
    if image_size:
        config = config.model_copy(update={"image_size": image_size})
    engine = Engine(config, max_batch=batch)
    engine.classes.register("bottle")
    engine.warmup()
    spent: dict[str, float] = collections.defaultdict(float)
    tower = engine._base.vision

    def tower_per_image(images: torch.Tensor) -> VisionOutput:
        parts = [tower(one) for one in images.split(1)]
        return VisionOutput(
            torch.cat([p.global_embedding for p in parts]),
            [torch.cat(layer) for layer in zip(*(p.layer_tokens for p in parts), strict=True)],
            tower.grid,
        )

    model = engine.snapshot.prompts.model
    model.state_text_padded = _timed(spent, "text", model.state_text_padded)
    model.head = _timed(spent, "head", model.head)
    model.image_features = _timed(spent, "adapters", model.image_features)
    engine.preprocess = _timed(spent, "preprocess", engine.preprocess)
    engine.assemble = _timed(spent, "regions", engine.assemble)
    variants = {
        "batch 1": (1, _timed(spent, "tower", tower)),
        f"batch {batch}": (batch, _timed(spent, "tower", tower)),
        f"batch {batch}, tower per image": (batch, _timed(spent, "tower", tower_per_image)),
    }
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (480, 640, 3), dtype=np.uint8) for _ in range(batch)]
    results: dict[str, list[tuple[float, dict[str, float]]]] = collections.defaultdict(list)
    print(f"{backbone} {engine.config.image_size}px {engine.precision}, {torch.get_num_threads()} thread(s), ms/img")
    for _ in range(rounds):
        for name, (size, vision) in variants.items():
            engine._vision = vision
            spent.clear()
            began = time.perf_counter()
            for start in range(0, batch, size):
                engine.predict(frames[start : start + size], ["bottle"] * size)
            total = time.perf_counter() - began
            results[name].append((total, dict(spent)))
            parts = ", ".join(f"{k} {v / batch * 1000:.1f}" for k, v in spent.items())
            print(f"  {name}: total {total / batch * 1000:.1f} ({parts})", flush=True)
    print("per-round ratios batch 1 / variant (above 1: faster than batch 1), sorted:")
    first = results["batch 1"]
    for name in list(variants)[1:]:
        rows = results[name]
        total_r = sorted(a[0] / b[0] for a, b in zip(first, rows, strict=True))
        tower_r = sorted(a[1]["tower"] / b[1]["tower"] for a, b in zip(first, rows, strict=True))
        rest = sorted((a[0] - a[1]["tower"]) / (b[0] - b[1]["tower"]) for a, b in zip(first, rows, strict=True))
        print(f"  {name}: total {_fmt(total_r)}; tower {_fmt(tower_r)}; everything else {_fmt(rest)}")


def _fmt(values: list[float]) -> str:
    return " ".join(f"{v:.3f}" for v in values)


def full_size_blur(maps: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """The reference map head: bilinear upsampling to full size, then the separable Gaussian."""
    from model.scoring import gaussian_blur, grid_to_image

    return gaussian_blur(grid_to_image(maps, size), sigma)


def map_head(repeats: int = 20) -> None:
    """The map head's upsampling and blur: full-size (bilinear, then the separable conv) vs U G U^T."""
    from model.scoring import gaussian_blur, grid_to_image, scaled_sigma, upsample_and_blur

    print(f"anomaly-map upsampling + blur, ms per image, {torch.get_num_threads()} thread(s)")
    for grid, size in ((14, 224), (32, 512), (37, 518)):
        sigma = scaled_sigma(4.0, size)
        for batch in (1, 8):
            maps = torch.rand(batch, grid * grid)
            upsample_and_blur(maps, size, sigma)  # builds the operator once

            def run(fn: Callable[[], torch.Tensor], batch: int = batch) -> float:
                began = time.perf_counter()
                for _ in range(repeats):
                    fn()
                return (time.perf_counter() - began) / repeats / batch * 1000

            full = run(functools.partial(full_size_blur, maps, size, sigma))
            matrix = run(functools.partial(upsample_and_blur, maps, size, sigma))
            diff = (gaussian_blur(grid_to_image(maps, size), sigma) - upsample_and_blur(maps, size, sigma)).abs().max()
            print(
                f"  {size}px (grid {grid}), batch {batch}: full-size {full:.2f}, one matrix {matrix:.3f} "
                f"({full / matrix:.0f}x), max difference {float(diff):.1e}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--maps", action="store_true", help="Only the map-head microbenchmark.")
    args = parser.parse_args()
    from bench.engine import quiet_logs_to_stderr
    from model.threads import set_torch_threads

    quiet_logs_to_stderr()
    set_torch_threads(args.threads, 1)
    if args.maps:
        map_head()
    else:
        stage_times(args.backbone, args.image_size, args.precision, args.rounds, args.batch)


if __name__ == "__main__":
    main()
