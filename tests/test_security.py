"""Security: TLS and passwords to the brokers, fail-fast on credentials, no unpickling, no secret in any output.

The brokers are real: a Mosquitto with only a TLS listener and a password file, a redis-server with
`requirepass` and an ACL user, both started here on free loopback ports with a CA made by openssl.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import redis
import structlog.testing
import tomli_w
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from typer.testing import CliRunner

from agent.config import InspectConfig
from agent.publish.config import MqttConfig, RedisConfig
from agent.publish.mqtt import MqttPublisher
from agent.publish.redis_streams import RedisStreamPublisher
from agent.service import InspectionService, StartupError
from cli.main import app
from tests.brokers import MosquittoServer, RedisServer, free_port, require_binary
from tests.factories import tiny_config
from tests.test_publish_mqtt import make_inspection, wait_until
from tests.tls_support import (
    MQTT_PASSWORD,
    MQTT_USER,
    REDIS_DEFAULT_PASSWORD,
    REDIS_PASSWORD,
    REDIS_USER,
    PasswordRedis,
    Pki,
    TlsMosquitto,
    make_pki,
    serving,
)

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No GENCLIP_* or systemd credentials from outside leak into these tests."""
    for key in list(os.environ):
        if key.startswith("GENCLIP_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_mosquitto(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[TlsMosquitto]:
    """TLS only, passwords required: the way a plant broker should be set up."""
    exe = require_binary(MosquittoServer.binary)
    yield from serving(TlsMosquitto(tmp_path_factory.mktemp("tls-mosquitto"), pki, executable=exe))


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PasswordRedis]:
    exe = require_binary(RedisServer.binary)
    yield from serving(PasswordRedis(tmp_path_factory.mktemp("password-redis"), executable=exe))


@pytest.fixture
def line() -> str:
    return f"s{uuid.uuid4().hex[:8]}"


@pytest.fixture
def made() -> Iterator[list[Any]]:
    """Publishers and subscribers of a test, stopped afterwards whatever happened."""
    things: list[Any] = []
    yield things
    for thing in reversed(things):
        thing.stop(timeout=1.0) if hasattr(thing, "stop") else thing.close()


def secret_file(folder: Path, name: str, value: str) -> Path:
    path = folder / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def tls_mqtt(broker: MosquittoServer, ca: Path, **overrides: Any) -> MqttConfig:
    keys: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": broker.port,
        "tls": {"enabled": True, "ca_file": ca},
        "reconnect_min_s": 0.1,
        "reconnect_max_s": 0.5,
        "keepalive_s": 5,
    }
    return MqttConfig(**{**keys, **overrides})


class TlsSubscriber:
    """An MQTT 5 client over TLS, logged in as MQTT_USER, that records what it receives."""

    def __init__(self, port: int, ca: Path, topics: list[str], *, cert: tuple[Path, Path] | None = None) -> None:
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"tls-sub-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.tls_set(ca_certs=str(ca), certfile=cert and str(cert[0]), keyfile=cert and str(cert[1]))
        self.client.username_pw_set(MQTT_USER, MQTT_PASSWORD)
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([(t, 1) for t in topics])
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert subscribed.wait(10), "TLS subscriber got no SUBACK"

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(message)

    def on(self, topic: str) -> list[bytes]:
        with self.lock:
            return [m.payload for m in self.messages if m.topic == topic]

    def all(self) -> list[mqtt.MQTTMessage]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


# --- MQTT over TLS with a password ---------------------------------------------------------------


def test_publisher_over_tls_with_a_password_file(
    tls_mosquitto: TlsMosquitto, pki: Pki, tmp_path: Path, made: list[Any], line: str
) -> None:
    password = secret_file(tmp_path, "mqtt-password", MQTT_PASSWORD)
    config = tls_mqtt(tls_mosquitto, pki.ca, username=MQTT_USER, password_file=password)
    sub = TlsSubscriber(tls_mosquitto.port, pki.ca, [f"genclip/{line}/#"])
    made.append(sub)
    pub = MqttPublisher(config, line)
    made.append(pub)
    pub.start()
    assert pub.startup_problem(10) is None
    assert wait_until(lambda: pub.health() == (True, "connected")), pub.health()
    pub.publish_inspection(make_inspection(line, 1, "NG"))
    reject = f"genclip/{line}/cam-1/reject"
    assert wait_until(lambda: sub.on(f"genclip/{line}/status") == [b"online"] and len(sub.on(reject)) == 1)
    assert json.loads(sub.on(reject)[0])["part_id"] == "cam-1-1"


