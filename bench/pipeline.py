"""The agent's engine worker at full load, with its pipeline on and off (`[engine].pipeline`).

    python -m bench.pipeline --backbone genclip-tiny --frames 320 --rounds 6 --threads 1

A batcher already holding N synthetic parts (320x240, 20 % defective, two product classes)
is drained by the agent's `InferenceWorker`; a result thread does what the agent's result
stage does, without brokers: each batch's outcomes (maps, defect regions) and each frame's
Inspection (verdict, defects, a map PNG for NG frames as with `[redis].maps = "ng"`).
Pipeline on, that thread builds batch k while the worker scores batch k+1; off, the worker
builds it before taking the next batch. Rounds interleave on and off; per-round ratios
(time off / time on; above 1: the pipeline is faster) are printed with their spread.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from model import Engine

CLASSES = ("widget", "tile")


def synthetic_parts(count: int, seed: int = 0) -> list[np.ndarray]:
    """Frames like the agent's synthetic cameras give (a textured surface, some with a drawn defect)."""
    from synthetic.defects import make_part
    from synthetic.textures import instance_seed, render_texture

    surfaces = [render_texture(("metal", "tiles")[i % 2], instance_seed(seed, i), 400) for i in range(4)]
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(count):
        surface = surfaces[i % len(surfaces)]
        top, left = (int(v) for v in rng.integers(0, 400 - 320, 2))
        parts.append(make_part(rng, np.ascontiguousarray(surface[top : top + 240, left : left + 320]), 0.2).image)
    return parts


def drain(engine: Engine, images: list[np.ndarray], *, pipeline: bool, batch_size: int) -> dict[str, float]:
    """Seconds to score and build every frame, and how many were NG."""
    from agent.batcher import FrameBatcher
    from agent.frames import Frame
    from agent.ledger import FrameLedger
    from agent.results import build_inspection
    from agent.worker import InferenceWorker, LaunchedBatch

    batcher = FrameBatcher(FrameLedger(), batch_size, max_wait_ms=0)
    batcher.add_camera("cam-1", capacity=len(images), policy="block", max_age_ms=0)
    for seq, image in enumerate(images, start=1):
        batcher.put("cam-1", Frame("cam-1", seq, f"part-{seq}", CLASSES[seq % 2], image))
    handed: queue.Queue[LaunchedBatch | None] = queue.Queue()
    verdicts: list[str] = []

    def result_stage() -> None:
        while (scored := handed.get()) is not None:
            for frame, outcome in zip(scored.frames, scored.outcomes(), strict=True):
                inspection = build_inspection(
                    frame, outcome, line="bench", window_s=2.0, maps="ng", map_size=None, model={}
                )
                verdicts.append(inspection.verdict)

    worker = InferenceWorker(lambda: engine, lambda e: None, batcher, handed.put, pipeline="on" if pipeline else "off")
    results = threading.Thread(target=result_stage, name="results")
    worker.start()
    worker.ready.wait()
    results.start()
    started = time.perf_counter()
    batcher.close()
    worker.stop(time.monotonic() + 3600, grace_s=30)
    handed.put(None)
    results.join()
    seconds = time.perf_counter() - started
    if len(verdicts) != len(images):
        raise RuntimeError(f"{len(verdicts)} results for {len(images)} frames")
    return {"seconds": seconds, "ng": sum(v == "NG" for v in verdicts)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="genclip-tiny")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--frames", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", dest="as_json")
    args = parser.parse_args(argv)

    from agent.logs import configure_logging
    from bench.engine import machine_info
    from model import Engine, EngineConfig
    from model.threads import set_torch_threads

    configure_logging("bench", "WARNING", "console", stream=sys.stderr)
    threads = set_torch_threads(args.threads)["threads"]
    config = EngineConfig(backbone=args.backbone, pretrained="random", device="cpu", precision=args.precision)
    if args.image_size:
        config = config.model_copy(update={"image_size": args.image_size})
    engine = Engine(config, max_batch=args.batch)
    for name in CLASSES:
        engine.classes.register(name)
    engine.warmup()
    images = synthetic_parts(args.frames)
    times: dict[str, list[float]] = {"on": [], "off": []}
    ng = None
    drain(engine, images[: args.batch * 2], pipeline=True, batch_size=args.batch)  # first-use costs out of the way
    for _ in range(args.rounds):
        for label in ("on", "off"):
            run = drain(engine, images, pipeline=label == "on", batch_size=args.batch)
            times[label].append(run["seconds"])
            ng = run["ng"]
    ratios = [off / on for on, off in zip(times["on"], times["off"], strict=True)]
    report: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {**vars(args), "torch_threads": threads},
        "frames_per_s": {k: round(args.frames / statistics.median(v), 1) for k, v in times.items()},
        "seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "ng_frames": ng,
        "off_over_on": {
            "median": round(statistics.median(ratios), 3),
            "min": round(min(ratios), 3),
            "max": round(max(ratios), 3),
        },
    }
    if args.as_json:
        print(json.dumps(report, indent=2))
        return
    r = report["off_over_on"]
    print(
        f"{args.backbone} {config.image_size} px {engine.precision}, batch {args.batch}, {args.frames} frames "
        f"({ng} NG), torch threads {threads}, {args.rounds} rounds"
    )
    print(f"frames/s: pipeline on {report['frames_per_s']['on']}, off {report['frames_per_s']['off']}")
    print(f"time off / on: {r['median']} (min {r['min']}, max {r['max']})")
    print(f"machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, {report['machine']['date']}")


if __name__ == "__main__":
    main()
