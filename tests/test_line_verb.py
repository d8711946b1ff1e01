"""`genclip line`: the operator's verb against a real Mosquitto and a running InspectionService."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomli_w
from pydantic import SecretStr
from typer.testing import CliRunner, Result

from agent.config import InspectConfig
from cli.main import app
from tests.brokers import free_port
from tests.test_agent import line_config, running, wait_for
from tests.test_deploy_acl import broker, mqtt_passwords

__all__ = ["broker", "mqtt_passwords", "running"]  # fixtures, imported for pytest

pytestmark = pytest.mark.timeout(240)
AGENT_LOG = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \[")  # the service runs in this process


def config_file(tmp_path: Path, cfg: InspectConfig) -> Path:
    """The line's config as a file, the way `genclip run` and `genclip line` read it."""
    data = cfg.model_dump(mode="json", exclude_none=True, by_alias=True)
    data["mqtt"].pop("password", None)
    data["redis"].pop("password", None)
    path = tmp_path / "line.toml"
    path.write_text(tomli_w.dumps(data))
    return path


class Said:
    """What the verb printed: its exit code, stdout and stderr, without the in-process agent's log lines."""

    def __init__(self, result: Result) -> None:
        self.exit_code = result.exit_code
        self.stdout, self.stderr = _own(result.stdout), _own(result.stderr)
        self.output = result.output


def _own(text: str) -> str:
    return "".join(line for line in text.splitlines(keepends=True) if not AGENT_LOG.match(line))


def genclip(config: Path, *args: str) -> Said:
    return Said(CliRunner().invoke(app, ["line", *args, "--config", str(config)]))


def test_info_threshold_pause_and_refusals_against_a_running_line(tmp_path, mosquitto, redis_server, running):
    cfg = line_config(tmp_path, mosquitto.port, redis_server.url, "verb")
    config = config_file(tmp_path, cfg)
    service = running(cfg)
    wait_for(lambda: service.status.current.state == "online", 60, "the line online")

    shown = genclip(config, "info")
    assert shown.exit_code == 0, shown.output
    assert "line verb (Line 1): online" in shown.stdout
    assert "  widget  threshold 0.6200 (config)" in shown.stdout
    assert "  cam-1  class widget  " in shown.stdout and "  cam-2  class widget  " in shown.stdout
    raw = genclip(config, "info", "--json")
    assert raw.exit_code == 0 and json.loads(raw.stdout)["classes"]["widget"]["threshold"] == 0.62

    answered = genclip(config, "threshold", "WIDGET", "0.7")  # matched ignoring case, as the line does
    assert answered.exit_code == 0, answered.output
    assert answered.stdout.startswith("ok: widget threshold 0.7 (source command")
    assert service.worker.engine.classes.threshold("widget") == (0.7, "command")
    shown = genclip(config, "info")
    assert "  widget  threshold 0.7000 (command)" in shown.stdout, shown.output
    assert "  cam-1  class widget  running, free-run" in shown.stdout  # the info the command re-published

    unknown = genclip(config, "threshold", "bolt", "0.5")
    assert unknown.exit_code == 1, unknown.output
    assert "refused threshold: unknown product class 'bolt' on this line (classes: widget)" in unknown.stderr

    for bad in ("high", "1.5", "nan"):
        refused = genclip(config, "threshold", "widget", bad)
        assert refused.exit_code == 2, refused.output
        assert f"VALUE {bad!r}" in refused.stderr
    assert service.worker.engine.classes.threshold("widget") == (0.7, "command")  # nothing sent

    paused = genclip(config, "pause", "cam-2")
    assert paused.exit_code == 0 and paused.stdout.strip() == "ok: paused cam-2", paused.output
    assert service.batcher.paused() == ["cam-2"]
    assert "  cam-2  class widget  running, paused" in genclip(config, "info").stdout
    nobody = genclip(config, "resume", "cam-9")
    assert nobody.exit_code == 1 and "unknown camera 'cam-9' on this line (cameras: cam-1, cam-2)" in nobody.stderr
    resumed = genclip(config, "resume", "--json")
    assert resumed.exit_code == 0 and json.loads(resumed.stdout)["cameras"] == ["cam-1", "cam-2"]
    assert service.batcher.paused() == []

    reload = genclip(config, "reload")  # no checkpoint configured: the line says why, nothing changes
    assert reload.exit_code == 1 and "refused reload: " in reload.stderr and "no checkpoint" in reload.stderr

    service.shutdown()
    silent = genclip(config, "threshold", "widget", "0.6", "--timeout", "1")
    assert silent.exit_code == 3, silent.output
    assert "line 'verb' did not answer threshold within 1 s (its status: stopped)" in silent.stderr
    stale = genclip(config, "info")  # the broker still keeps the last info; the status says the line is gone
    assert stale.exit_code == 0 and "line verb (Line 1): stopped" in stale.stdout
    assert "published while the line was online: it may be old" in stale.stdout