def test_a_plain_client_cannot_reach_the_tls_broker(tls_mosquitto: TlsMosquitto, made: list[Any], line: str) -> None:
    """The TLS listener is all there is: no credentials or results travel in clear text."""
    pub = MqttPublisher(MqttConfig(port=tls_mosquitto.port, reconnect_min_s=0.1, reconnect_max_s=0.5), line)
    made.append(pub)
    pub.start()
    assert wait_until(lambda: pub.health()[1] != "connecting"), "a connection closed before CONNACK went unnoticed"
    time.sleep(0.3)
    ok, reason = pub.health()
    assert not ok and reason.startswith("broker closed the connection before accepting it: "), reason
    assert reason.endswith("(if [mqtt].port is a TLS listener, enable [mqtt.tls])")
    assert pub.startup_problem(0) is None  # a broker at its connection limit does the same: retried


def test_client_certificate_when_the_broker_requires_one(pki: Pki, tmp_path: Path, made: list[Any], line: str) -> None:
    broker = TlsMosquitto(tmp_path / "mtls", pki, require_certificate=True)
    with broker:
        password = secret_file(tmp_path, "mqtt-password", MQTT_PASSWORD)
        config = tls_mqtt(
            broker,
            pki.ca,
            username=MQTT_USER,
            password_file=password,
            tls={"enabled": True, "ca_file": pki.ca, "cert_file": pki.client_cert, "key_file": pki.client_key},
        )
        sub = TlsSubscriber(broker.port, pki.ca, [f"genclip/{line}/status"], cert=(pki.client_cert, pki.client_key))
        made.append(sub)
        pub = MqttPublisher(config, line)
        made.append(pub)
        pub.start()
        assert wait_until(lambda: sub.on(f"genclip/{line}/status") == [b"online"]), pub.health()
        for thing in (pub, sub):
            made.remove(thing)
            thing.stop(timeout=1.0) if thing is pub else thing.close()


# --- refused for good: wrong CA, wrong password; merely down: retried ------------------------------


def test_wrong_ca_is_a_permanent_startup_problem(
    tls_mosquitto: TlsMosquitto, pki: Pki, made: list[Any], line: str
) -> None:
    config = tls_mqtt(tls_mosquitto, pki.other_ca, username=MQTT_USER, password=MQTT_PASSWORD)
    with structlog.testing.capture_logs() as logs:
        pub = MqttPublisher(config, line)
        made.append(pub)
        pub.start()
        problem = pub.startup_problem(10)
        time.sleep(0.6)  # more attempts: still one log line
    assert problem is not None
    assert problem.startswith(f"TLS certificate verification failed for 127.0.0.1:{tls_mosquitto.port}: ")
    # Mosquitto sends its CA along, so OpenSSL sees a chain ending in a self-signed CA it does not trust.
    untrusted = "(self-signed certificate in certificate chain|unable to get local issuer certificate)"
    assert re.search(untrusted, problem) and "(check [mqtt.tls].ca_file:" in problem, problem
    assert re.fullmatch(f"TLS certificate verification failed: {untrusted}", pub.health()[1]), pub.health()
    refused = [e for e in logs if e["event"] == "mqtt connection refused"]
    assert len(refused) == 1 and refused[0]["detail"] == problem


def test_a_certificate_for_another_host_is_a_permanent_startup_problem(
    pki: Pki, tmp_path: Path, made: list[Any], line: str
) -> None:
    with TlsMosquitto(tmp_path / "elsewhere", pki, elsewhere=True) as broker:
        pub = MqttPublisher(tls_mqtt(broker, pki.ca, username=MQTT_USER, password=MQTT_PASSWORD), line)
        made.append(pub)
        pub.start()
        problem = pub.startup_problem(10)
    assert problem is not None and problem.startswith(
        f"TLS certificate verification failed for 127.0.0.1:{broker.port}"
    )
    assert "IP address mismatch, certificate is not valid for '127.0.0.1'" in problem
    assert problem.endswith("(the broker's certificate is not issued for [mqtt].host: use a name or address it names)")


