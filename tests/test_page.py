"""The live page without a browser: its config, who may watch and act, the encoder's contract (fast)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from agent.control import Answer, Command
from agent.frames import Frame
from agent.health import HealthServer
from agent.metrics import AgentMetrics
from agent.page.config import PageConfig
from agent.page.encoder import FrameEncoder, StreamSettings
from agent.page.live import LiveFeed
from tests.faults_support import wait_for

TOKEN = "a-long-enough-token"


@dataclass
class FakeLine:
    """The service as the page sees it (agent/page/views.py LinePort); commands are recorded, not run."""

    metrics: AgentMetrics = field(default_factory=AgentMetrics)
    commands: list[Command] = field(default_factory=list)

    def info(self) -> dict[str, object]:
        cameras = [{"id": "cam-1", "product_class": "widget", "state": "running", "paused": False}]
        return {"line": "t", "name": "T", "status": {"state": "online", "reasons": []}, "cameras": cameras}

    def handle_command(self, command: Command) -> Answer:
        self.commands.append(command)
        return {"cameras": ["cam-1"]}

    def class_statuses(self) -> list[Any]:
        return []

    def sink_health(self) -> list[tuple[str, bool, str]]:
        return [("mqtt", False, "mqtt unreachable: connection refused")]

    def record_review(self, fields: dict[str, str]) -> str:
        return "1-0"


def call(url: str, body: dict[str, object] | None = None, cookie: str | None = None) -> tuple[int, Any, str]:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if cookie:
        headers["Cookie"] = cookie
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read()), response.headers.get("Set-Cookie", "")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read()), ""


@pytest.fixture
def served() -> Iterator[Any]:
    from agent.page.routes import Page

    made: list[tuple[Page, HealthServer]] = []

    def serve(**page: Any) -> tuple[str, FakeLine]:
        line = FakeLine()
        line.metrics.add_camera("cam-1")
        config = PageConfig(**page)
        web = Page(config, line, "t", ["cam-1"])
        server = HealthServer("127.0.0.1", 0, line.metrics, list, routes=web.routes())
        server.start()
        web.start()
        made.append((web, server))
        return f"http://127.0.0.1:{server.port}", line

    yield serve
    for web, server in made:
        web.stop()
        server.stop()


def test_config_secrets_and_their_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="shorter than 8"):
        PageConfig(token="short")
    with pytest.raises(ValidationError, match=r"needs \[page\]\.username"):
        PageConfig(password="long-enough-password")
    with pytest.raises(ValidationError, match="extra"):
        PageConfig(tokne="typo")  # type: ignore[call-arg]
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "page-token").write_text(TOKEN + "\n")
    (creds / "page-password").write_text("")  # empty credential = no password (as install.sh creates it)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    config = PageConfig()
    assert config.token is not None and config.token.get_secret_value() == TOKEN
    assert config.password is None and config.can_log_in
    assert TOKEN not in repr(config)


def test_viewing_needs_a_login_unless_anonymous_and_acting_always_does(served: Any) -> None:
    base, line = served(token=TOKEN)
    assert call(base + "/api/state")[0] == 401
    assert call(base + "/stream/cam-1.mjpg")[0] == 401
    assert call(base + "/api/events")[0] == 401
    assert call(base + "/healthz")[0] == 200  # health and metrics stay open for probes and Prometheus
    status, answer, _ = call(base + "/api/cameras/cam-1/pause", {})
    assert status == 401 and "login" in answer["error"] and line.commands == []

    status, answer, _ = call(base + "/api/login", {"token": "wrong-token-123"})
    assert status == 401
    status, answer, cookie = call(base + "/api/login", {"token": TOKEN})
    assert status == 200 and answer["user"] == "token"
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    session = cookie.split(";", 1)[0]
    status, state, _ = call(base + "/api/state", cookie=session)
    assert status == 200 and state["brokers"] == [
        {"sink": "mqtt", "up": False, "detail": "mqtt unreachable: connection refused"}
    ]
    assert state["cameras"][0]["counters"]["parts"] == 0
    status, answer, _ = call(base + "/api/cameras/cam-1/pause", {}, cookie=session)
    assert status == 200 and answer["user"] == "token" and answer["cameras"] == ["cam-1"]
    assert [(c.name, c.args.model_dump()) for c in line.commands] == [("pause", {"camera": "cam-1"})]
    status, answer, _ = call(base + "/api/classes/widget/threshold", {"value": 2.0}, cookie=session)
    assert status == 400 and len(line.commands) == 1  # validated before the command table sees it
    call(base + "/api/logout", {}, cookie=session)
    assert call(base + "/api/state", cookie=session)[0] == 401


def test_anonymous_viewing_when_configured_still_no_anonymous_actions(served: Any) -> None:
    base, line = served(anonymous_view=True)
    assert call(base + "/api/state")[0] == 200
    assert call(base + "/api/session")[1]["login"] == {"token": False, "password": False}
    assert call(base + "/api/classes/widget/threshold", {"value": 0.5})[0] == 401
    assert call(base + "/api/parts/1/review", {"label": "good"})[0] == 401
    assert line.commands == []


def frame(seq: int) -> Frame:
    return Frame(camera="cam-1", seq=seq, part_id=f"p{seq}", product_class="widget", image=np.zeros((48, 64, 3), "u1"))


def test_encoder_encodes_only_while_watched_and_drops_old_frames() -> None:
    feed = LiveFeed(ng_parts=4)
    encoded: list[str] = []
    viewers: dict[str, int] = {}
    encoder = FrameEncoder(feed, StreamSettings(fps=50, width=32, quality=70), encoded.append, viewers.__setitem__)
    encoder.start()
    try:
        for seq in range(1, 6):  # parts nobody watches: kept as references, never encoded
            f = frame(seq)
            feed.offer(f, _outcome(), _inspected(f))
        time.sleep(0.2)
        latest = feed.latest("cam-1")
        assert encoded == [] and latest is not None and latest.number == 5  # only the newest is kept
        f = frame(9)
        feed.offer(f, _outcome(), _inspected(f))
        key = encoder.open("cam-1", 40)
        assert viewers == {"cam-1": 1}
        wait_for(lambda: encoder.current(key) is not None, 5, "the first JPEG")
        current = encoder.current(key)
        assert current is not None and current.jpeg[:2] == b"\xff\xd8"
        time.sleep(0.2)
        assert len(encoded) == 1  # the same part is not encoded twice
        encoder.close(key)
        assert viewers == {"cam-1": 0} and encoder.current(key) is None
        f = frame(10)
        feed.offer(f, _outcome(), _inspected(f))
        time.sleep(0.2)
        assert len(encoded) == 1  # nobody watches: nothing more
    finally:
        encoder.stop()


def _outcome() -> Any:
    from agent.outcomes import BatchFailure

    return BatchFailure("widget", "test")


def _inspected(f: Frame) -> Any:
    from agent.results import build_inspection

    return build_inspection(f, _outcome(), line="t", window_s=1, maps="none", map_size=None, model={})
