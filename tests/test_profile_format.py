"""Profile files on disk: the calibration settings keep their JSON shape and old files are judged as before."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from model.profile import CalibrationSettings, ClassProfile

SETTINGS = {
    "backbone": "genclip-tiny",
    "weights": "random-init:seed=0",
    "image_size": 224,
    "layers": [2, 4, 6, 8],
    "vv_from_layer": 2,
    "branch_weight": 0.5,
    "score_alpha": 0.5,
    "blur_sigma": 4.0,
    "temperature": 0.07,
    "precision": "fp32",
    "class_word": "bottle",
}
RUNNING = CalibrationSettings(
    "genclip-tiny", "random-init:seed=0", 224, (2, 4, 6, 8), 2, 0.5, 0.5, 4.0, 0.07, "fp32", "bottle"
)


def written(tmp_path: Path, settings: dict) -> Path:
    """A version-1 profile file as the engine wrote it before the settings were typed."""
    calibration = {
        "threshold": 0.61,
        "quantile": 0.995,
        "images": 8,
        "score_min": 0.4,
        "score_median": 0.5,
        "score_p95": 0.58,
        "score_max": 0.6,
        "prompt_version": "prompts@abc",
        "prompt_digest": "d" * 64,
        "settings": settings,
        "measured_at": "2026-01-01T00:00:00+00:00",
        "rule": "max+margin",
        "margin": 0.1,
        "false_reject_rate": 0.0,
    }
    data = {
        "format": "genclip-class-profile",
        "format_version": 1,
        "product_class": "bottle",
        "class_word": "bottle",
        "class_word_source": "cnf",
        "backbone": "genclip-tiny",
        "weights": "random-init:seed=0",
        "defect_types": ["scratch"],
        "cnf": None,
        "reference_images": 8,
        "reference_digest": None,
        "calibration": calibration,
        "updated_at": "2026-01-01T00:00:00+00:00",
    }
    path = tmp_path / "bottle.json"
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def test_an_old_profile_loads_typed_and_is_written_back_byte_for_byte(tmp_path):
    path = written(tmp_path, SETTINGS)
    before = path.read_text(encoding="utf-8")
    profile = ClassProfile.load(path)
    assert profile.calibration is not None and profile.calibration.settings == RUNNING
    assert profile.calibration.stale_because("d" * 64, RUNNING) is None
    assert json.dumps(profile.as_dict(), indent=2, allow_nan=False) + "\n" == before


def test_changed_missing_and_unknown_settings_are_named_as_before(tmp_path):
    calibration = ClassProfile.load(written(tmp_path, SETTINGS)).calibration
    assert calibration is not None
    other = replace(RUNNING, score_alpha=0.3, precision="bf16")
    assert (
        calibration.stale_because("d" * 64, other)
        == "scoring settings changed since calibration: precision, score_alpha"
    )
    assert calibration.stale_because("e" * 64, RUNNING) == "measured on prompts prompts@abc, running other prompts"
    old = {k: v for k, v in SETTINGS.items() if k not in ("precision", "vv_from_layer")} | {"retired": 1}
    loaded = ClassProfile.load(written(tmp_path, old)).calibration
    assert loaded is not None and loaded.settings.as_dict() == old
    running_without_vv = replace(RUNNING, vv_from_layer=None)  # a key the file lacks compares as None
    assert loaded.stale_because("d" * 64, running_without_vv) == (
        "scoring settings changed since calibration: precision, retired"
    )