def test_no_broker_no_info_and_bad_credentials_options(tmp_path, mosquitto):
    cfg = InspectConfig(line={"id": "ghost"}, model={"backbone": "genclip-tiny", "pretrained": "random"})
    nowhere = config_file(tmp_path, cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"port": free_port()})}))
    unreachable = genclip(nowhere, "info", "--timeout", "2")
    assert unreachable.exit_code == 3 and "cannot reach the broker at 127.0.0.1:" in unreachable.stderr

    here = config_file(tmp_path, cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update={"port": mosquitto.port})}))
    never_ran = genclip(here, "info", "--timeout", "3")
    assert never_ran.exit_code == 3, never_ran.output
    assert "nothing retained on genclip/ghost/info" in never_ran.stderr
    silent = genclip(here, "snapshot", "--timeout", "1")
    assert silent.exit_code == 3 and "line 'ghost' did not answer snapshot within 1 s" in silent.stderr

    (tmp_path / "password").write_text("secret\n")
    alone = genclip(here, "info", "--password-file", str(tmp_path / "password"))
    assert alone.exit_code == 2 and "give --username" in alone.stderr
    missing = genclip(here, "info", "--username", "op", "--password-file", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "--password-file: cannot read" in missing.stderr


def test_the_shipped_acl_takes_commands_from_the_operator_and_refuses_the_agents_account(
    tmp_path, broker, mqtt_passwords, redis_server, running
):
    """deploy/mosquitto/acl: the operator's account sends commands and reads its own reply topic; the agent's
    account (the [mqtt].username of the same config file) is refused by the broker, before the line sees it."""
    _, passwords = mqtt_passwords
    cfg = line_config(tmp_path, broker.port, redis_server.url, "line-1")
    agent = {"username": "genclip-line-1", "password": SecretStr(passwords["genclip-line-1"])}
    cfg = cfg.model_copy(update={"mqtt": cfg.mqtt.model_copy(update=agent)})
    config = config_file(tmp_path, cfg)  # names the agent's account: the verb never logs in with it
    service = running(cfg)
    wait_for(lambda: service.status.current.state == "online", 60, "the line online")
    for user in ("genclip-operator", "genclip-line-1"):
        (tmp_path / user).write_text(passwords[user] + "\n")

    operator = ("--username", "genclip-operator", "--password-file", str(tmp_path / "genclip-operator"))
    answered = genclip(config, "threshold", "widget", "0.7", *operator)
    assert answered.exit_code == 0, answered.output
    assert service.worker.engine.classes.threshold("widget") == (0.7, "command")
    assert "  widget  threshold 0.7000 (command)" in genclip(config, "info", *operator).stdout

    as_agent = ("--username", "genclip-line-1", "--password-file", str(tmp_path / "genclip-line-1"))
    refused = genclip(config, "threshold", "widget", "0.5", *as_agent)
    assert refused.exit_code == 2, refused.output
    assert "the broker refused the command on genclip/line-1/cmd/threshold: Not authorized" in refused.stderr
    assert service.worker.engine.classes.threshold("widget") == (0.7, "command")

    anonymous = genclip(config, "info", "--timeout", "3")
    assert anonymous.exit_code == 2 and "refused the connection" in anonymous.stderr, anonymous.output
    (tmp_path / "wrong").write_text("not-the-password\n")
    wrong = genclip(config, "info", "--username", "genclip-operator", "--password-file", str(tmp_path / "wrong"))
    assert wrong.exit_code == 2 and "refused the connection" in wrong.stderr, wrong.output
