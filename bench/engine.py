"""`genclip bench engine`: how fast the engine scores frames, against the naive loop, measured fairly.

Each point (backbone, image size, branch mode) gets one engine and K = the largest
batch size camera frames. A round times every variant once on the same K frames
(the naive loop, then the engine at each batch size), and rounds are interleaved
(A, B, C, A, B, C, ...), so a disturbance hits all variants alike; ratios are taken
per round and reported as the median with their min and max. The first batch of a
new product class (its text built once) is timed separately from the steady state.
Random weights score meaninglessly but cost exactly what real ones cost.
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

CLASSES = ("bottle", "metal nut")


@dataclass
class Timings:
    """Seconds per round for each variant, and per-call latencies (ms) for each batch size."""

    rounds: dict[str, list[float]] = field(default_factory=dict)
    calls_ms: dict[str, list[float]] = field(default_factory=dict)

    def add(self, variant: str, seconds: float, calls: list[float] | None = None) -> None:
        self.rounds.setdefault(variant, []).append(seconds)
        self.calls_ms.setdefault(variant, []).extend(calls or [])


def machine_info() -> dict[str, Any]:
    """The machine, versions and date a figure belongs to."""
    import open_clip
    import torch

    from agent import __version__

    cpu = platform.processor() or ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    gpu = driver = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        try:
            driver = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            driver = None
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "gpu": gpu,
        "gpu_driver": driver,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "genclip_inspect": __version__,
        "load_average": list(os.getloadavg()),
    }


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def _ratio(numerator: list[float], denominator: list[float]) -> dict[str, float]:
    """Per-round ratios numerator/denominator: median, min, max."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True) if b > 0]
    return {
        "median": round(statistics.median(ratios), 3),
        "min": round(min(ratios), 3),
        "max": round(max(ratios), 3),
    }


