"""The WinCLIP baseline: anomalib's zero-shot WinCLIP torch model beside our engine, same backbone and size.

anomalib is an optional extra (`pip install -e '.[bench]'`). Its model would download
LAION weights; `PRETRAINED` is set to None before construction so both sides run on
random weights of the same architecture (cost is what is compared, not scores).
WinCLIP's default is ViT-B-16-plus-240 at 240 px, so the engine runs that too.
WinCLIP gets frames already resized and normalised (its preprocessing is not timed);
the engine starts from camera frames, so the ratio favours WinCLIP.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

BACKBONE, SIZE = "ViT-B-16-plus-240", 240


def winclip_available() -> bool:
    try:
        import anomalib.models.image.winclip.torch_model  # noqa: F401
    except ImportError:
        return False
    return True


def winclip_point(
    *,
    batch: int = 8,
    rounds: int = 3,
    frame_size: tuple[int, int] = (480, 640),
    precision: str = "fp32",
    winclip_precision: str | None = None,
) -> dict[str, Any]:
    """Interleaved rounds: engine at `batch`, WinCLIP at `batch`, WinCLIP one image at a time.

    WinCLIP runs under autocast in `winclip_precision` (default: the engine's effective precision), so
    each side can also be compared at its own fastest setting.
    """
    import anomalib.models.image.winclip.torch_model as winclip
    import torch

    from model import Engine, EngineConfig

    winclip.PRETRAINED = None
    reference = winclip.WinClipModel(class_name="bottle").eval()
    engine = Engine(
        EngineConfig(backbone=BACKBONE, pretrained="random", device="cpu", image_size=SIZE, precision=precision),
        max_batch=batch,
    )
    theirs = winclip_precision or engine.precision
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(theirs)
    engine.classes.register("bottle")
    engine.warmup()
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (*frame_size, 3), dtype=np.uint8) for _ in range(batch)]
    tensors = engine.preprocess(frames)
    times: dict[str, list[float]] = {"engine": [], "winclip batch": [], "winclip one by one": []}

    def timed(key: str, work: Any) -> None:
        began = time.perf_counter()
        work()
        times[key].append(time.perf_counter() - began)

    def run_winclip(x: torch.Tensor) -> Any:
        with torch.autocast("cpu", dtype=low or torch.bfloat16, enabled=low is not None):
            return reference(x)

    with torch.inference_mode():
        run_winclip(tensors[:1])  # warm
        for _ in range(rounds):
            timed("engine", lambda: engine.predict(frames, ["bottle"] * batch))
            timed("winclip batch", lambda: run_winclip(tensors))
            timed("winclip one by one", lambda: [run_winclip(tensors[i : i + 1]) for i in range(batch)])

    def ratio(key: str) -> dict[str, float]:
        values = [w / e for w, e in zip(times[key], times["engine"], strict=True)]
        return {
            "median": round(statistics.median(values), 2),
            "min": round(min(values), 2),
            "max": round(max(values), 2),
        }

    return {
        "backbone": BACKBONE,
        "image_size": SIZE,
        "precision": engine.precision,
        "winclip_precision": theirs,
        "batch": batch,
        "rounds": rounds,
        "images_per_s": {k: round(batch / statistics.median(v), 2) for k, v in times.items()},
        "engine_vs_winclip_batch": ratio("winclip batch"),
        "engine_vs_winclip_one_by_one": ratio("winclip one by one"),
        "note": "both sides random weights; WinCLIP's input preprocessing is not timed, the engine's is",
    }
