"""The configuration tree: file, environment, secrets, errors a line engineer can act on."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from agent.config import ConfigError, InspectConfig
from agent.logs import configure_logging, get_logger
from cli.main import app
from cli.settings import load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config.toml"
runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No GENCLIP_* or systemd credentials from the outside world leak into these tests."""
    import os

    for key in list(os.environ):
        if key.startswith("GENCLIP_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)


def write(tmp_path: Path, text: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def edited(tmp_path: Path, old: str, new: str) -> Path:
    text = CONFIG.read_text()
    assert old in text, f"test expects {old!r} in config.toml"
    return write(tmp_path, text.replace(old, new, 1))


def test_repo_config_loads_and_matches_the_defaults_it_documents():
    cfg = load_config(CONFIG)
    assert cfg.line.id == "line-1"
    assert cfg.model.backbone == "genclip-tiny" and cfg.model.pretrained == "random"
    assert cfg.engine.batch_size == 8 and cfg.mqtt.qos == 1
    assert [c.id for c in cfg.cameras] == ["cam-1"]
    assert cfg.product_classes() == ["widget"]
    assert cfg.trainer.betas == (0.5, 0.999)


def test_built_in_defaults_need_only_the_weights_named(monkeypatch):
    with pytest.raises(ValidationError, match=r"model\.pretrained"):
        InspectConfig()
    monkeypatch.setenv("GENCLIP_MODEL__PRETRAINED", "random")
    cfg = InspectConfig()
    assert cfg.mqtt.host == "127.0.0.1" and cfg.redis.url.startswith("redis://")


@pytest.mark.parametrize("value", ["", "  ", "random:x"])
def test_pretrained_must_name_weights_explicitly(tmp_path, value):
    path = tmp_path / "line.toml"
    path.write_text(CONFIG.read_text().replace('pretrained = "random"', f"pretrained = {value!r}"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert any(line.startswith("model.pretrained:") for line in err.value.errors)


def test_environment_overrides_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("GENCLIP_MQTT__HOST", "10.1.2.3")
    monkeypatch.setenv("GENCLIP_ENGINE__BATCH_SIZE", "16")
    monkeypatch.setenv("GENCLIP_MODEL__PRECISION", "bf16")
    monkeypatch.setenv("GENCLIP_THRESHOLDS", '{"widget": 0.61}')
    cfg = load_config(CONFIG)
    assert cfg.mqtt.host == "10.1.2.3"
    assert cfg.mqtt.port == 1883  # the rest of the section still comes from the file
    assert cfg.engine.batch_size == 16 and cfg.engine.max_wait_ms == 20
    assert cfg.model.precision == "bf16" and cfg.model.backbone == "genclip-tiny"
    assert cfg.thresholds == {"widget": 0.61}


def test_config_path_from_environment(tmp_path, monkeypatch):
    path = edited(tmp_path, 'id = "line-1"', 'id = "press-7"')
    monkeypatch.setenv("GENCLIP_CONFIG", str(path))
    assert load_config().line.id == "press-7"


@pytest.mark.parametrize(
    ("old", "new", "where"),
    [
        ("[engine]\nbatch_size = 8", "[engine]\nbatch_sise = 8", "engine.batch_sise"),
        ("[line]\n", "[line]\ncolour = 'red'\n", "line.colour"),
        ("[logging]", "[loging]\nlevel = 'INFO'\n[logging]", "loging"),
        ("[mqtt.tls]\nenabled = false", "[mqtt.tls]\nenable = false", "mqtt.tls.enable"),
    ],
)
def test_unknown_keys_are_rejected_with_their_path(tmp_path, old, new, where):
    with pytest.raises(ConfigError) as err:
        load_config(edited(tmp_path, old, new))
    assert any(e.startswith(f"{where}: unknown key") for e in err.value.errors), err.value.errors


def test_misspelt_environment_key_is_rejected(monkeypatch):
    monkeypatch.setenv("GENCLIP_MQTT__HOTS", "x")
    with pytest.raises(ConfigError, match=r"mqtt\.HOTS|mqtt\.hots"):
        load_config(CONFIG)


@pytest.mark.parametrize(
    ("old", "new", "where", "what"),
    [
        ("batch_size = 8 ", "batch_size = -4 ", "engine.batch_size", "greater than or equal to 1"),
        ("qos = 1", "qos = 3", "mqtt.qos", "less than or equal to 2"),
        ('device = "auto"', 'device = "gpu0"', "model.device", "'auto', 'cpu', 'cuda'"),
        ('id = "line-1"', 'id = "Line 1!"', "line.id", "lower-case"),
        ("fps = 5", "fps = 0", "cameras.0.fps", "greater than 0"),
        ('url = "redis://127.0.0.1:6379/0"', 'url = "redis://u:hunter2@h:6379/0"', "redis.url", "password"),
        ("# widget = 0.62", "widget = 1.5", "thresholds", "outside 0..1"),
        ('precision = "fp32"', 'precision = "int4"', "model.precision", "'fp32', 'bf16' or 'fp16'"),
    ],
)
def test_bad_values_are_reported_with_their_path(tmp_path, old, new, where, what):
    with pytest.raises(ConfigError) as err:
        load_config(edited(tmp_path, old, new))
    assert any(e.startswith(f"{where}:") and what in e for e in err.value.errors), err.value.errors


def test_every_error_is_listed_at_once(tmp_path):
    path = write(
        tmp_path, '[model]\npretrained = "random"\n[engine]\nbatch_size = 0\nmax_wait_ms = -1\n[mqtt]\nport = 0\n'
    )
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert {e.split(":")[0] for e in err.value.errors} == {"engine.batch_size", "engine.max_wait_ms", "mqtt.port"}


def test_duplicate_camera_ids_and_broken_toml(tmp_path):
    cams = '[[cameras]]\nid="a"\nsource="0"\nproduct_class="x"\n' * 2
    with pytest.raises(ConfigError, match="repeated: a"):
        load_config(write(tmp_path, cams))
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[mqtt\nhost=1"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_missing_files_named_in_model_section(tmp_path):
    with pytest.raises(ConfigError, match=r"model: .*checkpoint: prompt checkpoint \(file or folder\) not found"):
        load_config(edited(tmp_path, "# checkpoint = ", "checkpoint = "))


# --- secrets --------------------------------------------------------------------------------------
def test_secrets_from_file_and_systemd_credentials(tmp_path, monkeypatch):
    secret = tmp_path / "mqtt-pass"
    secret.write_text("s3cret-from-file\n")
    cfg = load_config(edited(tmp_path, '# password_file = "/etc/genclip/mqtt-password"', f'password_file = "{secret}"'))
    assert cfg.mqtt.password.get_secret_value() == "s3cret-from-file"

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis-password").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load_config(CONFIG)
    assert cfg.redis.password.get_secret_value() == "from-systemd"
    assert cfg.mqtt.password is None

    with pytest.raises(ConfigError, match=r"mqtt\.password_file: cannot read password file /nope"):
        load_config(edited(tmp_path, '# password_file = "/etc/genclip/mqtt-password"', 'password_file = "/nope"'))


def test_empty_password_file_or_credential_means_no_password(tmp_path, monkeypatch):
    """The installer leaves /etc/genclip/credentials/<line>/*-password empty: a broker without a password."""
    empty = tmp_path / "mqtt-pass"
    empty.write_text("\n")
    cfg = load_config(edited(tmp_path, '# password_file = "/etc/genclip/mqtt-password"', f'password_file = "{empty}"'))
    assert cfg.mqtt.password is None

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("")
    (creds / "redis-password").write_text(" \n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load_config(CONFIG)
    assert cfg.mqtt.password is None and cfg.redis.password is None
    (creds / "mqtt-password").write_text("set-later\n")
    assert load_config(CONFIG).mqtt.password.get_secret_value() == "set-later"


def test_config_show_masks_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("GENCLIP_MQTT__PASSWORD", "hunter2-mqtt")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "redis-password").write_text("hunter2-redis")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    result = runner.invoke(app, ["config", "show", "--config", str(CONFIG)])
    assert result.exit_code == 0, result.output
    assert "hunter2" not in result.output
    shown = tomllib.loads(result.output)
    assert shown["mqtt"]["password"] == "********" and shown["redis"]["password"] == "********"
    assert shown["engine"]["batch_size"] == 8 and shown["cameras"][0]["id"] == "cam-1"


def test_secrets_never_reach_log_lines(monkeypatch):
    monkeypatch.setenv("GENCLIP_MQTT__PASSWORD", "hunter2-mqtt")
    cfg = load_config(CONFIG)
    stream = io.StringIO()
    configure_logging(cfg.line.id, "INFO", "json", stream=stream)
    log = get_logger("test")
    log.info("starting", config=cfg.model_dump(), password="plain-hunter2", url="redis://u:hunter2-url@h:1/0")
    log.info("mqtt", mqtt=cfg.mqtt)
    logging.getLogger("paho").warning("connecting with token=%s", "x")
    text = stream.getvalue()
    assert "hunter2" not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 3 and all(line["line"] == "line-1" for line in lines)
    assert lines[0]["password"] == "********"


def test_console_format_on_request_and_json_otherwise():
    stream = io.StringIO()
    configure_logging("line-9", "INFO", "console", stream=stream)
    get_logger("t").info("hello", camera="cam-1")
    assert "hello" in stream.getvalue() and "line-9" in stream.getvalue()
    with pytest.raises(json.JSONDecodeError):
        json.loads(stream.getvalue().splitlines()[0])
    stream = io.StringIO()
    configure_logging("line-9", "INFO", "auto", stream=stream)  # StringIO is not a terminal
    get_logger("t").info("hello")
    assert json.loads(stream.getvalue())["event"] == "hello"


# --- the CLI --------------------------------------------------------------------------------------
def test_config_check_ok_and_errors(tmp_path):
    ok = runner.invoke(app, ["config", "check", "--config", str(CONFIG)])
    assert ok.exit_code == 0 and ok.output.startswith("config OK") and len(ok.output.splitlines()) == 1
    bad = edited(tmp_path, "batch_size = 8 ", "batch_sise = 8 ")
    result = runner.invoke(app, ["config", "check", "--config", str(bad)])
    assert result.exit_code == 2 and "engine.batch_sise: unknown key" in result.output
    neg = edited(tmp_path, "batch_size = 8 ", "batch_size = -1 ")
    result = runner.invoke(app, ["config", "check", "--config", str(neg)])
    assert result.exit_code == 2 and "engine.batch_size: Input should be greater than or equal to 1" in result.output


def test_config_check_warns_about_camera_sources_that_are_missing_or_no_video(tmp_path):
    """Warnings (exit 0): a camera may be plugged in later, a file may appear; each names the camera, the path
    and what the source is taken as. Devices by index, streams and existing videos and folders are not warned."""
    import cv2
    import numpy as np

    video = tmp_path / "line.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    writer.write(np.zeros((48, 64, 3), np.uint8))
    writer.release()
    garbage = tmp_path / "notes.avi"
    garbage.write_bytes(b"\x00not a video\xff" * 500)
    (tmp_path / "frames").mkdir()
    sources = {
        "gone": tmp_path / "missing.avi",
        "bad": garbage,
        "later": tmp_path / "share",
        "ok-video": video,
        "ok-folder": tmp_path / "frames",
        "ok-stream": "rtsp://10.0.0.9/cam",
        "ok-index": "3",
    }
    cameras = "".join(
        f'\n[[cameras]]\nid = "{name}"\nsource = "{source}"\nproduct_class = "widget"\n'
        for name, source in sources.items()
    )
    path = write(tmp_path, CONFIG.read_text() + cameras)
    result = runner.invoke(app, ["config", "check", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("config OK") and len(result.stdout.splitlines()) == 1
    assert result.stderr.splitlines() == [
        f"warning: camera gone: source '{tmp_path}/missing.avi': file not found; taken as a video file "
        "(kind auto: a video file by its extension), retried until it opens",
        f"warning: camera bad: source '{garbage}': OpenCV cannot open this file as a video (not a video, or a "
        "codec this OpenCV build lacks); taken as a video file (kind auto: an existing file), retried until it opens",
        f"warning: camera later: source '{tmp_path}/share' does not exist; kind auto takes it as a folder of "
        "images, waited for until it appears (a video file or device that appears later: set kind = 'opencv')",
    ]


def test_config_check_model_loads_weights_or_names_what_is_missing(tmp_path):
    ok = runner.invoke(app, ["config", "check", "--config", str(CONFIG), "--model"])
    assert ok.exit_code == 0, ok.output
    assert "model OK: genclip-tiny, weights random-init:seed=0" in ok.output and "random weights" in ok.output
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(b"not a weights file")
    broken = edited(tmp_path, 'pretrained = "random"', f'pretrained = "{garbage}"')
    result = runner.invoke(app, ["config", "check", "--config", str(broken), "--model"])
    assert result.exit_code == 2, result.output
    assert f"model NOT OK: cannot load weights {garbage} into genclip-tiny" in result.output


def test_installed_console_script_version_and_help():
    exe = shutil.which("genclip", path=str(Path(sys.executable).parent))
    assert exe, "the genclip console script is not installed in this environment"
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("genclip-inspect ")
    for verb in (["--help"], ["config", "--help"], ["config", "check", "--help"], ["config", "show", "--help"]):
        out = subprocess.run([exe, *verb], capture_output=True, text=True)
        assert out.returncode == 0 and "Usage" in out.stdout, verb
    check = subprocess.run([exe, "config", "check", "--config", str(CONFIG)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_a_threshold_or_reference_for_a_class_no_camera_inspects_is_an_error(tmp_path):
    """A misspelt class under [thresholds] would otherwise be ignored and the line run on the default."""
    refs = tmp_path / "refs"
    refs.mkdir()
    base = '[model]\npretrained = "random"\n[[cameras]]\nid = "a"\nsource = "0"\nproduct_class = "metal  nut"\n'
    ok = base + f'[thresholds]\n" metal nut" = 0.5\n[references]\n"metal nut" = "{refs}"\n'
    assert load_config(write(tmp_path, ok)).thresholds == {" metal nut": 0.5}  # names compared normalised
    bad = base + f'[thresholds]\nmetal_nut = 0.5\n[references]\nbotle = "{refs}"\n'
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, bad))
    assert err.value.errors == [
        "thresholds.metal_nut: no camera on this line inspects class 'metal_nut' (its cameras' classes: metal nut)",
        "references.botle: no camera on this line inspects class 'botle' (its cameras' classes: metal nut)",
    ]
    assert load_config(write(tmp_path, '[model]\npretrained = "random"\n[thresholds]\nx = 0.5\n')).thresholds


@pytest.mark.parametrize(("level", "warns"), [("INFO", False), ("DEBUG", True)])
def test_opencv_plain_text_warnings_stay_out_of_the_json_log(level, warns):
    """A truncated PNG makes OpenCV print '[ WARN:0@...] global grfmt_png.cpp ...' to stderr: a line that breaks
    `jq` on the journal. Below DEBUG the agent silences it (it logs the failure itself, as JSON)."""
    code = (
        "import cv2, numpy as np\n"
        "from agent.logs import configure_logging\n"
        f"configure_logging('line-1', '{level}', 'json')\n"
        "data = cv2.imencode('.png', np.zeros((64, 64, 3), np.uint8))[1].tobytes()[:120]\n"
        "assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) is None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    assert ("[ WARN" in done.stderr) is warns, done.stderr


def test_errors_from_the_environment_name_the_variable(tmp_path, monkeypatch):
    """The file is not where to look when the bad value came from GENCLIP_*; a single underscore (no section
    separator) would otherwise be silently ignored."""
    path = write(tmp_path, '[model]\npretrained = "random"\n')
    monkeypatch.setenv("GENCLIP_ENGINE__BATCHSIZE", "16")
    monkeypatch.setenv("GENCLIP_MQTT__PORT", "0")
    monkeypatch.setenv("GENCLIP_MQTT_HOST", "10.0.0.5")
    monkeypatch.setenv("GENCLIP_MQT__HOST", "10.0.0.5")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert sorted(err.value.errors) == sorted(
        [
            "environment variable GENCLIP_MQT__HOST: no section 'mqt' (sections: line, model, engine, cameras, "
            "thresholds, references, mqtt, redis, opcua, agent, page, trainer, logging)",
            "environment variable GENCLIP_MQTT_HOST: not a setting; a section and its key are joined by two "
            "underscores (GENCLIP_MQTT__HOST)",
            "engine.batchsize (from GENCLIP_ENGINE__BATCHSIZE): unknown key (misspelt, or not in this section)",
            "mqtt.port (from GENCLIP_MQTT__PORT): Input should be greater than or equal to 1",
        ]
    )
    monkeypatch.delenv("GENCLIP_ENGINE__BATCHSIZE")
    monkeypatch.delenv("GENCLIP_MQTT__PORT")
    monkeypatch.delenv("GENCLIP_MQT__HOST")
    with pytest.raises(ConfigError, match="GENCLIP_MQTT_HOST: not a setting"):
        load_config(path)  # alone, too
    monkeypatch.delenv("GENCLIP_MQTT_HOST")
    monkeypatch.setenv("GENCLIP_STATE_DIR", str(tmp_path))  # deploy/services.sh's, not a config key
    monkeypatch.setenv("GENCLIP_THRESHOLDS", '{"x": 0.5}')  # a top-level key: no section separator needed
    assert load_config(path).thresholds == {"x": 0.5}
