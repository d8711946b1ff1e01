"""docs/training.md's walk-through (a new product, from 30 good photos to a calibrated line), run as written.

The shell blocks under `<!-- walkthrough -->` are run verbatim, in order, with bash (`set -eo
pipefail`, so a failing command fails the test) in one work folder. What the test provides, and
nothing else:
  - `photos/`: 30 good "photos" of one product, rendered by synthetic/ (the metal surface);
  - `GENCLIP_CONFIG`: a line config of its own: genclip-tiny with random weights at 64 px, short
    training, its own brokers and folders under the temporary folder, plus the doc's
    `<!-- walkthrough: config -->` TOML block with its two paths moved there (the reference folder
    becomes the work folder's good/reference, the camera folder one in the temporary folder);
  - `genclip` on PATH: this checkout's (`python -m cli`);
  - `$XDG_CONFIG_HOME/mosquitto_rr` and `mosquitto_sub`: `-p <port>` of the test's Mosquitto, as the
    doc tells a plant to put its broker's options there;
  - at `<!-- walkthrough: the line restarts -->` (a systemctl command in the doc), `genclip run` with
    that config, in the background, as the line's agent.
Then it checks what the doc promises the last step shows: the published prompts, the class's
threshold from a calibration, equal to the one `genclip calibrate` printed.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from synthetic.textures import write_good_images
from tests.brokers import free_port

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "training.md"
MARKER = re.compile(r"<!-- walkthrough(?:: (?P<what>[^>]+?))? -->")
CLASS = "brake disc"
ZERO_TRAINED = ("zero-shot", "brake-disc-1")  # step 4's and step 5's reports


@dataclass(frozen=True)
class Step:
    """One marked place in the doc: a shell block to run, the config block, or where the line restarts."""

    kind: str  # "run" | "config" | "line"
    text: str


def walkthrough_steps(doc: str) -> list[Step]:
    """The marked blocks of `doc`, in order (a marker is followed by a fenced block, or is the restart)."""
    steps = []
    lines = doc.splitlines()
    for i, line in enumerate(lines):
        found = MARKER.fullmatch(line.strip())
        if found is None:
            continue
        what = found.group("what") or ""
        if what == "the line restarts":
            steps.append(Step("line", ""))
            continue
        fence = lines[i + 1]
        assert fence.startswith("```"), f"docs/training.md:{i + 2}: a marker must be followed by a fenced block"
        end = lines.index("```", i + 2)
        body = "\n".join(lines[i + 2 : end]) + "\n"
        kind = {"": "run", "config": "config"}[what]
        assert fence == ("```toml" if kind == "config" else "```bash"), f"docs/training.md:{i + 2}: {fence}"
        steps.append(Step(kind, body))
    return steps


def line_config(tmp: Path, work: Path, doc_block: str, mqtt_port: int, redis_url: str) -> Path:
    """The line's config: a small test line, plus the doc's TOML block with its folders moved under `tmp`."""
    added = tomllib.loads(doc_block)
    assert set(added["references"]) == {CLASS}, added
    added["references"][CLASS] = str(work / "good" / "reference")  # the doc's /var/lib/genclip/reference/...
    for camera in added["cameras"]:
        camera["source"] = str(tmp / "frames" / camera["id"])  # the doc's /srv/genclip/line-1/disc
        Path(camera["source"]).mkdir(parents=True)
    state = tmp / "var"
    config = {
        "line": {"id": "line-1", "name": "walk-through"},
        "model": {
            "backbone": "genclip-tiny",
            "pretrained": "random",
            "device": "cpu",
            "image_size": 64,
            "profile_dir": str(state / "profiles"),
        },
        "engine": {"batch_size": 8, "threads": 2},
        "cameras": added["cameras"],
        "references": added["references"],
        "mqtt": {"host": "127.0.0.1", "port": mqtt_port, "heartbeat_s": 0},
        "redis": {"url": redis_url},
        "agent": {"health_port": free_port(), "prompt_dir": str(state / "prompts"), "reload_debounce_s": 0.2},
        "trainer": {
            "epochs": 2,
            "batch_size": 8,
            "workers": 0,
            "bootstrap_rounds": 10,
            "amp": False,
            "publish_dir": str(state / "prompts"),
            "out_dir": str(state / "runs"),
        },
        "logging": {"level": "INFO", "format": "json"},
    }
    path = tmp / "line-1.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def environment(tmp: Path, config: Path, mqtt_port: int) -> dict[str, str]:
    """The shell's environment: this checkout's genclip first on PATH, the line's config, the broker's port."""
    bin_dir, clients = tmp / "bin", tmp / "xdg-config"
    bin_dir.mkdir()
    clients.mkdir()
    shim = bin_dir / "genclip"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cli "$@"\n')
    shim.chmod(0o755)
    for client in ("mosquitto_rr", "mosquitto_sub"):
        (clients / client).write_text(f"-h 127.0.0.1\n-p {mqtt_port}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENCLIP_")}
    return env | {
        "PATH": f"{bin_dir}:{env.get('PATH', '/usr/bin:/bin')}",
        "PYTHONPATH": str(ROOT),
        "HF_HUB_OFFLINE": "1",
        "GENCLIP_CONFIG": str(config),
        "XDG_CONFIG_HOME": str(clients),
    }


def run_block(block: str, work: Path, env: dict[str, str]) -> str:
    started, cpu = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        ["bash", "-c", "set -eo pipefail\n" + block],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"{block}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}"
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    seconds = used.ru_utime + used.ru_stime - cpu.ru_utime - cpu.ru_stime
    print(f"{time.monotonic() - started:6.1f} s wall, {seconds:6.1f} s CPU: {block.splitlines()[0][:90]}")
    return done.stdout


def wait_for_class(env: dict[str, str], agent: subprocess.Popen[str], deadline_s: float = 120) -> dict:
    """The line's retained info once the agent has set the new class up (the agent still running)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        assert agent.poll() is None, f"genclip run ended: {agent.returncode}"
        got = subprocess.run(
            ["mosquitto_sub", "-t", "genclip/line-1/info", "-C", "1", "-W", "2"],
            env=env,
            capture_output=True,
            text=True,
        )
        if got.returncode == 0 and CLASS in json.loads(got.stdout).get("classes", {}):
            return json.loads(got.stdout)
        time.sleep(0.5)
    raise AssertionError("the line never reported the new class")


