"""trainer.report: report.json / report.md contents and the sample-grid PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from trainer.metrics import COLUMNS, Evaluator
from trainer.report import SCALE_WIDTH, TITLE_HEIGHT, format_percent, write_report, write_sample_grid


@pytest.fixture
def results() -> dict:
    rng = np.random.default_rng(0)
    masks = np.zeros((4, 32, 32), bool)
    masks[1, 4:12, 4:12] = True
    masks[3, 20:28, 10:30] = True
    maps = np.clip(rng.random((4, 32, 32)) * 0.5 + 0.4 * masks, 0, 1)
    evaluator = Evaluator(bins=256)
    evaluator.update("metal_nut", [0.2, 0.7, 0.4, 0.9], [0, 1, 0, 1], maps, masks)
    evaluator.update("pcb|1", [0.3, 0.5, 0.6], [0, 1, 0])  # no masks; "|" must not break the table
    return evaluator.compute()


META = {
    "checkpoint": Path("runs/2024-05-01/best.safetensors"),
    "data": {"name": "mvtec", "root": Path("/data/mvtec"), "split": "test"},
    "images": {"metal_nut": 4, "pcb|1": 3},
    "skipped": ["pcb|1/broken.png"],
    "seconds": 12.345,
    "date": "2024-05-02 10:00 UTC",
}


def test_write_report_json_round_trips(tmp_path: Path, results: dict) -> None:
    json_path, md_path = write_report(tmp_path / "eval", results, META)
    assert json_path == tmp_path / "eval" / "report.json" and json_path.is_file()
    assert md_path == tmp_path / "eval" / "report.md" and md_path.is_file()

    loaded = json.loads(json_path.read_text())  # strict JSON: NaN is written as null
    assert loaded["columns"] == list(COLUMNS)
    assert set(loaded["classes"]) == {"metal_nut", "pcb|1"}
    for name, row in results["classes"].items():
        for column, value in row.items():
            stored = loaded["classes"][name][column]
            assert stored is None if math.isnan(value) else stored == value
    assert loaded["mean"] == {k: (None if math.isnan(v) else v) for k, v in results["mean"].items()}
    assert loaded["notes"] == results["notes"] and loaded["counts"] == results["counts"]
    assert loaded["meta"]["checkpoint"] == "runs/2024-05-01/best.safetensors"
    assert loaded["meta"]["data"]["root"] == "/data/mvtec"
    assert loaded["meta"]["skipped"] == ["pcb|1/broken.png"]
    assert loaded["meta"]["seconds"] == 12.345
    assert loaded["date"] == "2024-05-02 10:00 UTC"


def test_write_report_markdown_table(tmp_path: Path, results: dict) -> None:
    _, md_path = write_report(tmp_path, results, META)
    text = md_path.read_text()
    assert "`runs/2024-05-01/best.safetensors`" in text
    assert "name=mvtec" in text and "2024-05-02 10:00 UTC" in text
    assert "- Skipped files: 1" in text and "- Time (s): 12.3" in text

    table = [line for line in text.splitlines() if line.startswith("|")]
    header, _, *rows = table
    assert header == (
        "| Class | Image AUROC | Image AP | Image F1-max | Pixel AUROC | Pixel AP | Pixel F1-max | Pixel AUPRO |"
    )
    assert [row.split(" | ")[0] for row in rows] == ["| metal_nut", "| pcb\\|1", "| **Mean**"]
    metal_nut = results["classes"]["metal_nut"]
    assert rows[0] == "| metal_nut | " + " | ".join(f"{100 * metal_nut[c]:.1f}" for c in COLUMNS) + " |"
    assert rows[1].endswith("| - | - | - | - |")  # image-level-only class
    assert "excluded from the mean" in text


def test_write_report_without_optional_meta(tmp_path: Path) -> None:
    results = {"classes": {"a": dict.fromkeys(COLUMNS, 0.5)}, "mean": dict.fromkeys(COLUMNS, 0.5)}
    _, md_path = write_report(tmp_path, results, {})
    assert "| a | 50.0 | 50.0 |" in md_path.read_text()
    with pytest.raises(ValueError, match="classes"):
        write_report(tmp_path, {"mean": {}}, {})


def test_format_percent() -> None:
    assert format_percent(0.91234) == "91.2"
    assert format_percent(1.0) == "100.0"
    assert format_percent(math.nan) == "-"
    assert format_percent(None) == "-"


def test_write_sample_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((300, 400), np.uint8)
    mask[100:150, 200:260] = 1
    rows = [
        (rng.integers(0, 255, (300, 400, 3), dtype=np.uint8), mask, rng.random((64, 64))),
        (rng.integers(0, 255, (128, 128), dtype=np.uint8), None, np.zeros((128, 128), np.float32)),
        (np.zeros((50, 50, 3), np.uint8), np.ones((50, 50), bool), np.full((10, 10), 2.0)),
    ]
    path = write_sample_grid(tmp_path / "grids" / "bottle.png", rows, "bottle: 3 samples")
    image = cv2.imread(str(path))
    assert image.shape == (TITLE_HEIGHT + 3 * 192, 3 * 192 + SCALE_WIDTH, 3)
    second_truth = image[TITLE_HEIGHT + 192 + 20 :, 192:384][:150]
    assert second_truth.max() == 0  # no mask: black tile
    third_truth = image[TITLE_HEIGHT + 2 * 192 + 20 : TITLE_HEIGHT + 3 * 192, 192:384]
    assert third_truth.min() == 255  # all-defective mask: white tile

    small = write_sample_grid(tmp_path / "small.png", rows[:1], "one", tile=64)
    assert cv2.imread(str(small)).shape == (TITLE_HEIGHT + 64, 3 * 64 + SCALE_WIDTH, 3)
    with pytest.raises(ValueError, match="no rows"):
        write_sample_grid(tmp_path / "none.png", [], "empty")
