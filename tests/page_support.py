"""What the live page's tests share: a `genclip run` with two synthetic cameras, its /metrics, a browser.

The browser is Debian's Chromium (`/usr/bin/chromium`, installed by `make setup` through
`deploy/services.sh install`) driven by Playwright through `executable_path`: nothing downloads a browser.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w

from tests.factories import tiny_config

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("GENCLIP_CHROMIUM", "/usr/bin/chromium"))
TOKEN = "page-test-token-0123456789"
ARTEFACTS = Path(os.environ.get("GENCLIP_TEST_ARTEFACTS", REPO / "test-artefacts"))


def chromium() -> str:
    """Debian's Chromium; the test fails (never skips) without it: `make setup` installs it."""
    if not CHROMIUM.is_file():
        found = shutil.which("chromium")
        if found is None:
            pytest.fail(f"{CHROMIUM} not found: run `make setup` (deploy/services.sh install adds Debian's chromium)")
        return found
    return str(CHROMIUM)


def good_parts(folder: Path, texture: str, seed: int, count: int = 10) -> Path:
    """`count` defect-free 160x120 crops of a synthetic texture: a class's reference images (its calibration)."""
    import cv2

    from synthetic.textures import instance_seed, render_texture

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        cv2.imwrite(str(folder / f"good-{i:02d}.png"), render_texture(texture, instance_seed(seed, 100 + i), 160)[:120])
    return folder


def page_config(tmp: Path, mqtt_port: int, redis_url: str, health_port: int, line: str) -> Path:
    """A line of two synthetic cameras (widget, tile) on genclip-tiny, the page on with a token login; `widget`
    is calibrated on good parts at start (its calibration figures show on the page), `tile` is not."""
    token_file = tmp / "page-token"
    token_file.write_text(TOKEN + "\n")
    cameras = [
        {
            "id": f"cam-{i + 1}",
            "source": f"synthetic:page-{i + 1}",
            "product_class": product,
            "fps": 3.0,
            "synthetic": {"defect_rate": 0.5, "seed": i + 1, "width": 160, "height": 120, "texture": texture},
        }
        for i, (product, texture) in enumerate((("widget", "metal"), ("tile", "tiles")))
    ]
    config = {
        "line": {"id": line, "name": "Page test"},
        "model": tiny_config().model_dump(mode="json", exclude_none=True, by_alias=True),
        "engine": {"batch_size": 4, "max_wait_ms": 20},
        "cameras": cameras,
        "references": {"widget": str(good_parts(tmp / "good-widget", "metal", 1))},
        "mqtt": {"port": mqtt_port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0},
        "redis": {"url": redis_url, "maps": "ng", "reconnect_min_s": 0.1, "reconnect_max_s": 0.5},
        "agent": {"health_port": health_port, "shutdown_timeout_s": 5, "state_dir": str(tmp / "state")},
        "page": {"anonymous_view": True, "token_file": str(token_file), "stream_fps": 4},
        "logging": {"level": "INFO", "format": "json"},
    }
    path = tmp / f"{line}.toml"
    path.write_text(tomli_w.dumps(config))
    return path


@contextlib.contextmanager
def running_agent(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`genclip run --config` as systemd runs it; SIGTERM at the end."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "run", "--config", str(config)], stdout=out, stderr=out, env=env, cwd=REPO
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scrape(base: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the agent's /metrics, by name and labels."""
    text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$", line)
        if m:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            out[(m.group(1), labels)] = float(m.group(3))
    return out


def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: Any) -> float:
    want = {(k, str(v)) for k, v in labels.items()}
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