@pytest.mark.parametrize(
    ("user", "password", "expected"),
    [
        # Mosquitto 2.0 answers a wrong password with 0x87 Not authorized (0x86 is for a malformed login).
        (
            MQTT_USER,
            "not-the-password",
            f"refused the login for user '{MQTT_USER}': not authorized (the password does not match",
        ),
        ("nobody", MQTT_PASSWORD, "refused the login for user 'nobody': not authorized (the password does not match"),
        (None, None, "refused the login for an anonymous client: not authorized (set [mqtt].username"),
    ],
)
def test_refused_login_is_a_permanent_startup_problem(
    tls_mosquitto: TlsMosquitto,
    pki: Pki,
    made: list[Any],
    line: str,
    user: str | None,
    password: str | None,
    expected: str,
) -> None:
    pub = MqttPublisher(tls_mqtt(tls_mosquitto, pki.ca, username=user, password=password), line)
    made.append(pub)
    pub.start()
    problem = pub.startup_problem(10)
    assert problem is not None and problem.startswith(f"MQTT broker 127.0.0.1:{tls_mosquitto.port} "), problem
    assert expected in problem
    assert password is None or password not in problem


def test_a_broker_that_is_down_is_no_startup_problem_and_is_retried(
    pki: Pki, tmp_path: Path, made: list[Any], line: str
) -> None:
    broker = TlsMosquitto(tmp_path / "later", pki)
    config = tls_mqtt(broker, pki.ca, username=MQTT_USER, password=MQTT_PASSWORD)
    pub = MqttPublisher(config, line)
    made.append(pub)
    pub.start()
    began = time.monotonic()
    assert pub.startup_problem(5) is None
    assert time.monotonic() - began < 2, "a refused TCP connection must be an answer at once"
    assert pub.health()[1].startswith("broker unreachable")
    with broker:
        assert wait_until(lambda: pub.health() == (True, "connected")), pub.health()
        pub.stop(timeout=1.0)


# --- Redis with a password and an ACL user -------------------------------------------------------


def redis_config(server: RedisServer, **overrides: Any) -> RedisConfig:
    return RedisConfig(url=server.url, reconnect_min_s=0.05, reconnect_max_s=0.2, **overrides)


@pytest.mark.parametrize("user", [REDIS_USER, None])
def test_redis_publisher_with_acl_user_or_requirepass(
    password_redis: PasswordRedis, tmp_path: Path, made: list[Any], line: str, user: str | None
) -> None:
    secret = secret_file(tmp_path, "redis-password", REDIS_PASSWORD if user else REDIS_DEFAULT_PASSWORD)
    pub = RedisStreamPublisher(redis_config(password_redis, username=user, password_file=secret), line)
    made.append(pub)
    pub.start()
    assert pub.startup_problem(10) is None
    pub.publish_inspection(make_inspection(line, 3, "NG", map_png=b"png"))
    pub.publish_info({"line": line})
    assert wait_until(lambda: pub.stats["result"].sent == 1 and pub.stats["info"].sent == 1), pub.health()
    assert pub.stats["map"].sent == 1 and pub.health() == (True, "connected")
    with redis.Redis.from_url(password_redis.url, password=REDIS_DEFAULT_PASSWORD, socket_timeout=5) as admin:
        [(_, fields)] = admin.xrange(f"genclip:{line}:results")
        assert json.loads(fields[b"payload"])["seq"] == 3


