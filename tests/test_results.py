"""The published records of one frame: result, reject and decision payloads from the engine's outcome."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import cv2
import numpy as np

from agent.frames import Frame
from agent.results import build_inspection, encode_map_png, map_key
from model.outcomes import FrameError, Prediction
from model.regions import Defect

MODEL = {"backbone": "genclip-tiny", "weights": "random-init:seed=0", "prompt_version": "untrained"}


def frame(seq: int = 7) -> Frame:
    return Frame("cam-1", seq, f"part-{seq}", "widget", np.zeros((48, 64, 3), np.uint8), datetime.now(UTC))


def prediction(score: float, threshold: float = 0.5) -> Prediction:
    anomaly_map = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
    ng = score >= threshold
    defects = [Defect("scratch", 0.6, 0.9, 120, (1, 2, 3, 4))] if ng else []
    return Prediction(
        "widget", score, threshold, "config", ng, anomaly_map, (48, 64), defects, "v1@abc", 0.4, 1.0, 0.8,
        "widget", "unfiltered",
    )  # fmt: skip


def build(outcome, maps="ng"):
    return build_inspection(frame(), outcome, line="l1", window_s=2.0, maps=maps, map_size=None, model=MODEL)


def test_ng_result_reject_and_map():
    inspection = build(prediction(0.8))
    r = inspection.result
    assert (r["verdict"], r["score"], r["threshold"], r["threshold_source"]) == ("NG", 0.8, 0.5, "config")
    assert r["defects"] == [
        {"type": "scratch", "type_probability": 0.6, "score": 0.9, "area_px": 120, "bbox": [1, 2, 3, 4]}
    ]
    assert r["map_key"] == map_key("l1", "cam-1", 7) and r["model"]["prompt_version"] == "v1@abc"
    png = cv2.imdecode(np.frombuffer(inspection.map_png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert png.shape == (32, 32) and png.dtype == np.uint8 and png.max() == 255
    assert inspection.rejects and inspection.reject_payload()["defect_types"] == ["scratch"]
    assert inspection.deadline - inspection.captured_at == timedelta(seconds=2)
    assert inspection.decision_payload()["reject"] is True


def test_ok_result_has_no_map_unless_all_maps_are_kept():
    ok = build(prediction(0.2))
    assert ok.result["verdict"] == "OK" and ok.map_png is None and ok.result["map_key"] is None
    assert not ok.rejects and ok.decision_payload()["reject"] is False
    assert build(prediction(0.2), maps="all").map_png is not None
    assert build(prediction(0.9), maps="none").map_png is None


def test_a_frame_the_engine_could_not_score_is_rejected_with_the_reason():
    inspection = build(FrameError(0, "widget", "frame of 4x4 px is too small"))
    assert inspection.verdict == "ERROR" and inspection.rejects
    assert inspection.result["score"] is None and inspection.result["error"] == "frame of 4x4 px is too small"
    assert inspection.reject_payload()["defect_types"] == ["inspection-error"]


def test_map_png_resized_on_request():
    png = encode_map_png(np.ones((64, 64), np.float32), size=16)
    assert cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).shape == (16, 16)
