"""A threshold calibrated with `genclip calibrate --profiles DIR` travels to `score`, `eval` and `export onnx`
(`--profiles DIR`), each says where its threshold came from, and the exported ONNX model carries what whoever
runs it must know (classes, thresholds, image size, normalisation, prompts, outputs) in its metadata; the
onnxruntime example in docs/engine.md, run verbatim, reproduces `genclip score`. genclip-tiny on the CPU.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import cv2
import pytest
import structlog
import tomli_w
from typer.testing import CliRunner

from cli.main import app
from model.profile import ClassProfile
from synthetic.textures import write_good_images
from trainer.synth import generate

REPO = Path(__file__).resolve().parents[1]
GENCLIP = Path(sys.executable).parent / "genclip"
CLASS = "tiles"


@pytest.fixture(scope="module", autouse=True)
def restore_logging():
    """The verbs point logging at CliRunner's stream, which closes after each call; undo that afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def run_genclip(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The installed command in a fresh process, as a user runs it (this checkout's packages first)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [str(GENCLIP), *map(str, args)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def line(tmp_path_factory) -> dict[str, Path]:
    """A CPU config without [model].profile_dir, good parts of CLASS calibrated into a profile folder with
    `genclip calibrate --profiles`, a part photo of another size than the model's, and labelled data."""
    root = tmp_path_factory.mktemp("line")
    data = tomllib.loads((REPO / "config.toml").read_text())
    data["model"]["device"] = "cpu"
    assert "profile_dir" not in data["model"]
    config = root / "config.toml"
    config.write_text(tomli_w.dumps(data))
    good = root / "good"
    write_good_images(CLASS, good, 8, seed=3, size=96)
    profiles = root / "profiles"
    calibrated = invoke(
        "calibrate", "--class", CLASS, "--good", good, "--min-images", "8", "--profiles", profiles, "-c", config
    )
    assert calibrated.exit_code == 0, calibrated.output
    part = root / "part.png"
    image = cv2.imread(str(good / f"{CLASS}_000.png"))
    assert cv2.imwrite(str(part), cv2.resize(image, (160, 120)))  # not the model's 224: the resize matters
    labelled = root / "labelled"
    generate(good, labelled, 6, seed=4, class_name=CLASS)
    return {"root": root, "config": config, "profiles": profiles, "part": part, "labelled": labelled}


def calibrated_threshold(profiles: Path) -> float:
    calibration = ClassProfile.load(profiles / f"{CLASS}.json").calibration
    assert calibration is not None
    return calibration.threshold


def scored_args(line: dict[str, Path]) -> list[str | Path]:
    return ["score", line["part"], "--class", CLASS, "-c", line["config"]]


# --- score and eval --------------------------------------------------------------------------------------
def test_score_uses_the_profile_calibrate_wrote_with_profiles(line):
    threshold = calibrated_threshold(line["profiles"])
    without = invoke("score", line["part"], "--class", CLASS, "-c", line["config"])
    assert without.exit_code == 0, without.stderr
    assert json.loads(without.stdout)["threshold_source"] == "default"  # no [model].profile_dir: nothing to read

    scored = invoke("score", line["part"], "--class", CLASS, "-c", line["config"], "--profiles", line["profiles"])
    assert scored.exit_code == 0, scored.stderr
    record = json.loads(scored.stdout)
    assert (record["threshold"], record["threshold_source"]) == (pytest.approx(threshold), "calibration")
    assert str(line["profiles"] / f"{CLASS}.json") in scored.stderr  # where the threshold came from

    option = invoke(*scored_args(line), "--profiles", line["profiles"], "--threshold", "0")
    record = json.loads(option.stdout)
    assert (record["threshold"], record["threshold_source"]) == (0.0, "option")

    missing = invoke("score", line["part"], "--class", CLASS, "-c", line["config"], "--profiles", line["root"] / "no")
    assert missing.exit_code == 2 and "--profiles: folder not found" in missing.stderr


def test_eval_takes_profiles_and_threshold_and_reports_where_the_threshold_came_from(line, tmp_path):
    threshold = calibrated_threshold(line["profiles"])
    data = f"synthetic:{line['labelled']}"
    common = ["eval", "--data", data, "-c", line["config"], "--grid-good", "0", "--grid-per-kind", "0"]
    calibrated = invoke(*common, "--out", tmp_path / "a", "--profiles", line["profiles"])
    assert calibrated.exit_code == 0, calibrated.output
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    entry = report["meta"]["thresholds"][CLASS]
    assert (entry["threshold"], entry["threshold_source"]) == (pytest.approx(threshold), "calibration")
    assert entry["profile"] == str(line["profiles"] / f"{CLASS}.json")
    assert re.search(rf"threshold {CLASS}: {threshold:.4f} \(calibration, .*{CLASS}\.json\)", calibrated.stdout)

    option = invoke(*common, "--out", tmp_path / "b", "--profiles", line["profiles"], "--threshold", "0.25")
    assert option.exit_code == 0, option.output
    entry = json.loads((tmp_path / "b" / "report.json").read_text())["meta"]["thresholds"][CLASS]
    assert (entry["threshold"], entry["threshold_source"]) == (0.25, "option")
    assert f"threshold {CLASS}: 0.2500 (option)" in option.stdout

    plain = invoke(*common, "--out", tmp_path / "c")
    assert plain.exit_code == 0, plain.output
    entry = json.loads((tmp_path / "c" / "report.json").read_text())["meta"]["thresholds"][CLASS]
    assert (entry["threshold"], entry["threshold_source"]) == (0.5, "default")


# --- export onnx: one real export, shared ----------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(line) -> dict[str, Any]:
    """`genclip export onnx --profiles DIR` in a fresh process, and `genclip score --profiles DIR` of the part."""
    root = line["root"]
    done = run_genclip(
        "export", "onnx", "--classes", f"bottle,{CLASS}", "--profiles", "profiles", "--out", "genclip.onnx",
        "-c", "config.toml", cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    scored = invoke("score", line["part"], "--class", CLASS, "-c", line["config"], "--profiles", line["profiles"])
    assert scored.exit_code == 0, scored.stderr
    return {"done": done, "model": root / "genclip.onnx", "score": json.loads(scored.stdout)}


def test_export_uses_the_calibrated_threshold_and_says_so(line, exported):
    result = json.loads(exported["done"].stdout)
    assert result["ok"] is True
    assert result["thresholds"][CLASS]["threshold"] == pytest.approx(calibrated_threshold(line["profiles"]))
    assert result["thresholds"][CLASS]["threshold_source"] == "calibration"
    assert result["thresholds"][CLASS]["profile"] == str(Path("profiles") / f"{CLASS}.json")
    assert result["thresholds"]["bottle"] == {"threshold": 0.5, "threshold_source": "default"}


def test_onnx_metadata_says_what_whoever_runs_the_model_must_know(line, exported):
    import onnx

    from model.export import METADATA_FORMAT

    model = onnx.load(str(exported["model"]), load_external_data=False)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["genclip.format"] == METADATA_FORMAT and meta["genclip.format_version"] == "1"
    assert json.loads(meta["genclip.classes"]) == ["bottle", CLASS]
    thresholds = json.loads(meta["genclip.thresholds"])
    assert thresholds == {"bottle": 0.5, CLASS: pytest.approx(calibrated_threshold(line["profiles"]))}
    assert json.loads(meta["genclip.threshold_sources"]) == {"bottle": "default", CLASS: "calibration"}
    assert json.loads(meta["genclip.class_words"])["bottle"] == "bottle"
    assert meta["genclip.image_size"] == "224"
    normalisation = json.loads(meta["genclip.normalisation"])
    assert len(normalisation["mean"]) == len(normalisation["std"]) == 3 and normalisation["in_graph"] is True
    assert meta["genclip.prompt_version"] == exported["score"]["prompt_version"] == "untrained"
    assert meta["genclip.backbone"] == "genclip-tiny" and meta["genclip.weights"]
    outputs = json.loads(meta["genclip.outputs"])
    assert list(outputs) == [o.name for o in model.graph.output] == ["scores", "anomaly_maps"]
    assert all(len(text) > 20 for text in outputs.values())
    assert set(json.loads(meta["genclip.inputs"])) == {i.name for i in model.graph.input}
    for key in ("genclip.resize", "genclip.decision"):
        assert meta[key]


def doc_example() -> str:
    """The Python block of docs/engine.md's section on the exported model's metadata, as written."""
    text = (REPO / "docs" / "engine.md").read_text()
    section = text.split("### Running the exported model", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section.split("\n## ", 1)[0], re.S)
    return block


def test_doc_onnx_example_reproduces_genclip_score(line, exported):
    """The example runs as written, in the folder with genclip.onnx and part.png it names."""
    code = doc_example()
    assert 'MODEL, IMAGE, CLASS = "genclip.onnx", "part.png", "tiles"' in code and len(code.splitlines()) <= 14
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=line["root"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    name, score, threshold, verdict = done.stdout.split()
    record = exported["score"]
    assert name == CLASS
    assert abs(float(score) - record["score"]) <= 1e-3
    assert float(threshold) == pytest.approx(record["threshold"], abs=1e-6)
    assert verdict == ("NG" if record["is_anomalous"] else "OK")


def test_export_prints_no_warning(exported):
    stderr = exported["done"].stderr
    assert "Warning" not in stderr and "warn" not in stderr.lower(), stderr