@pytest.mark.parametrize(
    ("user", "password", "expected"),
    [
        (REDIS_USER, "not-the-password", "invalid username-password pair or user is disabled"),
        (None, "not-the-password", "invalid username-password pair or user is disabled"),
        (None, None, "(no password is configured: set [redis].username and its password"),
    ],
)
def test_redis_refusing_the_login_is_a_permanent_startup_problem(
    password_redis: PasswordRedis, made: list[Any], line: str, user: str | None, password: str | None, expected: str
) -> None:
    pub = RedisStreamPublisher(redis_config(password_redis, username=user, password=password), line)
    made.append(pub)
    pub.start()
    problem = pub.startup_problem(10)
    who = user or "default"
    assert problem is not None
    assert problem.startswith(f"Redis at {password_redis.url} refused the login for user '{who}': "), problem
    assert expected in problem and "[redis].username" in problem
    assert password is None or password not in problem
    assert pub.health()[1].startswith("redis refused")


def test_redis_down_is_no_startup_problem(made: list[Any], line: str) -> None:
    pub = RedisStreamPublisher(RedisConfig(url=f"redis://127.0.0.1:{free_port()}/0", reconnect_min_s=0.05), line)
    made.append(pub)
    pub.start()
    assert pub.startup_problem(5) is None and pub.health()[1].startswith("redis unreachable")


# --- the service: refused for good stops `genclip run` at start; merely down does not ------------------


def line_config(line: str, *, mqtt: dict[str, Any], redis: dict[str, Any], **agent: Any) -> dict[str, Any]:
    """A one-camera synthetic line as TOML-ready data, logging everything (DEBUG, JSON)."""
    return {
        "line": {"id": line},
        "model": tiny_config().model_dump(mode="json", exclude_none=True, by_alias=True),
        "engine": {"batch_size": 2, "max_wait_ms": 20},
        "cameras": [
            {
                "id": "cam-1",
                "source": "synthetic:1",
                "product_class": "widget",
                "fps": 6,
                "synthetic": {"width": 96, "height": 72, "defect_rate": 0.5},
            }
        ],
        "mqtt": {"reconnect_min_s": 0.1, "reconnect_max_s": 0.5, "decision_window_ms": 30_000, **mqtt},
        "redis": {"reconnect_min_s": 0.05, "reconnect_max_s": 0.2, **redis},
        "agent": {"health_port": 0, "shutdown_timeout_s": 5, **agent},
        "logging": {"level": "DEBUG", "format": "json"},
    }