def test_the_walkthrough_runs_as_written(mosquitto, redis_server, tmp_path):
    steps = walkthrough_steps(DOC.read_text())
    assert [s.kind for s in steps].count("config") == 1 and [s.kind for s in steps].count("line") == 1
    work = tmp_path / "brake-disc"
    write_good_images("metal", work / "photos", 30, seed=5, size=96)
    config_block = next(s.text for s in steps if s.kind == "config")
    config = line_config(tmp_path, work, config_block, mosquitto.port, redis_server.url)
    env = environment(tmp_path, config, mosquitto.port)

    outputs: list[str] = []
    agent: subprocess.Popen[str] | None = None
    log = (tmp_path / "agent.log").open("w")
    try:
        for step in steps:
            if step.kind == "run":
                outputs.append(run_block(step.text, work, env))
            elif step.kind == "line":  # systemctl restart of the Type=notify unit returns once the line is up
                agent = subprocess.Popen(
                    [sys.executable, "-m", "cli", "run"], env=env, cwd=tmp_path, stdout=log, stderr=log, text=True
                )
                at_start = wait_for_class(env, agent)
        assert agent is not None
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            agent.wait(timeout=60)
        log.close()
    said = "\n".join(outputs)
    assert said.split()[:2] == ["10", "20"]  # step 1: 10 training photos, 20 reference photos
    assert "done: 2 epoch(s)" in said
    run = json.loads((work / "runs" / "brake-disc-1" / "summary.json").read_text())
    assert run["published"] is None  # step 5 keeps the run from the line until step 7 publishes it
    reports = {name: json.loads((work / "report" / name / "report.json").read_text())["meta"] for name in ZERO_TRAINED}
    assert reports["zero-shot"]["prompt_version"] == "untrained"  # what the line ran at the restart
    assert reports["brake-disc-1"]["checkpoint"] == "runs/brake-disc-1/best.safetensors"
    calibrated = float(re.search(r'^"brake disc" = ([0-9.]+)$', said, re.MULTILINE).group(1))
    assert "published: " in said and "brake-disc-1.safetensors" in said

    reload, shown = outputs[-1].strip().splitlines()[0], json.loads("".join(outputs[-1].strip().splitlines()[1:]))
    answer = json.loads(reload)
    assert answer["ok"] and answer["prompt_version"].startswith("brake-disc-1@"), answer
    assert shown["prompts"] == answer["prompt_version"]
    assert at_start["model"]["prompt_version"] == "untrained"  # zero-shot at the restart, calibrated already
    assert at_start["classes"][CLASS]["threshold_source"] == "calibration", at_start["classes"]
    assert shown["disc"]["threshold_source"] == "calibration", shown
    assert abs(shown["disc"]["threshold"] - calibrated) < 1e-5, (shown, calibrated)
    assert agent.returncode == 0, (tmp_path / "agent.log").read_text()[-3000:]
