"""`genclip train` as a user runs it: a real Ctrl-C and --resume, no config file, publishing for a line.

The resume test interrupts a real `genclip train` process with SIGINT, as Ctrl-C does, once
log.jsonl shows its second epoch line, then resumes it; everything is genclip-tiny on tiny
images, so each run takes seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.factories import tiny_config
from tests.test_trainer import synthetic_set
from trainer.evaluate import headline

ROOT = Path(__file__).resolve().parent.parent
THREE = ("woven", "grain", "metal")
runner = CliRunner()


def line_config(tmp_path: Path, image_size: int = 224) -> Path:
    """A line's config: genclip-tiny at `image_size`, validation that three tiny classes can support."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "line.toml"
    path.write_text(
        "[model]\n"
        'backbone = "genclip-tiny"\n'
        'pretrained = "random"\n'
        'device = "cpu"\n'
        f"image_size = {image_size}\n"
        "[trainer]\n"
        "min_validation_images = 3\n"
        "bootstrap_rounds = 10\n"
        "workers = 0\n"
        "batch_size = 8\n"
    )
    return path


def genclip(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """`genclip ARGS` in a new process (this checkout's cli package first on the path)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    environment.pop("GENCLIP_CONFIG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "cli", *args],
        cwd=cwd,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def log_epochs(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    return synthetic_set(tmp_path_factory.mktemp("three") / "data", THREE, 14, seed=8, size=64)


# --- Ctrl-C, then --resume ----------------------------------------------------------------------------
def test_resume_after_a_real_ctrl_c_reports_the_best_of_every_epoch(three_classes, tmp_path):
    config, out = line_config(tmp_path), tmp_path / "run"
    args = [
        *("train", "--config", str(config), "--data", f"synthetic:{three_classes}@all", "--out", str(out)),
        *("--epochs", "3", "--image-size", "64", "--workers", "0", "--no-progress"),
    ]
    first = genclip(*args, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while len(log_epochs(out)) < 2 and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "the run ended before it could be interrupted"
    first.send_signal(signal.SIGINT)  # Ctrl-C, in the second training epoch (or the third, on a slow machine)
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 130, stdout + stderr
    done = log_epochs(out)[-1]["epoch"]  # 1, or 2 if epoch 2 ended before the signal came
    assert f"interrupted after epoch {done} of 3" in stdout, stdout
    assert f"log.jsonl: epochs 0-{done}" in stdout and "--resume" in stdout
    interrupted = json.loads((out / "summary.json").read_text())
    assert interrupted["interrupted"] and interrupted["epochs_done"] == done
    assert interrupted["baseline"] is not None and interrupted["best_metrics"] is not None

    resumed = genclip(*args, "--resume", cwd=tmp_path)
    stdout, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stdout + stderr
    log = log_epochs(out)
    assert [e["epoch"] for e in log] == [0, 1, 2, 3]  # one line per epoch: none lost, none twice
    scores = {e["epoch"]: headline(e["val"]["results"]) for e in log[1:]}
    best = max(scores, key=lambda epoch: (scores[epoch], -epoch))  # the first of the highest
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_done"] == 3 and not summary["interrupted"]
    assert summary["best_epoch"] == best, (scores, summary["best_epoch"])
    assert summary["baseline"] == log[0]["val"]
    assert summary["best_metrics"] == log[best]["val"]
    assert f"best epoch {best}: image AUROC" in stdout and "(the last)" not in stdout, stdout
    assert "done: 3 epoch(s)" in stdout


# --- no config file -----------------------------------------------------------------------------------
def test_train_without_a_config_fails_at_once_and_says_what_to_do(tmp_path):
    probe = (
        "import runpy, sys\n"
        "sys.argv = ['genclip', 'train', '--data', 'synthetic:nowhere']\n"
        "try:\n"
        "    runpy.run_module('cli', run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    print('exit', exc.code, 'torch imported' if 'torch' in sys.modules else 'torch not imported')\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    environment.pop("GENCLIP_CONFIG", None)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - started < 10
    assert "exit 2 torch not imported" in result.stdout, result.stdout + result.stderr
    said = result.stderr
    assert "model.pretrained: required key is missing" in said
    assert said.count("no config file") == 1 and "--config PATH" in said
    assert "[model]" in said and 'pretrained = "random"' in said and 'backbone = "genclip-tiny"' in said
    assert 'pretrained = "openai"' in said and "weights file" in said
    assert "GENCLIP_MODEL__PRETRAINED" in said


def test_a_config_file_without_pretrained_names_the_file_to_fix(tmp_path):
    config = tmp_path / "line.toml"
    config.write_text('[model]\nbackbone = "genclip-tiny"\n')
    result = runner.invoke(app, ["train", "--config", str(config), "--data", "synthetic:nowhere"])
    assert result.exit_code == 2
    assert f"set pretrained in the [model] section of {config}" in result.output, result.output
    assert 'pretrained = "random"' in result.output


# --- publishing what the line will accept -------------------------------------------------------------
def test_publish_refuses_a_run_at_another_image_size_before_training(three_classes, tmp_path):
    out, prompts = tmp_path / "run", tmp_path / "prompts"
    args = [
        *("train", "--data", f"synthetic:{three_classes}@all", "--out", str(out), "--epochs", "1"),
        *("--publish", str(prompts), "--no-progress"),
    ]
    line_at_224 = line_config(tmp_path / "224", image_size=224)
    refused = runner.invoke(app, [*args, "--config", str(line_at_224), "--image-size", "64"])
    assert refused.exit_code == 2, refused.output
    said = " ".join(refused.output.split())
    assert "field 'image_size' is 64 in this run but 224 in the line's [model]" in said, said
    assert "--image-size" in said and "nothing was trained or published" in said
    assert not prompts.exists() and not (out / "log.jsonl").exists()

    line_at_64 = line_config(tmp_path / "64", image_size=64)
    accepted = runner.invoke(app, [*args, "--config", str(line_at_64), "--force"])
    assert accepted.exit_code == 0, accepted.output
    assert [p.name for p in prompts.iterdir()] == ["run.safetensors"]


def test_publish_checks_the_checkpoint_itself_against_the_line(tmp_path):
    from model import Engine
    from model.checkpoint import CheckpointError
    from tests.factories import perturbed_checkpoint
    from trainer.training import PublishError, publish

    line = Engine(tiny_config(image_size=224))
    checkpoint, prompts = tmp_path / "best.safetensors", tmp_path / "prompts"
    perturbed_checkpoint(checkpoint, line.backbone, tiny_config(image_size=64))  # trained at 64 px
    with pytest.raises(CheckpointError, match="field 'image_size' is 64"):
        line.prepare_prompts(checkpoint)  # what the agent does with it
    with pytest.raises(PublishError, match=r"field 'image_size' is 64 in the checkpoint but 224 in the line's"):
        publish(checkpoint, prompts, "run", line.identity())
    assert not prompts.exists()
    perturbed_checkpoint(checkpoint, line.backbone, tiny_config(image_size=224))
    assert publish(checkpoint, prompts, "run", line.identity()) == prompts / "run.safetensors"


# --- genclip publish: a checkpoint trained and evaluated first ------------------------------------------
def published_line(tmp_path: Path, image_size: int) -> tuple[Path, Path]:
    """A line config whose agent watches `<tmp>/prompts`; returns (config, prompts folder)."""
    config, prompts = line_config(tmp_path, image_size=image_size), tmp_path / "prompts"
    config.write_text(config.read_text() + f'[agent]\nprompt_dir = "{prompts}"\n')
    return config, prompts


def trained_checkpoint(path: Path, image_size: int) -> Path:
    from model.backbone import load_backbone
    from tests.factories import perturbed_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    perturbed_checkpoint(path, load_backbone("genclip-tiny", "random"), tiny_config(image_size=image_size))
    return path


def test_publish_puts_a_checkpoint_the_line_takes_where_it_watches(tmp_path):
    from model.checkpoint import read_checkpoint

    config, prompts = published_line(tmp_path, image_size=64)
    best = trained_checkpoint(tmp_path / "runs" / "disc-1" / "best.safetensors", image_size=64)
    result = runner.invoke(app, ["publish", str(best), "--config", str(config)])
    assert result.exit_code == 0, result.output
    target = prompts / "disc-1.safetensors"  # named after the run folder, as train --publish names it
    digest = read_checkpoint(target).digest
    assert f"published: {target} (prompt version disc-1@{digest[:12]})" in result.output
    assert "warning" not in result.output and target.read_bytes() == best.read_bytes()
    assert target.stat().st_mode & 0o777 == 0o644  # the agent runs as another user
    assert [p.name for p in prompts.iterdir()] == ["disc-1.safetensors"]  # no temporary file left

    elsewhere = runner.invoke(app, ["publish", str(best), "--config", str(config), "--to", str(tmp_path / "x")])
    assert elsewhere.exit_code == 0 and (tmp_path / "x" / "disc-1.safetensors").is_file()
    assert f"the line's agent does not watch {tmp_path / 'x'}" in elsewhere.output, elsewhere.output


def test_publish_refuses_what_the_line_would_refuse(tmp_path):
    config, prompts = published_line(tmp_path, image_size=224)
    best = trained_checkpoint(tmp_path / "runs" / "disc-1" / "best.safetensors", image_size=64)
    result = runner.invoke(app, ["publish", str(best), "--config", str(config)])
    assert result.exit_code == 1, result.output
    said = " ".join(result.output.split())
    assert "not published: the line (the config's [model]) would refuse it" in said, said
    assert "field 'image_size' is 64 in the checkpoint but 224" in said
    assert not prompts.exists()

    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    junk = runner.invoke(app, ["publish", str(tmp_path / "junk.safetensors"), "--config", str(config)])
    assert junk.exit_code == 1 and "not published" in junk.output and not prompts.exists()
    missing = runner.invoke(app, ["publish", str(tmp_path / "none.safetensors"), "--config", str(config)])
    assert missing.exit_code == 2 and "checkpoint not found" in missing.output


def test_eval_reports_the_prompts_it_measured_the_lines_by_default(three_classes, tmp_path):
    config, prompts = published_line(tmp_path, image_size=64)
    best = trained_checkpoint(tmp_path / "runs" / "disc-1" / "best.safetensors", image_size=64)
    assert runner.invoke(app, ["publish", str(best), "--config", str(config)]).exit_code == 0
    args = ["eval", "--config", str(config), "--data", f"synthetic:{three_classes}@all", "--grid-good", "0"]
    result = runner.invoke(app, [*args, "--grid-per-kind", "0", "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "report" / "report.json").read_text())["meta"]
    assert meta["checkpoint"] == str(prompts / "disc-1.safetensors")  # the line's prompts, not "untrained"
    assert meta["prompt_version"].startswith("disc-1@") and f"prompts {meta['prompt_version']}: " in result.output


def test_no_publish_keeps_a_run_from_the_line_whose_config_publishes_every_run(three_classes, tmp_path):
    config, prompts = line_config(tmp_path, image_size=64), tmp_path / "prompts"
    config.write_text(config.read_text() + f'publish_dir = "{prompts}"\n')  # [trainer], as a line's config has it
    out = tmp_path / "run"
    args = ["train", "--config", str(config), "--data", f"synthetic:{three_classes}@all", "--out", str(out)]
    both = runner.invoke(app, [*args, "--no-publish", "--publish", str(prompts)])
    assert both.exit_code == 2 and "contradict" in both.output
    result = runner.invoke(app, [*args, "--epochs", "1", "--no-publish", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert not prompts.exists() and json.loads((out / "summary.json").read_text())["published"] is None
    assert f"not published; to the line, once evaluated: genclip publish {out / 'best.safetensors'}" in result.output