def genclip(config: Path, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[str]:
    """`genclip run` as systemd starts it, from this checkout, stderr (the JSON log) captured."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GENCLIP_") and k != "CREDENTIALS_DIRECTORY"}
    environment |= {"PYTHONPATH": str(REPO), **(env or {})}
    command = [sys.executable, "-c", "from cli.main import main; main()", "run", "--config", str(config)]
    return subprocess.Popen(command, env=environment, **{"stderr": subprocess.PIPE, "text": True, **kwargs})


def log_lines(stderr: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]


def test_genclip_run_exits_1_at_once_on_an_untrusted_broker_certificate(
    tls_mosquitto: TlsMosquitto, pki: Pki, password_redis: PasswordRedis, tmp_path: Path, line: str
) -> None:
    mqtt = {"port": tls_mosquitto.port, "tls": {"enabled": True, "ca_file": str(pki.other_ca)}}
    mqtt |= {"username": MQTT_USER, "password_file": str(secret_file(tmp_path, "m", MQTT_PASSWORD))}
    redis_keys = {"url": password_redis.url, "username": REDIS_USER, "password": REDIS_PASSWORD}
    config = tmp_path / "line.toml"
    config.write_text(tomli_w.dumps(line_config(line, mqtt=mqtt, redis=redis_keys)))
    began = time.monotonic()
    proc = genclip(config)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr[-3000:]
    assert time.monotonic() - began < 30
    [cannot] = [e for e in log_lines(stderr) if e["event"] == "cannot start"]
    assert cannot["level"] == "error"
    assert cannot["reason"].startswith(f"TLS certificate verification failed for 127.0.0.1:{tls_mosquitto.port}: ")
    assert "(check [mqtt.tls].ca_file:" in cannot["reason"]
    assert "engine ready" not in stderr, "the engine was loaded before the configuration error was reported"
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("mqtt_password", "redis_password", "message"),
    [
        ("not-the-password", REDIS_PASSWORD, "MQTT broker 127.0.0.1:{mqtt_port} refused the login for user"),
        (MQTT_PASSWORD, "not-the-password", "Redis at {redis_url} refused the login for user 'genclip-agent': "),
        (MQTT_PASSWORD, None, "(no password is configured: set [redis].username"),
    ],
)
def test_a_refused_login_stops_the_service_at_start(
    tls_mosquitto: TlsMosquitto,
    pki: Pki,
    password_redis: PasswordRedis,
    line: str,
    mqtt_password: str,
    redis_password: str | None,
    message: str,
) -> None:
    mqtt = {"port": tls_mosquitto.port, "tls": {"enabled": True, "ca_file": str(pki.ca)}}
    mqtt |= {"username": MQTT_USER, "password": mqtt_password}
    redis_keys = {"url": password_redis.url, "username": REDIS_USER}
    if redis_password is not None:
        redis_keys["password"] = redis_password
    service = InspectionService(InspectConfig(**line_config(line, mqtt=mqtt, redis=redis_keys)))
    try:
        with pytest.raises(StartupError) as refused:
            service.start()
        assert message.format(mqtt_port=tls_mosquitto.port, redis_url=password_redis.url) in str(refused.value)
        assert "not-the-password" not in str(refused.value)
        assert service.worker.engine is None, "the engine was loaded before the configuration error was reported"
    finally:
        service.shutdown()  # what `run` does after a StartupError: must not raise either


def test_brokers_down_at_start_do_not_stop_the_line(pki: Pki, tmp_path: Path, line: str) -> None:
    broker, store = TlsMosquitto(tmp_path / "mqtt", pki), PasswordRedis(tmp_path / "redis")  # not started yet
    mqtt = {"port": broker.port, "tls": {"enabled": True, "ca_file": str(pki.ca)}}
    mqtt |= {"username": MQTT_USER, "password": MQTT_PASSWORD}
    redis_keys = {"url": store.url, "username": REDIS_USER, "password": REDIS_PASSWORD}
    service = InspectionService(InspectConfig(**line_config(line, mqtt=mqtt, redis=redis_keys)))
    try:
        service.start()  # within LINK_CHECK_S: both refuse the TCP connection, which is no reason to stop
        reasons = service.health_reasons()
        assert any(r.startswith("mqtt: broker unreachable") for r in reasons), reasons
        assert any(r.startswith("redis: redis unreachable") for r in reasons), reasons
        with broker, store:
            sub = TlsSubscriber(broker.port, pki.ca, [f"genclip/{line}/+/result"])
            try:
                assert wait_until(lambda: len(sub.on(f"genclip/{line}/cam-1/result")) >= 2, 60)
            finally:
                sub.close()
            assert wait_until(lambda: service.redis.stats["result"].sent >= 2, 30)
            assert service.mqtt.health() == service.redis.health() == (True, "connected")
            service.shutdown()  # while the brokers are up: nothing to wait for
    finally:
        if not service._stop.is_set():
            service.shutdown()


# --- secrets never leave the process ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["mqtt-env+redis-file", "mqtt-file+redis-credential"])
def test_no_password_in_any_log_line_message_stream_entry_or_endpoint(
    tls_mosquitto: TlsMosquitto, pki: Pki, password_redis: PasswordRedis, tmp_path: Path, line: str, variant: str
) -> None:
    """`genclip run` at DEBUG with both passwords set: they appear in no log line (stderr, JSON), no MQTT
    message on genclip/<line>/#, no Redis stream entry, map or info key, no /healthz or /metrics answer."""
    mqtt = {"port": tls_mosquitto.port, "tls": {"enabled": True, "ca_file": str(pki.ca)}, "username": MQTT_USER}
    redis_keys: dict[str, Any] = {"url": password_redis.url, "username": REDIS_USER, "maps": "all"}
    env: dict[str, str] = {}
    if variant == "mqtt-env+redis-file":
        env["GENCLIP_MQTT__PASSWORD"] = MQTT_PASSWORD
        redis_keys["password_file"] = str(secret_file(tmp_path, "redis-password", REDIS_PASSWORD))
    else:
        mqtt["password_file"] = str(secret_file(tmp_path, "mqtt-password", MQTT_PASSWORD))
        credentials = tmp_path / "credentials"  # as systemd's LoadCredential= provides them
        credentials.mkdir()
        secret_file(credentials, "redis-password", REDIS_PASSWORD)
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
    health = free_port()
    config = tmp_path / "line.toml"
    config.write_text(tomli_w.dumps(line_config(line, mqtt=mqtt, redis=redis_keys, health_port=health)))
    assert MQTT_PASSWORD not in config.read_text() and REDIS_PASSWORD not in config.read_text()

    sub = TlsSubscriber(tls_mosquitto.port, pki.ca, [f"genclip/{line}/#"])
    log_path = tmp_path / "agent.log"
    with log_path.open("w") as log_file:
        proc = genclip(config, env, stderr=log_file)
    answers: list[str] = []
    try:
        assert wait_until(lambda: len(sub.on(f"genclip/{line}/cam-1/result")) >= 3, 90), log_path.read_text()[-3000:]
        for i, (name, payload) in enumerate(
            [("snapshot", b""), ("threshold", b'{"class": "widget", "value": "high"}'), ("password", b"{}")]
        ):
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = f"c{i}".encode()
            sub.client.publish(f"genclip/{line}/cmd/{name}", payload, qos=1, properties=props)
        assert wait_until(lambda: len(sub.on(f"genclip/{line}/cmd/response")) == 3, 30)
        for path in ("healthz", "metrics"):
            try:
                answers.append(urllib.request.urlopen(f"http://127.0.0.1:{health}/{path}", timeout=5).read().decode())
            except urllib.error.HTTPError as exc:  # 503 while a broker link is still settling
                answers.append(exc.read().decode())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        sub.close()

    stderr = log_path.read_text()
    lines = log_lines(stderr)
    assert len(lines) == len(stderr.splitlines()), "every log line is JSON"
    assert any(e["level"] == "debug" for e in lines), "DEBUG logging was not on: the test would prove nothing"
    assert any(e["event"] == "mqtt connected" for e in lines) and any(e["event"] == "redis connected" for e in lines)
    published = [m.topic.encode() + b" " + m.payload for m in sub.all()]
    assert any(b"/info " in p for p in published) and any(b"/cmd/response " in p for p in published)
    with redis.Redis.from_url(password_redis.url, password=REDIS_DEFAULT_PASSWORD, socket_timeout=5) as admin:
        stored = [repr(admin.xrange(f"genclip:{line}:results")).encode()]
        keys = [key for key in admin.scan_iter(f"genclip:{line}:*") if admin.type(key) == b"string"]
        stored += [admin.get(key) or b"" for key in keys]  # the info JSON and the map PNGs
    assert len(stored) >= 3 and b'"schema":1' in stored[0]
    for secret in (MQTT_PASSWORD, REDIS_PASSWORD):
        assert secret not in stderr, f"a password is in the log ({variant})"
        assert not [p for p in published if secret.encode() in p], "a password was published on MQTT"
        assert not [s for s in stored if secret.encode() in s], "a password was written to Redis"
        assert not [a for a in answers if secret in a], "a password is served on /healthz or /metrics"


def test_config_show_masks_passwords_from_files_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mqtt_file = secret_file(tmp_path, "mqtt-password", MQTT_PASSWORD)
    config = tmp_path / "line.toml"
    config.write_text(
        (REPO / "config.toml")
        .read_text()
        .replace('# password_file = "/etc/genclip/mqtt-password"', f'password_file = "{mqtt_file}"')
    )
    monkeypatch.setenv("GENCLIP_REDIS__PASSWORD", REDIS_PASSWORD)
    shown = CliRunner().invoke(app, ["config", "show", "--config", str(config)])
    assert shown.exit_code == 0, shown.output
    assert MQTT_PASSWORD not in shown.output and REDIS_PASSWORD not in shown.output
    data = tomllib.loads(shown.output)
    assert data["mqtt"]["password"] == data["redis"]["password"] == "********"
    assert data["mqtt"]["password_file"] == str(mqtt_file)  # where it is may be shown; what it is, never


# --- nothing is ever unpickled ---------------------------------------------------------------------------

SCANNED = ("agent", "model", "trainer", "bench", "deploy", "cli", "synthetic")
PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def unpickling(source: str) -> list[str]:
    """Every way `source` could unpickle: pickle-family imports, torch.load without weights_only=True,
    numpy.load(allow_pickle=True), joblib/dill/pandas pickle loaders."""
    import ast

    found = []

    def keyword(call: ast.Call, name: str) -> object:
        for kw in call.keywords:
            if kw.arg == name:
                return kw.value.value if isinstance(kw.value, ast.Constant) else "<expression>"
        return None

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = ast.unparse(node.func.value)
            name = f"{owner}.{node.func.attr}"
            if node.func.attr in ("load", "loads") and owner.split(".")[-1] in PICKLE_MODULES:
                found.append(name)
            elif name == "torch.load" and keyword(node, "weights_only") is not True:
                found.append("torch.load without weights_only=True")
            elif name in ("np.load", "numpy.load") and keyword(node, "allow_pickle") not in (None, False):
                found.append(f"{name}(allow_pickle=True)")
            elif node.func.attr in ("read_pickle", "Unpickler"):
                found.append(name)
    return found


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import pickle", ["import pickle"]),
        ("import cPickle as p", ["import cPickle"]),
        ("from dill import loads", ["from dill import ..."]),
        ("import joblib\njoblib.load(f)", ["import joblib", "joblib.load"]),
        ("torch.load(f)", ["torch.load without weights_only=True"]),
        ("torch.load(f, weights_only=False)", ["torch.load without weights_only=True"]),
        ("torch.load(f, map_location='cpu', weights_only=True)", []),
        ("np.load(f, allow_pickle=True)", ["np.load(allow_pickle=True)"]),
        ("numpy.load(f)", []),
        ("pd.read_pickle(f)", ["pd.read_pickle"]),
        ('"""Nothing is ever unpickled; pickle.load is never called."""', []),
    ],
)
def test_the_unpickling_scanner_finds_what_it_should(source: str, expected: list[str]) -> None:
    assert unpickling(source) == expected


