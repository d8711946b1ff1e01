"""`genclip score` and `genclip export onnx` with genclip-tiny on the CPU, through the real CLI."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import structlog
import tomli_w
import typer.main
from typer.testing import CliRunner

from cli.main import app
from model.backbone import Backbone, load_backbone
from tests.factories import perturbed_checkpoint, tiny_config

REPO = Path(__file__).resolve().parents[1]
RECORD_KEYS = {
    "path",
    "product_class",
    "score",
    "threshold",
    "threshold_source",
    "is_anomalous",
    "defects",
    "prompt_version",
    "timing",
}
DEFECT_KEYS = {"type", "type_probability", "score", "area_px", "bbox"}


@pytest.fixture(scope="module", autouse=True)
def restore_logging():
    """The verbs point logging at CliRunner's stream, which closes after each call; undo that afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    """The repo's config.toml, on the CPU so the tests run the same everywhere."""
    data = tomllib.loads((REPO / "config.toml").read_text())
    data["model"]["device"] = "cpu"
    path = tmp_path_factory.mktemp("config") / "config.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def json_lines(stdout: str) -> list[dict[str, Any]]:
    """Every stdout line parsed as JSON: fails on any line that is not (stdout must be pure JSON lines)."""
    return [json.loads(line) for line in stdout.splitlines()]


def write_image(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


# --- the main run: every format, bad inputs, folders, overlays, in one call ---------------------------------
FORMATS = {  # name -> (shape, dtype)
    "colour8.png": ((96, 128, 3), np.uint8),
    "gray8.png": ((80, 100), np.uint8),
    "colour16.png": ((70, 90, 3), np.uint16),
    "gray16.png": ((64, 64), np.uint16),
    "colour.jpg": ((60, 80, 3), np.uint8),
    "gray.jpeg": ((72, 72), np.uint8),
    "alpha.png": ((50, 60, 4), np.uint8),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for name, (shape, dtype) in FORMATS.items():
        paths[name] = write_image(root / name, rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True))
        stored = cv2.imread(str(paths[name]), cv2.IMREAD_UNCHANGED)
        assert stored.dtype == dtype and stored.shape == shape, name  # the file really is what its name says
    paths["corrupt.png"] = root / "corrupt.png"
    paths["corrupt.png"].write_bytes(b"\x89PNG\r\n\x1a\n" + rng.bytes(200))
    paths["missing.png"] = root / "missing.png"
    paths["a/same.png"] = write_image(root / "a" / "same.png", rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
    paths["b/same.png"] = write_image(root / "b" / "same.png", rng.integers(0, 256, (44, 56, 3), dtype=np.uint8))
    shelf = root / "shelf"
    write_image(shelf / "b.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    write_image(shelf / "a.JPG", rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    write_image(shelf / "sub" / "c.png", rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    (shelf / "notes.txt").write_text("not an image")
    paths["shelf"] = shelf
    paths["empty"] = root / "empty"
    paths["empty"].mkdir()
    paths["out"] = root / "overlays"
    return paths


ARGUMENTS = [*FORMATS, "corrupt.png", "missing.png", "a/same.png", "b/same.png", "shelf", "empty"]
FAILING = {"corrupt.png", "missing.png", "empty"}


@pytest.fixture(scope="module")
def main_run(inputs, config_file) -> tuple[Any, list[dict[str, Any]]]:
    result = invoke(
        "score",
        *(inputs[name] for name in ARGUMENTS),
        "--class",
        "widget",
        "--config",
        config_file,
        "--out",
        inputs["out"],
        "--batch-size",
        "3",
    )
    return result, json_lines(result.stdout)


def scored(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if "error" not in r]


def test_one_json_line_per_input_in_order(main_run, inputs):
    result, records = main_run
    shelf = inputs["shelf"]
    expected = [str(inputs[n]) for n in ARGUMENTS if n not in ("shelf", "empty")]
    expected += [str(shelf / "a.JPG"), str(shelf / "b.png"), str(inputs["empty"])]
    assert [r["path"] for r in records] == expected, result.stderr
    assert "engine ready" in result.stderr  # logs went to stderr, not stdout


@pytest.mark.parametrize("name", list(FORMATS))
def test_every_format_is_scored(main_run, inputs, name):
    _, records = main_run
    (record,) = [r for r in records if r["path"] == str(inputs[name])]
    assert set(record) == RECORD_KEYS | {"overlay"}
    assert record["product_class"] == "widget"
    assert 0.0 <= record["score"] <= 1.0
    assert record["threshold"] == 0.5 and record["threshold_source"] == "default"
    assert record["is_anomalous"] == (record["score"] >= record["threshold"])
    assert record["prompt_version"] == "untrained"
    assert record["timing"]["ms_per_image"] > 0 and 1 <= record["timing"]["batch_size"] <= 3
    height, width = FORMATS[name][0][:2]
    for defect in record["defects"]:
        assert set(defect) == DEFECT_KEYS
        x, y, w, h = defect["bbox"]
        assert 0 <= x < x + w <= width and 0 <= y < y + h <= height
        assert defect["area_px"] > 0 and 0.0 <= defect["score"] <= 1.0
        assert defect["type_probability"] is None or 0.0 <= defect["type_probability"] <= 1.0


def test_batches_hold_at_most_batch_size_images(main_run):
    _, records = main_run
    sizes = [r["timing"]["batch_size"] for r in scored(records)]
    assert max(sizes) == 3 and sum(sizes) / len(sizes) > 2  # 11 images -> batches of 3, 3, 3, 2


def test_unreadable_inputs_are_named_and_the_rest_scored(main_run, inputs):
    result, records = main_run
    assert result.exit_code == 1
    errors = {r["path"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {str(inputs[n]) for n in FAILING}
    assert all(set(r) == {"path", "error"} for r in records if "error" in r)
    assert "cannot decode" in errors[str(inputs["corrupt.png"])]
    assert "not found" in errors[str(inputs["missing.png"])]
    assert "no image files" in errors[str(inputs["empty"])]
    assert len(scored(records)) == len(records) - len(FAILING)


def test_overlays_have_the_image_size_and_distinct_names(main_run, inputs):
    _, records = main_run
    written = [Path(r["overlay"]) for r in scored(records)]
    assert len(set(written)) == len(written) == len(list(inputs["out"].glob("*_overlay.png")))
    for record, overlay in zip(scored(records), written, strict=True):
        source = cv2.imread(record["path"], cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(overlay), cv2.IMREAD_UNCHANGED)
        assert image.dtype == np.uint8 and image.shape == (*source.shape[:2], 3), overlay
    by_path = {r["path"]: Path(r["overlay"]).name for r in scored(records)}
    assert by_path[str(inputs["a/same.png"])] == "same_overlay.png"
    assert by_path[str(inputs["b/same.png"])] == "same-2_overlay.png"
    assert by_path[str(inputs["colour8.png"])] == "colour8_overlay.png"


# --- options -------------------------------------------------------------------------------------------------------
def test_threshold_option_wins_over_the_config(inputs, config_file, tmp_path):
    data = tomllib.loads(config_file.read_text())
    data["thresholds"] = {"widget": 0.99, "bottle": 0.0}
    data["cameras"].append({**data["cameras"][0], "id": "cam-2", "product_class": "bottle"})  # [thresholds] needs it
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps(data))
    files = [inputs["colour8.png"], inputs["gray16.png"]]
    widget = invoke("score", *files, "--class", "widget", "--config", config, "--threshold", "0")
    bottle = invoke("score", *files, "--class", "bottle", "--config", config)
    assert widget.exit_code == 0 and bottle.exit_code == 0, widget.stderr + bottle.stderr
    for record, source in [(r, "option") for r in json_lines(widget.stdout)] + [
        (r, "config") for r in json_lines(bottle.stdout)
    ]:
        assert (record["threshold"], record["threshold_source"], record["is_anomalous"]) == (0.0, source, True)
        assert record["timing"]["batch_size"] == 2  # default from [engine].batch_size (8): one batch
        assert "overlay" not in record


def test_checkpoint_option_loads_those_prompts(inputs, config_file, tmp_path):
    checkpoint = tmp_path / "line-7.safetensors"
    perturbed_checkpoint(checkpoint, load_backbone("genclip-tiny", "random"), tiny_config())
    result = invoke(
        "score", inputs["colour8.png"], "--class", "widget", "--config", config_file, "--checkpoint", checkpoint
    )
    assert result.exit_code == 0, result.stderr
    (record,) = json_lines(result.stdout)
    assert record["prompt_version"].startswith("line-7@")


def test_missing_checkpoint_exits_2_with_a_clear_message(inputs, config_file, tmp_path):
    missing = tmp_path / "nope.safetensors"
    result = invoke(
        "score", inputs["colour8.png"], "--class", "widget", "--config", config_file, "--checkpoint", missing
    )
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "--checkpoint" in result.stderr and "not found" in result.stderr and str(missing) in result.stderr


def test_bad_config_exits_2(inputs, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[model]\nbackbone = "genclip-tiny"\nbatch_size = 4\n')
    result = invoke("score", inputs["colour8.png"], "--class", "widget", "--config", config)
    assert result.exit_code == 2 and result.stdout == ""
    assert "model.batch_size: unknown key" in result.stderr


def test_help_explains_the_verbs():
    score = invoke("score", "--help")
    assert score.exit_code == 0
    for word in ("--class", "--checkpoint", "--out", "--config", "--batch-size", "--threshold", "JSON", "stderr"):
        assert word in score.stdout, word
    export = invoke("export", "--help")
    assert export.exit_code == 0 and "onnx" in export.stdout
    onnx = invoke("export", "onnx", "--help")
    for word in ("--classes", "--out", "--reference", "--checkpoint", "1e-3"):
        assert word in onnx.stdout, word


def verbs(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """Every verb and sub-verb of the CLI with its command path, e.g. ('bench agent', command)."""
    subcommands = getattr(command, "commands", {})
    if path:
        yield " ".join(path), command
    for name, sub in sorted(subcommands.items()):
        yield from verbs(sub, (*path, name))


def test_every_option_of_every_verb_is_explained():
    """--help is the manual on a line PC: no option without a text, no text cut off at a bare section name."""
    commands = dict(verbs(typer.main.get_command(app)))
    assert {"score", "export onnx", "train", "eval", "bench engine", "bench agent", "config check"} <= set(commands)
    for name, command in commands.items():
        assert command.help, name
        for param in command.params:
            text = (getattr(param, "help", None) or "").strip()
            assert text, f"genclip {name} {param.name}: no help text"
            assert not re.search(r"\[\w+\]\.?$", text), f"genclip {name} {param.name}: cut off: {text!r}"


def test_score_help_names_the_real_threshold_sources():
    score = dict(verbs(typer.main.get_command(app)))["score"].help
    for source in ("option", "config", "calibration", "stale-calibration", "default", "[agent].prompt_dir"):
        assert source in score, source
    assert "checkpoint's calibrated" not in score and "config, checkpoint or default" not in score


# --- end to end -------------------------------------------------------------------------------------------
def test_installed_command_prints_only_json_on_stdout(inputs, config_file):
    """A real process: nothing a library prints may reach stdout."""
    genclip = Path(sys.executable).parent / "genclip"
    command = [str(genclip), "score", str(inputs["gray16.png"]), str(inputs["shelf"]), "--class", "widget"]
    done = subprocess.run(
        [*command, "--config", str(config_file)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    records = json_lines(done.stdout)
    assert len(records) == 3 and all(set(r) == RECORD_KEYS for r in records)
    assert "engine ready" in done.stderr


def test_export_onnx_matches_torch(inputs, config_file, tmp_path):
    reference = tmp_path / "reference"
    for name in ("colour8.png", "gray8.png"):
        image = cv2.imread(str(inputs[name]), cv2.IMREAD_UNCHANGED)
        for copy in range(4):  # [model].min_reference_images is 8
            write_image(reference / "widget" / f"{copy}-{name}", image)
    out = tmp_path / "onnx" / "line.onnx"
    result = invoke(
        "export", "onnx", "--classes", "widget, bottle", "--out", out, "--config", config_file, "--reference", reference
    )
    assert result.exit_code == 0, result.stderr
    (line,) = json_lines(result.stdout)
    assert out.is_file() and out.stat().st_size > 0
    assert line["classes"] == ["widget", "bottle"] and line["ok"] is True
    assert set(line["used_names"]) == {"widget", "bottle"}
    assert math.isfinite(line["max_score_diff"]) and line["max_score_diff"] <= 1e-3
    assert math.isfinite(line["max_map_diff"]) and line["max_map_diff"] <= 1e-3
    assert "class registered" in result.stderr  # widget's name was decided from its reference images


def test_readme_export_without_reference_matches_the_engine(inputs, config_file, tmp_path):
    """README's command in a fresh process (as a user runs it: nothing scored before the export), then the
    exported graph run with onnxruntime on an image gives the score `genclip score` gives it."""
    import onnxruntime as ort

    genclip = Path(sys.executable).parent / "genclip"
    command = [str(genclip), "export", "onnx", "--classes", "bottle", "--out", "genclip.onnx"]
    done = subprocess.run(
        [*command, "--config", str(config_file)], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    (line,) = json_lines(done.stdout)
    assert line["ok"] is True and line["classes"] == ["bottle"] and line["used_names"] == {"bottle": "bottle"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genclip.onnx"]  # no staging folder left behind

    size = 224  # [model].image_size: the engine's resize is then the identity, as the graph expects
    image = write_image(tmp_path / "part.png", np.random.default_rng(5).integers(0, 256, (size, size, 3), np.uint8))
    engine = invoke("score", image, "--class", "bottle", "--config", config_file)
    assert engine.exit_code == 0, engine.stderr
    (record,) = json_lines(engine.stdout)
    rgb = cv2.imread(str(image))[:, :, ::-1].transpose(2, 0, 1)[None].astype(np.float32) / 255
    session = ort.InferenceSession(str(tmp_path / "genclip.onnx"), providers=["CPUExecutionProvider"])
    scores, maps = session.run(None, {"images": rgb, "class_index": np.zeros(1, np.int64)})
    assert maps.shape == (1, size, size)
    assert float(scores[0]) == pytest.approx(record["score"], abs=1e-4)


def fake_export(written: list[str]):
    """Stands in for the slow torch.onnx export: a graph and its external weights file, as a large model has."""

    def export(engine, classes, path, opset=18):
        written.append(engine.prompt_version)
        Path(path).write_bytes(b"new graph")
        Path(f"{path}.data").write_bytes(b"new weights")
        return None

    return export


@pytest.mark.parametrize("check", ["over tolerance", "raises"])
def test_failed_onnx_check_leaves_no_file(check, config_file, tmp_path, monkeypatch):
    from model import export

    def failing_check(scorer, path, batch=3, seed=0):
        if check == "raises":
            raise RuntimeError("onnxruntime cannot run the graph")
        return {"max_score_diff": 0.5, "max_map_diff": float("nan")}

    monkeypatch.setattr(export, "export_onnx", fake_export([]))
    monkeypatch.setattr(export, "check_onnx", failing_check)
    folder = tmp_path / "onnx"
    folder.mkdir()
    out = folder / "line.onnx"
    out.write_bytes(b"checked graph of yesterday")
    result = invoke("export", "onnx", "--classes", "widget", "--out", out, "--config", config_file)
    assert result.exit_code == 1
    assert out.read_bytes() == b"checked graph of yesterday"  # not replaced by the unchecked one
    assert [p.name for p in folder.iterdir()] == ["line.onnx"]  # nor anything else left beside it
    if check == "raises":
        assert isinstance(result.exception, RuntimeError)
    else:
        (line,) = json_lines(result.stdout)
        assert line["ok"] is False and line["max_score_diff"] == 0.5 and line["max_map_diff"] is None
        assert "nothing written" in result.stderr


def line_prompts(tmp_path: Path) -> tuple[Path, Backbone]:
    """A prompt_dir the trainer published two versions into (v2 the newest), and a config whose agent loads it."""
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    backbone = load_backbone("genclip-tiny", "random")
    for seed, name in enumerate(("line-1-v1", "line-1-v2"), start=1):
        perturbed_checkpoint(prompts / f"{name}.safetensors", backbone, tiny_config(), seed=seed)
    old = (prompts / "line-1-v2.safetensors").stat().st_mtime - 60
    os.utime(prompts / "line-1-v1.safetensors", (old, old))
    return prompts, backbone


def test_score_and_export_use_the_prompts_the_line_runs(inputs, config_file, tmp_path, monkeypatch):
    """[agent].prompt_dir's newest checkpoint, as the agent starts with (not [model].checkpoint); --checkpoint wins."""
    from model import export

    prompts, backbone = line_prompts(tmp_path)
    explicit = tmp_path / "bench-7.safetensors"
    perturbed_checkpoint(explicit, backbone, tiny_config(), seed=3)
    data = tomllib.loads(config_file.read_text())
    data["agent"]["prompt_dir"] = str(prompts)
    config = tmp_path / "config.toml"
    config.write_text(tomli_w.dumps(data))

    image = inputs["colour8.png"]
    line = invoke("score", image, "--class", "widget", "--config", config)
    chosen = invoke("score", image, "--class", "widget", "--config", config, "--checkpoint", explicit)
    untrained = invoke("score", image, "--class", "widget", "--config", config_file)
    assert line.exit_code == chosen.exit_code == untrained.exit_code == 0, line.stderr + chosen.stderr
    versions = [json_lines(r.stdout)[0]["prompt_version"] for r in (line, chosen, untrained)]
    assert versions[0].startswith("line-1-v2@") and versions[1].startswith("bench-7@")
    assert versions[2] == "untrained"
    assert json_lines(line.stdout)[0]["score"] != json_lines(untrained.stdout)[0]["score"]

    exported: list[str] = []
    monkeypatch.setattr(export, "export_onnx", fake_export(exported))
    monkeypatch.setattr(export, "check_onnx", lambda scorer, path: {"max_score_diff": 0.0, "max_map_diff": 0.0})
    out = tmp_path / "onnx" / "line.onnx"
    result = invoke("export", "onnx", "--classes", "widget", "--out", out, "--config", config)
    assert result.exit_code == 0, result.stderr
    assert exported == [versions[0]]
    assert out.read_bytes() == b"new graph" and Path(f"{out}.data").read_bytes() == b"new weights"
    assert sorted(p.name for p in out.parent.iterdir()) == ["line.onnx", "line.onnx.data"]
