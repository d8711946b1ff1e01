"""`[model].compile = true` against eager, the same engine config otherwise, in interleaved rounds.

    python -m bench.compiled --backbone ViT-B-16 --precision bf16 --rounds 4

Both engines score the same 8 camera frames at batch 8 after their warm-up (which, compiled,
is where torch.compile spends its time: reported). Per-round ratio eager / compiled (above 1:
compiled is faster) with its spread, and the largest score difference between the two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="genclip-tiny")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args(argv)

    from agent.logs import configure_logging
    from bench.engine import machine_info
    from model import Engine, EngineConfig
    from model.threads import set_torch_threads

    configure_logging("bench", "WARNING", "console", stream=sys.stderr)
    threads = set_torch_threads(args.threads)["threads"]
    frames = [np.random.default_rng(i).integers(0, 256, (480, 640, 3), dtype=np.uint8) for i in range(args.batch)]
    classes = ["bottle"] * args.batch
    engines, warmup = {}, {}
    for label, compiled in (("eager", False), ("compiled", True)):
        config = EngineConfig(
            backbone=args.backbone, pretrained="random", device=args.device, precision=args.precision, compile=compiled
        )
        if args.image_size:
            config = config.model_copy(update={"image_size": args.image_size})
        engine = Engine(config, max_batch=args.batch)
        engine.classes.register("bottle")
        warmup[label] = engine.warmup()
        engines[label] = engine
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    for _ in range(args.rounds):
        for label, engine in engines.items():
            began = time.perf_counter()
            engine.predict(frames, classes)
            times[label].append(time.perf_counter() - began)
    eager, compiled = (engines[k].predict(frames, classes) for k in ("eager", "compiled"))
    difference = max(abs(a.score - b.score) for a, b in zip(eager, compiled, strict=True))
    ratios = [e / c for e, c in zip(times["eager"], times["compiled"], strict=True)]
    size = engines["eager"].config.image_size
    print(
        f"{args.backbone} {size} px {engines['eager'].precision} on {args.device}, batch {args.batch}, "
        f"torch threads {threads}, {args.rounds} rounds"
    )
    for label in engines:
        print(
            f"{label:9s} warm-up {warmup[label]:6.1f} s, batch {statistics.median(times[label]) * 1000:8.1f} ms "
            f"({args.batch / statistics.median(times[label]):.2f} img/s)"
        )
    print(f"eager / compiled: {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"largest score difference: {difference:.2e}")
    machine = machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['date']}")


if __name__ == "__main__":
    main()