def test_no_code_of_ours_can_unpickle() -> None:
    files = sorted(p for folder in SCANNED for p in (REPO / folder).rglob("*.py") if ".venv" not in p.parts)
    assert len(files) > 40 and any(p.name == "checkpoint.py" for p in files)
    found = {str(p.relative_to(REPO)): hits for p in files if (hits := unpickling(p.read_text(encoding="utf-8")))}
    assert found == {}, f"unpickling in shipped code: {found}"


class _Payload:
    """Unpickling this creates `marker`: proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


@pytest.fixture
def pickles(tmp_path: Path) -> tuple[dict[str, Path], Path]:
    """Files that would run code if unpickled: a plain pickle, torch.save (zip and legacy), under checkpoint names."""
    import pickle

    import torch

    marker = tmp_path / "unpickled.marker"
    payload = {"prompts.query": _Payload(marker)}
    files = {name: tmp_path / name for name in ("plain.safetensors", "zip.pt", "legacy.pt", "zip.safetensors")}
    files["plain.safetensors"].write_bytes(pickle.dumps(payload))
    torch.save(payload, files["zip.pt"])
    torch.save(payload, files["legacy.pt"], _use_new_zipfile_serialization=False)
    files["zip.safetensors"].write_bytes(files["zip.pt"].read_bytes())
    return files, marker


def test_a_pickled_checkpoint_is_refused_without_being_run(pickles: tuple[dict[str, Path], Path]) -> None:
    import torch

    from model import CheckpointError, Engine
    from model.backbone import BackboneError, load_backbone
    from model.checkpoint import read_checkpoint, read_metadata

    files, marker = pickles
    backbone = load_backbone("genclip-tiny", "random")
    engine = Engine(tiny_config(), backbone=backbone)
    for name, path in files.items():
        refusal = f"{re.escape(str(path))}: not a readable safetensors file: it is a pickle"
        for load in (read_checkpoint, read_metadata, engine.load_prompts):
            with pytest.raises(CheckpointError, match=refusal):
                load(path)
        with pytest.raises(CheckpointError, match=refusal):
            Engine(tiny_config(checkpoint=path), backbone=backbone)
        # [model].pretrained: open_clip's torch.load(weights_only=True) refuses the unknown global
        with pytest.raises(BackboneError, match=f"cannot load weights {re.escape(str(path))}"):
            load_backbone("genclip-tiny", str(path))
        assert not marker.exists(), f"{name} was unpickled"
        # The control: each file really is a working exploit when unpickled.
        control = path.with_name("control.pt")
        control.write_bytes(path.read_bytes())
        with contextlib.suppress(Exception):
            torch.load(control, weights_only=False)  # a plain pickle runs, then fails torch's format check
        assert marker.exists(), name
        marker.unlink()
    assert engine.prompt_version == "untrained"


# --- commands: only this line's cmd/<name>, only in the documented form -------------------------------------


def test_commands_are_taken_only_from_this_lines_command_topics(
    mosquitto: MosquittoServer, made: list[Any], line: str
) -> None:
    from agent.control import Command
    from tests.test_publish_mqtt import Subscriber

    calls: list[Command] = []
    pub = MqttPublisher(
        MqttConfig(port=mosquitto.port, reconnect_min_s=0.1, reconnect_max_s=0.5),
        line,
        handler=lambda command: calls.append(command) or {"done": command.name},
    )
    made.append(pub)
    pub.start()
    assert wait_until(lambda: pub.health() == (True, "connected"))
    sub = Subscriber(mosquitto.port, ["#"])
    made.append(sub)
    ignored = [
        f"genclip/other-{line}/cmd/snapshot",  # another line's
        f"elsewhere/{line}/cmd/snapshot",  # another prefix
        f"genclip/{line}/cmd/snapshot/now",  # deeper than cmd/<name>
        f"genclip/{line}/cmd/x/y",
        f"genclip/{line}/cmd/",  # no name
        f"genclip/{line}/cmd/response",  # our own answers
        f"genclip/{line}/cmdx/snapshot",
        f"genclip/{line}/CMD/snapshot",
        f"genclip/{line}/cam-1/reject",
    ]
    for i, topic in enumerate(ignored):
        sub.request(topic, b"{}", f"ignored-{i}".encode())
    sub.request(f"genclip/{line}/cmd/snapshot", b"{}", b"the-real-one")
    response = f"genclip/{line}/cmd/response"
    assert wait_until(lambda: any(m.properties.CorrelationData == b"the-real-one" for m in sub.on(response)))
    time.sleep(0.3)  # anything wrongly taken would be answered by now
    answers = [m.properties.CorrelationData for m in sub.on(response) if m.payload != b"{}"]  # not our own "{}"
    assert answers == [b"the-real-one"], answers
    assert [(c.name, c.correlation) for c in calls] == [("snapshot", b"the-real-one")]
    assert pub.stats["response"].sent == 1


def test_tls_files_that_cannot_be_loaded_are_a_clear_startup_error(pki: Pki, tmp_path: Path, line: str) -> None:
    """A key that does not belong to its certificate, a CA file that is not PEM: refused naming [mqtt.tls]."""
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text("this is not a certificate\n")
    for tls, what in (
        ({"cert_file": pki.client_cert, "key_file": pki.server_key, "ca_file": pki.ca}, "KEY_VALUES_MISMATCH"),
        ({"ca_file": not_pem}, "ca.txt"),
    ):
        mqtt_keys = {"host": "127.0.0.1", "port": free_port(), "tls": {"enabled": True, **tls}}
        with pytest.raises(ValueError, match=r"^\[mqtt.tls\]: cannot load the TLS files"):
            MqttPublisher(MqttConfig(**mqtt_keys), line)
        model = tiny_config().model_dump(exclude_none=True)
        cfg = InspectConfig(line={"id": line}, model=model, mqtt=mqtt_keys, agent={"health_port": 0})
        with pytest.raises(StartupError, match=r"\[mqtt.tls\]") as raised:
            InspectionService(cfg)
        assert what in str(raised.value), str(raised.value)
