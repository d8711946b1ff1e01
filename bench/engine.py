"""Engine throughput and latency: images/s and ms per batch, per backbone, batch size and branch mode.

    python bench/engine.py                      # genclip-tiny and ViT-B-16 (random weights), batch 1, 8, 32
    python bench/engine.py --json               # machine-readable
    python bench/engine.py --backbone ViT-L-14-336 --image-size 518 --precision bf16 --device cuda

Each measurement is `Engine.predict` on camera-sized uint8 frames, end to end:
upload, resize, both branches (or query-only), fusion, blur, frame-size maps,
defect regions. Random weights score meaninglessly but cost exactly what real
ones cost. Figures go to stdout; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model import Engine, EngineConfig


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def measure(engine: Engine, batch: int, frames: list[np.ndarray], repeats: int, classes: list[str]) -> dict:
    inputs = (frames * (batch // len(frames) + 1))[:batch]
    names = (classes * (batch // len(classes) + 1))[:batch]
    engine.predict(inputs, names)  # warm: class text, allocator, kernels
    times = []
    for _ in range(repeats):
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        engine.predict(inputs, names)
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {
        "batch": batch,
        "images_per_s": round(batch / median, 2),
        "ms_per_batch_median": round(median * 1000, 2),
        "ms_per_batch_min": round(min(times) * 1000, 2),
        "ms_per_batch_max": round(max(times) * 1000, 2),
        "ms_per_image": round(median * 1000 / batch, 2),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", help="repeatable; default genclip-tiny and ViT-B-16")
    parser.add_argument("--batch", type=int, action="append", help="repeatable; default 1, 8, 32")
    parser.add_argument("--image-size", type=int, help="default: the backbone's native size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--frame", default="640x480", help="camera frame WxH fed to the engine")
    parser.add_argument("--repeats", type=int, help="timed batches per point (default 5, 3 for big backbones)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the image path")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args()

    backbones = args.backbone or ["genclip-tiny", "ViT-B-16"]
    batches = args.batch or [1, 8, 32]
    width, height = (int(v) for v in args.frame.lower().split("x"))
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(4)]
    classes = ["bottle", "metal nut"]
    results = []
    for name in backbones:
        base = EngineConfig(
            backbone=name, pretrained="random", device=args.device, precision=args.precision, compile=args.compile
        )
        engine = Engine(base)
        size = args.image_size or engine.backbone.native_image_size
        for mode, weight in (("dual-branch", 0.5), ("query-only", 0.0)):
            cfg = base.model_copy(update={"image_size": size, "branch_weight": weight})
            engine = Engine(cfg, backbone=engine.backbone, max_batch=max(batches))
            for class_name in classes:
                engine.register_class(class_name)
            warm = engine.warmup()
            repeats = args.repeats or (5 if engine.backbone.vision_width < 512 else 3)
            for batch in batches:
                point = measure(engine, batch, frames, repeats, classes)
                point.update(backbone=name, image_size=size, mode=mode, device=str(engine.device))
                point["precision"] = engine.info()["precision"]
                point["warmup_s"] = round(warm, 2)
                results.append(point)
                if not args.json:
                    print(
                        f"{name:14s} {size:4d}px {mode:12s} batch {batch:3d}: {point['images_per_s']:8.2f} img/s, "
                        f"{point['ms_per_batch_median']:9.1f} ms/batch ({point['ms_per_image']:.1f} ms/img)",
                        flush=True,
                    )
    report = {"machine": machine(), "frame": args.frame, "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        m = report["machine"]
        threads = m["torch_threads"]
        print(f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({threads} threads), gpu {m['gpu']}")


if __name__ == "__main__":
    main()