def _synchronise(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _precision_check(engine: Any, fp32: Any, frames: list[np.ndarray], classes: list[str]) -> dict[str, Any]:
    """How far the low-precision engine's results are from fp32's on the same frames and weights."""
    low, ref = engine.predict(frames, classes), fp32.predict(frames, classes)
    maps = [(a.anomaly_map.ravel(), b.anomaly_map.ravel()) for a, b in zip(low, ref, strict=True)]
    return {
        "max_score_diff": float(max(abs(a.score - b.score) for a, b in zip(low, ref, strict=True))),
        "max_map_diff": float(max(np.abs(a - b).max() for a, b in maps)),
        "min_map_correlation": float(min(np.corrcoef(a, b)[0, 1] for a, b in maps)),
        "same_verdicts": sum(a.is_anomalous == b.is_anomalous for a, b in zip(low, ref, strict=True)),
        "frames": len(frames),
    }


def bench_point(
    backbone: str,
    image_size: int | None,
    mode: str,
    batches: list[int],
    *,
    precision: str = "fp32",
    device: str = "auto",
    rounds: int = 5,
    frame_size: tuple[int, int] = (480, 640),
    naive: bool = True,
    compile_model: bool = False,
    pipelined: bool = False,
    backbone_cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure one (backbone, size, mode): engine at each batch size vs the naive loop, interleaved."""
    import torch

    from bench.naive import NaiveLoop
    from model import Engine, EngineConfig

    cache = backbone_cache if backbone_cache is not None else {}
    base = EngineConfig(
        backbone=backbone,
        pretrained="random",
        device=device,
        precision=precision,
        compile=compile_model,
        branch_weight=0.5 if mode == "dual-branch" else 0.0,
    )
    if image_size is not None:
        base = base.model_copy(update={"image_size": image_size})
    largest = max(batches)
    engine = Engine(base, backbone=cache.get(backbone), max_batch=largest)
    cache[backbone] = engine.backbone
    if image_size is None:
        engine = Engine(
            base.model_copy(update={"image_size": engine.backbone.native_image_size}),
            backbone=engine.backbone,
            max_batch=largest,
        )
    size = engine.config.image_size
    for name in CLASSES:
        engine.classes.register(name)
    warmup_s = engine.warmup()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (*frame_size, 3), dtype=np.uint8) for _ in range(largest)]
    classes = [CLASSES[i % len(CLASSES)] for i in range(largest)]
    # Under bf16/fp16 the same engine in fp32 runs beside it: the naive loop (fp32 by definition) is checked
    # against that twin, the low-precision engine is timed against it and its results compared with it.
    fp32 = engine
    if engine.precision != "fp32":
        twin = engine.config.model_copy(update={"precision": "fp32"})
        fp32 = Engine(twin, backbone=engine.backbone, max_batch=largest)
        for name in CLASSES:
            fp32.classes.register(name)
        fp32.warmup()
    loop = NaiveLoop(fp32) if naive else None
    precision_check = _precision_check(engine, fp32, frames, classes) if fp32 is not engine else None

    check = None
    if loop is not None:  # the naive loop must compute what the engine computes
        engine_out = fp32.predict(frames, classes)
        naive_out = loop.predict(frames, classes)
        check = {
            "max_score_diff": float(max(abs(p.score - n[0]) for p, n in zip(engine_out, naive_out, strict=True))),
            "max_map_diff": float(
                max(np.abs(p.anomaly_map - n[1]).max() for p, n in zip(engine_out, naive_out, strict=True))
            ),
            "same_regions": all(
                [(d.type, d.bbox) for d in p.defects] == [(d.type, d.bbox) for d in n[2]]
                for p, n in zip(engine_out, naive_out, strict=True)
            ),
            "anomalous_frames": sum(p.is_anomalous for p in engine_out),
        }
    if engine.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    timings = Timings()
    new_class_ms: list[float] = []
    pipelined_batches = [b for b in batches if b < largest] if pipelined else []
    for r in range(rounds):
        if loop is not None:
            _synchronise(engine.device)
            began = time.perf_counter()
            loop.predict(frames, classes)
            timings.add("naive", time.perf_counter() - began)
        for batch in batches:
            calls = []
            _synchronise(engine.device)
            began = time.perf_counter()
            for start in range(0, largest, batch):
                t0 = time.perf_counter()
                engine.predict(frames[start : start + batch], classes[start : start + batch])
                _synchronise(engine.device)
                calls.append((time.perf_counter() - t0) * 1000)
            timings.add(f"batch {batch}", time.perf_counter() - began, calls)
        for batch in pipelined_batches:  # as the agent runs them: batch k+1 launched before k's results are built
            _synchronise(engine.device)
            began = time.perf_counter()
            pending = None
            for start in range(0, largest, batch):
                launched = engine.launch(frames[start : start + batch], classes[start : start + batch])
                if pending is not None:
                    pending.outcomes()
                pending = launched
            if pending is not None:
                pending.outcomes()
            timings.add(f"batch {batch} pipelined", time.perf_counter() - began)
        if fp32 is not engine:
            _synchronise(engine.device)
            began = time.perf_counter()
            fp32.predict(frames, classes)  # at the largest batch size
            _synchronise(engine.device)
            timings.add("fp32", time.perf_counter() - began)
        fresh = f"new class {r}"
        began = time.perf_counter()
        engine.classes.register(fresh)
        engine.predict(frames[:1], [fresh])
        _synchronise(engine.device)
        new_class_ms.append((time.perf_counter() - began) * 1000)

    variants = []
    for batch in batches:
        key = f"batch {batch}"
        per_round = timings.rounds[key]
        entry: dict[str, Any] = {
            "batch": batch,
            "images_per_s": round(largest / statistics.median(per_round), 2),
            "batch_ms_p50": _percentile(timings.calls_ms[key], 50),
            "batch_ms_p99": _percentile(timings.calls_ms[key], 99),
            "vs_batch_1": _ratio(timings.rounds["batch 1"], per_round) if "batch 1" in timings.rounds else None,
        }
        if loop is not None:
            entry["vs_naive"] = _ratio(timings.rounds["naive"], per_round)
        if fp32 is not engine and batch == largest:
            entry["vs_fp32"] = _ratio(timings.rounds["fp32"], per_round)
        variants.append(entry)
    for batch in pipelined_batches:
        per_round = timings.rounds[f"batch {batch} pipelined"]
        entry = {
            "batch": batch,
            "pipelined": True,
            "images_per_s": round(largest / statistics.median(per_round), 2),
            "batch_ms_p50": None,
            "batch_ms_p99": None,
            "vs_batch_1": _ratio(timings.rounds["batch 1"], per_round) if "batch 1" in timings.rounds else None,
            "vs_unpipelined": _ratio(timings.rounds[f"batch {batch}"], per_round),
        }
        if loop is not None:
            entry["vs_naive"] = _ratio(timings.rounds["naive"], per_round)
        variants.append(entry)
    result: dict[str, Any] = {
        "backbone": backbone,
        "image_size": size,
        "mode": mode,
        "precision": engine.precision,
        "device": str(engine.device),
        "frame": f"{frame_size[1]}x{frame_size[0]}",
        "images_per_round": largest,
        "rounds": rounds,
        "warmup_s": round(warmup_s, 2),
        "engine": variants,
        "new_class_first_batch_ms": {
            "median": round(statistics.median(new_class_ms), 2),
            "min": round(min(new_class_ms), 2),
            "max": round(max(new_class_ms), 2),
        },
        "peak_rss_mib": _peak_rss_mib(),
        "device_max_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)
        if engine.device.type == "cuda"
        else None,
    }
    if precision_check is not None:
        result["fp32"] = {
            "images_per_s": round(largest / statistics.median(timings.rounds["fp32"]), 2),
            "batch": largest,
            "agreement": precision_check,
        }
    if loop is not None:
        result["naive"] = {
            "images_per_s": round(largest / statistics.median(timings.rounds["naive"]), 2),
            "equality": check,
        }
    return result


def memory_point(
    backbone: str,
    image_size: int | None,
    shots: int,
    batch: int,
    *,
    precision: str = "fp32",
    device: str = "auto",
    rounds: int = 5,
    frame_size: tuple[int, int] = (480, 640),
    coreset: int = 0,
    backbone_cache: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The patch memory's cost on one engine: building it from `shots` good frames (features and the
    leave-one-out statistics), its size, the nearest-neighbour search per frame, and fused vs zero-shot
    images/s at `batch`, interleaved round by round (zero-shot, fused, zero-shot, fused, ...)."""
    import torch

    from model import Engine, EngineConfig
    from model.memory import few_shot_map

    cache = backbone_cache if backbone_cache is not None else {}
    config = EngineConfig(
        backbone=backbone, pretrained="random", device=device, precision=precision, memory_coreset=coreset
    )
    engine = Engine(config, backbone=cache.get(backbone), max_batch=batch)
    cache[backbone] = engine.backbone
    size = image_size or engine.backbone.native_image_size
    if size != engine.config.image_size:
        engine = Engine(config.model_copy(update={"image_size": size}), backbone=engine.backbone, max_batch=batch)
    engine.classes.register(CLASSES[0])
    rng = np.random.default_rng(1)
    references = [rng.integers(0, 256, (*frame_size, 3), dtype=np.uint8) for _ in range(shots)]
    frames = [rng.integers(0, 256, (*frame_size, 3), dtype=np.uint8) for _ in range(batch)]
    classes = [CLASSES[0]] * batch
    builds = []
    memory = None
    for _ in range(max(1, min(rounds, 3))):
        _synchronise(engine.device)
        began = time.perf_counter()
        memory = engine.classes.build_memory(CLASSES[0], references)
        _synchronise(engine.device)
        builds.append(time.perf_counter() - began)
    assert memory is not None
    kind = "tokens"
    query = engine.classes.scorer.patch_features(engine.snapshot.prompts.model, frames, kind)
    searches = []
    with torch.inference_mode():
        few_shot_map(query, memory)  # warm
        for _ in range(rounds):
            _synchronise(engine.device)
            began = time.perf_counter()
            few_shot_map(query, memory)
            _synchronise(engine.device)
            searches.append((time.perf_counter() - began) / batch * 1000)
    engine.warmup()
    timings = Timings()
    for _ in range(rounds):
        for variant, use in (("zero-shot", None), ("fused", memory)):
            engine.classes.use_memory(CLASSES[0], use, 0.5)
            _synchronise(engine.device)
            began = time.perf_counter()
            engine.predict(frames, classes)
            _synchronise(engine.device)
            timings.add(variant, time.perf_counter() - began)
    zero, fused = timings.rounds["zero-shot"], timings.rounds["fused"]
    return {
        "backbone": backbone,
        "image_size": size,
        "grid": memory.identity.grid,
        "layers": list(memory.identity.layers),
        "shots": shots,
        "coreset": coreset,
        "batch": batch,
        "device": str(engine.device),
        "precision": engine.precision,
        "memory_patches_per_layer": memory.patches,
        "memory_mib": round(memory.nbytes / 2**20, 2),
        "build_s": {"median": round(statistics.median(builds), 3), "min": round(min(builds), 3)},
        "search_ms_per_frame": {"median": round(statistics.median(searches), 3), "min": round(min(searches), 3)},
        "images_per_s": {
            "zero-shot": round(batch / statistics.median(zero), 2),
            "fused": round(batch / statistics.median(fused), 2),
        },
        "fused_vs_zero_shot": _ratio(zero, fused),  # > 1: fused is faster
        "rounds": rounds,
    }


def run_bench(
    backbones: list[str],
    image_sizes: list[int | None],
    modes: list[str],
    batches: list[int],
    *,
    threads: int = 1,
    interop_threads: int = 1,
    **options: Any,
) -> dict[str, Any]:
    """Every combination, with the machine it ran on."""
    from model.threads import set_torch_threads

    applied = set_torch_threads(threads, interop_threads)
    cache: dict[str, Any] = {}
    shots = options.pop("memory_shots", 0)
    points = [
        bench_point(backbone, size, mode, batches, backbone_cache=cache, **options)
        for backbone in backbones
        for size in image_sizes
        for mode in modes
    ]
    report: dict[str, Any] = {"machine": machine_info() | applied, "points": points}
    if shots:
        keep = ("precision", "device", "rounds", "frame_size")
        report["memory"] = [
            memory_point(
                backbone,
                size,
                shots,
                max(batches),
                backbone_cache=cache,
                **{k: options[k] for k in keep if k in options},
            )
            for backbone in backbones
            for size in image_sizes
        ]
    return report


def quiet_logs_to_stderr() -> None:
    """Only warnings from the engine's logs, on stderr: stdout is for the figures."""
    from agent.logs import configure_logging

    configure_logging("bench", "WARNING", "console", stream=sys.stderr)


def _spread(ratio: dict[str, float] | None) -> str:
    if not ratio:
        return "-"
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def print_engine_table(report: dict[str, Any]) -> None:
    """`genclip bench engine`'s table and notes (without --json)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="genclip bench engine (ratios: median of per-round ratios, min-max)")
    columns = ("backbone", "size", "mode", "prec", "batch", "img/s", "p50 ms", "p99 ms", "vs naive", "vs b1", "vs fp32")
    for column in columns:
        table.add_column(column, justify="right" if column not in ("backbone", "mode") else "left")
    for p in report["points"]:
        if "naive" in p:
            table.add_row(
                p["backbone"], str(p["image_size"]), p["mode"], "fp32", "naive", f"{p['naive']['images_per_s']:.1f}"
            )
        if "fp32" in p:
            table.add_row(
                p["backbone"],
                str(p["image_size"]),
                p["mode"],
                "fp32",
                str(p["fp32"]["batch"]),
                f"{p['fp32']['images_per_s']:.1f}",
            )
        for v in p["engine"]:
            table.add_row(
                p["backbone"],
                str(p["image_size"]),
                p["mode"],
                p["precision"],
                f"{v['batch']} pipelined" if v.get("pipelined") else str(v["batch"]),
                f"{v['images_per_s']:.1f}",
                "" if v["batch_ms_p50"] is None else f"{v['batch_ms_p50']:.1f}",
                "" if v["batch_ms_p99"] is None else f"{v['batch_ms_p99']:.1f}",
                _spread(v.get("vs_naive")),
                _spread(v.get("vs_batch_1")),
                _spread(v.get("vs_fp32")),
            )
    console = Console(width=max(Console().width, 150))
    console.print(table)
    for p in report["points"]:
        eq = (p.get("naive") or {}).get("equality")
        console.print(
            f"{p['backbone']} {p['image_size']}px {p['mode']}: first batch of a new class "
            f"{p['new_class_first_batch_ms']['median']:.1f} ms; peak RSS {p['peak_rss_mib']} MiB"
            + (f"; device max {p['device_max_allocated_mib']} MiB" if p["device_max_allocated_mib"] else "")
            + (
                f"; naive = engine within {eq['max_score_diff']:.1e} (score), {eq['max_map_diff']:.1e} (map), "
                f"regions {'equal' if eq['same_regions'] else 'DIFFER'} ({eq['anomalous_frames']} NG frames)"
                if eq
                else ""
            )
        )
        agree = (p.get("fp32") or {}).get("agreement")
        if agree:
            console.print(
                f"  {p['precision']} vs fp32 on the same frames: scores within {agree['max_score_diff']:.1e}, maps "
                f"within {agree['max_map_diff']:.1e} (correlation >= {agree['min_map_correlation']:.4f}), "
                f"{agree['same_verdicts']}/{agree['frames']} verdicts equal"
            )
    if "winclip" in report:
        w = report["winclip"]
        console.print(
            f"WinCLIP (anomalib) on {w['backbone']} at {w['image_size']} px, engine {w['precision']}, WinCLIP "
            f"{w['winclip_precision']}, batch {w['batch']}: engine "
            f"{w['images_per_s']['engine']} img/s, WinCLIP {w['images_per_s']['winclip batch']} img/s batched, "
            f"{w['images_per_s']['winclip one by one']} img/s one by one; engine is "
            f"{_spread(w['engine_vs_winclip_batch'])} / {_spread(w['engine_vs_winclip_one_by_one'])} faster"
        )
    for p in report.get("memory", []):
        console.print(
            f"patch memory {p['backbone']} {p['image_size']}px ({p['grid']}x{p['grid']} grid, {len(p['layers'])} "
            f"layers), {p['shots']} shots: build {p['build_s']['median']:.2f} s, {p['memory_patches_per_layer']} "
            f"patches/layer, {p['memory_mib']} MiB; search {p['search_ms_per_frame']['median']:.2f} ms/frame; "
            f"batch {p['batch']}: zero-shot {p['images_per_s']['zero-shot']} img/s, fused "
            f"{p['images_per_s']['fused']} img/s (fused/zero-shot time {_spread(p['fused_vs_zero_shot'])} faster)"
        )
    m = report["machine"]
    console.print(
        f"machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['threads']} threads, "
        f"{m['interop_threads']} inter-op), gpu {m['gpu'] or 'none'}, load {m['load_average'][0]:.2f}, {m['date']}"
    )
