"""Speed paths change speed, not results: bf16 towers on the CPU, maps upsampled and blurred as one matrix."""

from __future__ import annotations

import numpy as np
import pytest
import structlog
import torch

import model.engine as engine_module
from model import Engine
from model.backbone import load_backbone
from model.engine import tower_precision
from model.scoring import gaussian_blur, grid_to_image, upsample_and_blur
from tests.factories import frames, tiny_config


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("genclip-tiny", "random")


def test_precision_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert tower_precision("fp32", cpu) == ("fp32", None)
    assert tower_precision("bf16", cuda) == ("bf16", None) and tower_precision("fp16", cuda) == ("fp16", None)
    used, why = tower_precision("fp16", cpu)
    assert used == "fp32" and "CUDA only" in why


def test_bf16_on_a_cpu_without_native_bf16_falls_back_to_fp32_and_says_so(backbone, monkeypatch):
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: False)
    with structlog.testing.capture_logs() as logs:
        engine = Engine(tiny_config(precision="bf16"), backbone=backbone)
    assert engine.precision == "fp32" and engine.info().precision == "fp32"
    (warning,) = [e for e in logs if e["event"] == "precision not available here"]
    assert warning["used"] == "fp32" and "no native bf16" in warning["reason"]


def test_bf16_towers_on_the_cpu_stay_close_to_fp32(backbone, monkeypatch):
    """Where the CPU has native bf16 (AMX, AVX512-BF16) the towers run in bf16 and the head in fp32.
    Forced here so the path runs on any CPU (emulated: slower, same numbers)."""
    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: True)
    fp32 = Engine(tiny_config(), backbone=backbone)
    bf16 = Engine(tiny_config(precision="bf16"), backbone=backbone)
    assert bf16.precision == "bf16" and fp32.precision == "fp32"
    batch = frames(6, seed=4)
    for engine in (fp32, bf16):
        engine.classes.register("bottle")
    a = fp32.predict(batch, ["bottle"] * 6)
    b = bf16.predict(batch, ["bottle"] * 6)
    scores_a, scores_b = np.array([p.score for p in a]), np.array([p.score for p in b])
    assert not np.array_equal(scores_a, scores_b)  # bf16 really ran
    assert np.abs(scores_a - scores_b).max() < 0.02, (scores_a, scores_b)
    for p, q in zip(a, b, strict=True):
        assert p.anomaly_map.dtype == q.anomaly_map.dtype == np.float32  # the head stays fp32
        assert np.corrcoef(p.anomaly_map.ravel(), q.anomaly_map.ravel())[0, 1] > 0.98


@pytest.mark.parametrize(
    ("grid", "size", "sigma"), [(14, 224, 1.73), (32, 512, 3.95), (37, 518, 4.0), (7, 70, 0.0), (4, 12, 5.0)]
)
def test_upsample_and_blur_as_one_matrix_equals_the_full_size_path(grid, size, sigma):
    """U G U^T equals bilinear upsampling then the reflect-edged blur (checked against scipy in test_engine)."""
    maps = torch.rand(3, grid * grid)
    full = gaussian_blur(grid_to_image(maps, size), sigma)
    fast = upsample_and_blur(maps, size, sigma)
    assert fast.shape == full.shape == (3, size, size)
    torch.testing.assert_close(fast, full, atol=2e-6, rtol=0)


def test_the_map_operator_built_under_inference_mode_still_trains():
    with torch.inference_mode():
        upsample_and_blur(torch.rand(1, 49), 64, 2.0)  # cached here first
    grid = torch.rand(2, 49, requires_grad=True)
    upsample_and_blur(grid, 64, 2.0).square().sum().backward()
    assert grid.grad is not None and grid.grad.abs().sum() > 0


def test_the_map_operator_built_inside_a_trace_is_not_kept():
    """torch.export (as `genclip export onnx` runs it) traces with fake tensors: an operator first built there
    must not be cached, or every later scoring call gets a fake tensor back (and `.numpy()` fails on it)."""

    class Blur(torch.nn.Module):
        def forward(self, maps: torch.Tensor) -> torch.Tensor:
            return upsample_and_blur(maps, 40, 1.25)  # a shape no other test builds: not cached yet

    maps = torch.rand(2, 25)
    traced = torch.export.export(Blur(), (maps,))
    eager = upsample_and_blur(maps, 40, 1.25)
    assert type(eager) is torch.Tensor
    np.testing.assert_allclose(eager.numpy(), gaussian_blur(grid_to_image(maps, 40), 1.25).numpy(), atol=2e-6)
    torch.testing.assert_close(traced.module()(maps), eager)
