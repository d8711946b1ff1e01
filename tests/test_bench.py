"""The benchmarks run from a fresh clone and print what they claim: equal outputs, parseable JSON, the
accounting identity. Figures are reported, never asserted against a clock."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench.naive import NaiveLoop
from model import Engine
from model.threads import set_torch_threads
from tests.factories import frames, tiny_config

GENCLIP = str(Path(sys.executable).with_name("genclip"))


@pytest.mark.parametrize("branch_weight", [0.5, 0.0])
def test_the_naive_loop_computes_what_the_engine_computes(branch_weight):
    engine = Engine(tiny_config(image_size=96, branch_weight=branch_weight), max_batch=4)
    for name in ("bottle", "metal nut"):
        engine.classes.register(name)
    shots = frames(5, seed=3, size=(120, 160))
    classes = ["bottle", "metal nut", "bottle", "metal nut", "bottle"]
    fast = engine.predict(shots, classes)
    slow = NaiveLoop(engine).predict(shots, classes)
    for p, (score, anomaly_map, defects) in zip(fast, slow, strict=True):
        assert score == pytest.approx(p.score, abs=1e-5)
        assert np.abs(anomaly_map - p.anomaly_map).max() < 1e-4
        assert [(d.type, d.bbox) for d in defects] == [(d.type, d.bbox) for d in p.defects]


def test_bench_engine_prints_json_only_on_stdout():
    out = subprocess.run(
        [
            GENCLIP,
            "bench",
            "engine",
            "--rounds",
            "2",
            "--batch",
            "1",
            "--batch",
            "2",
            "--image-size",
            "96",
            "--frame",
            "160x120",
            "--mode",
            "both",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["machine"]["threads"] == 1 and report["machine"]["cores"] >= 1 and report["machine"]["torch"]
    assert [p["mode"] for p in report["points"]] == ["dual-branch", "query-only"]
    for point in report["points"]:
        assert point["naive"]["equality"]["max_score_diff"] < 1e-4 and point["naive"]["equality"]["same_regions"]
        assert [v["batch"] for v in point["engine"]] == [1, 2]
        for v in point["engine"]:
            assert v["images_per_s"] > 0 and v["batch_ms_p50"] <= v["batch_ms_p99"]
            assert v["vs_naive"]["min"] <= v["vs_naive"]["median"] <= v["vs_naive"]["max"]
        assert point["new_class_first_batch_ms"]["median"] > 0 and point["peak_rss_mib"] > 0


def test_bench_engine_names_a_bad_frame_size():
    out = subprocess.run([GENCLIP, "bench", "engine", "--frame", "big"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--frame must be WxH" in out.stderr


def test_thread_settings_are_applied_and_validated():
    before = torch.get_num_threads()
    try:
        assert set_torch_threads(1, 0)["threads"] == 1
        assert set_torch_threads(0, 0)["threads"] == 1  # 0 leaves the count as it is
    finally:
        torch.set_num_threads(before)
    from pydantic import ValidationError

    from agent.config import BatchConfig

    with pytest.raises(ValidationError, match="threads"):
        BatchConfig(threads=-1)


def test_bench_agent_reports_latencies_and_the_identity(tmp_path):
    out = subprocess.run(
        [
            GENCLIP,
            "bench",
            "agent",
            "--cameras",
            "2",
            "--fps",
            "2",
            "--seconds",
            "8",
            "--warmup",
            "12",
            "--work",
            str(tmp_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr + out.stdout[-2000:]
    report = json.loads(out.stdout)
    assert report["identity_holds"] and report["frames"]["accepted"] > 0
    assert report["offered_fps"] == 4.0 and report["inspected_fps"] > 0
    latency = report["latency_ms"]["result"]
    assert latency["count"] > 0 and latency["p50"] <= latency["p99"] <= latency["max"]
    assert report["redis_stream_entries"] > 0 and report["agent"]["rss_mib"] > 0


def test_bench_point_in_bf16_runs_an_fp32_twin_beside_it(monkeypatch):
    """bf16 is timed against the same engine in fp32 and its results compared with it; the naive loop
    (fp32 by definition) is checked against the twin. Forced bf16 so it runs on any CPU."""
    import model.engine as engine_module
    from bench.engine import bench_point

    monkeypatch.setattr(engine_module, "cpu_has_native_bf16", lambda: True)
    point = bench_point("genclip-tiny", 96, "dual-branch", [1, 2], precision="bf16", device="cpu", rounds=2)
    assert point["precision"] == "bf16"
    agreement = point["fp32"]["agreement"]
    assert 0 < agreement["max_score_diff"] < 0.02 and agreement["min_map_correlation"] > 0.98
    assert agreement["frames"] == 2 and 0 <= agreement["same_verdicts"] <= 2
    assert point["naive"]["equality"]["max_score_diff"] < 1e-4 and point["naive"]["equality"]["same_regions"]
    largest = point["engine"][-1]
    assert largest["batch"] == 2 and largest["vs_fp32"]["min"] <= largest["vs_fp32"]["median"]
    assert "vs_fp32" not in point["engine"][0]


def test_stage_profile_and_map_head_bench_run():
    stages = subprocess.run(
        [sys.executable, "-m", "bench.stages", "--backbone", "genclip-tiny", "--image-size", "96", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stages.returncode == 0, stages.stderr
    for stage in ("preprocess", "tower", "adapters", "text", "head", "regions"):
        assert stage in stages.stdout
    assert "batch 8, tower per image: total" in stages.stdout and "everything else" in stages.stdout
    maps = subprocess.run([sys.executable, "-m", "bench.stages", "--maps"], capture_output=True, text=True, timeout=300)
    assert maps.returncode == 0, maps.stderr
    differences = [float(line.rsplit(" ", 1)[1]) for line in maps.stdout.splitlines() if "max difference" in line]
    assert len(differences) == 6 and max(differences) < 2e-6


def test_pipeline_bench_drains_every_frame_both_ways():
    run = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--frames", "24", "--rounds", "1", "--image-size", "96", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert set(report["seconds"]) == {"on", "off"} and all(len(v) == 1 for v in report["seconds"].values())
    assert report["settings"]["torch_threads"] == 1 and 0 <= report["ng_frames"] <= 24
    assert report["off_over_on"]["min"] > 0


def test_revisions_bench_times_two_checkouts_alternately():
    engine_args = ["--backbone", "genclip-tiny", "--image-size", "96", "--batch", "1", "--batch", "2", "--rounds", "1"]
    run = subprocess.run(
        [sys.executable, "-m", "bench.revisions", "--base", "HEAD", "--rounds", "2", "--json", "--", *engine_args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["rounds"] == 2 and report["head"] == "working tree"
    assert sorted(report["points"]) == ["genclip-tiny 96 px batch 1", "genclip-tiny 96 px batch 2"]
    for row in report["points"].values():
        assert row["base_images_per_s"] > 0 and row["head_images_per_s"] > 0
        assert row["ratio_min"] <= row["ratio_median"] <= row["ratio_max"]
    assert "round 2/2 done" in run.stderr
    listed = subprocess.run(["git", "worktree", "list"], capture_output=True, text=True, check=True).stdout
    assert "genclip-rev-" not in listed  # the temporary checkout is gone
