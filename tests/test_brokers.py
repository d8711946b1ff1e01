"""The broker fixtures and deploy/services.sh, checked against real Mosquitto and Redis processes."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from tests.brokers import (
    INSTALL_HINT,
    BrokerBinaryMissingError,
    MosquittoServer,
    RedisServer,
    find_binary,
    free_port,
    port_open,
    require_binary,
)

REPO = Path(__file__).resolve().parent.parent
SERVICES = REPO / "deploy" / "services.sh"
WAIT_S = 10.0

pytestmark = pytest.mark.timeout(120)


class MqttClient:
    """A paho v2 MQTT 5 client on a background loop, with events instead of sleeps for synchronisation."""

    def __init__(self, port: int, client_id: str | None = None, clean_start: bool = True) -> None:
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:12]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=1)
        self.port = port
        self.clean_start = clean_start
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.subscribed = threading.Event()
        self.received = threading.Event()
        self.connect_count = 0
        self.messages: list[mqtt.MQTTMessage] = []
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason_code.is_failure:
            self.connect_count += 1
            self.disconnected.clear()
            self.connected.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: object,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self.connected.clear()
        self.disconnected.set()

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if all(not rc.is_failure for rc in reason_codes):
            self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self.messages.append(message)
        self.received.set()

    def connect(self, session_expiry_s: int = 0) -> None:
        props = mqtt.Properties(mqtt.PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s
        self.client.connect("127.0.0.1", self.port, keepalive=10, clean_start=self.clean_start, properties=props)
        self.client.loop_start()
        assert self.connected.wait(WAIT_S), "no CONNACK from the broker"

    def subscribe(self, topic: str, qos: int = 1) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=qos)
        assert self.subscribed.wait(WAIT_S), "no SUBACK from the broker"

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self.client.publish(topic, payload, qos=qos)
        info.wait_for_publish(timeout=WAIT_S)
        assert info.is_published(), "no PUBACK from the broker"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def mqtt_clients() -> Iterator[list[MqttClient]]:
    """Clients appended here are disconnected after the test, whatever happened."""
    clients: list[MqttClient] = []
    yield clients
    for c in clients:
        c.close()


def _new_client(
    clients: list[MqttClient], port: int, client_id: str | None = None, clean_start: bool = True
) -> MqttClient:
    c = MqttClient(port, client_id=client_id, clean_start=clean_start)
    clients.append(c)
    return c


def _roundtrip(clients: list[MqttClient], port: int) -> None:
    """Publish one QoS 1 message and check it arrives with QoS 1, same topic and payload."""
    topic = f"genclip/test/{uuid.uuid4().hex}"
    payload = b'{"verdict": "reject", "score": 0.93}'
    sub = _new_client(clients, port)
    sub.connect()
    sub.subscribe(topic)
    pub = _new_client(clients, port)
    pub.connect()
    pub.publish(topic, payload)
    assert sub.received.wait(WAIT_S), "message not delivered"
    msg = sub.messages[0]
    assert (msg.topic, msg.payload, msg.qos) == (topic, payload, 1)


def test_mqtt5_qos1_roundtrip(mosquitto: MosquittoServer, mqtt_clients: list[MqttClient]) -> None:
    _roundtrip(mqtt_clients, mosquitto.port)


def test_redis_xadd_xread(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url, socket_timeout=WAIT_S)
    try:
        stream = f"genclip:test:{uuid.uuid4().hex}"
        entry_id = r.xadd(stream, {"verdict": "reject", "score": "0.93"})
        got = r.xread({stream: "0-0"}, count=10, block=int(WAIT_S * 1000))
        assert got == [[stream.encode(), [(entry_id, {b"verdict": b"reject", b"score": b"0.93"})]]]
    finally:
        r.close()


def test_mosquitto_stop_restart_reconnects(fresh_mosquitto: MosquittoServer, mqtt_clients: list[MqttClient]) -> None:
    watcher = _new_client(mqtt_clients, fresh_mosquitto.port)
    watcher.connect()
    fresh_mosquitto.stop()
    assert not fresh_mosquitto.is_running()
    assert watcher.disconnected.wait(WAIT_S), "client did not notice the broker going away"
    assert not port_open(fresh_mosquitto.port)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", fresh_mosquitto.port), timeout=2).close()

    fresh_mosquitto.restart()
    assert fresh_mosquitto.is_running()
    assert watcher.connected.wait(WAIT_S + 5), "paho did not reconnect after the restart"
    assert watcher.connect_count == 2
    _roundtrip(mqtt_clients, fresh_mosquitto.port)


def test_mosquitto_persists_qos1_session_across_restart(
    fresh_mosquitto: MosquittoServer, mqtt_clients: list[MqttClient]
) -> None:
    """A QoS 1 message queued for an offline persistent session is delivered after a broker restart."""
    topic = f"genclip/test/{uuid.uuid4().hex}"
    client_id = f"persistent-{uuid.uuid4().hex[:8]}"
    sub = _new_client(mqtt_clients, fresh_mosquitto.port, client_id=client_id, clean_start=False)
    sub.connect(session_expiry_s=300)
    sub.subscribe(topic)
    sub.close()
    pub = _new_client(mqtt_clients, fresh_mosquitto.port)
    pub.connect()
    pub.publish(topic, b"queued")
    pub.close()

    fresh_mosquitto.restart()

    again = _new_client(mqtt_clients, fresh_mosquitto.port, client_id=client_id, clean_start=False)
    again.connect(session_expiry_s=300)
    assert again.received.wait(WAIT_S), "queued QoS 1 message lost across the restart"
    msg = again.messages[0]
    assert (msg.topic, msg.payload, msg.qos) == (topic, b"queued", 1)


def test_redis_stop_restart_ping(fresh_redis: RedisServer) -> None:
    r = redis.Redis.from_url(fresh_redis.url, socket_timeout=2, socket_connect_timeout=2)
    try:
        assert r.ping()
        r.xadd("genclip:test:persist", {"n": "1"})
        fresh_redis.stop()
        assert not fresh_redis.is_running()
        assert not port_open(fresh_redis.port)
        with pytest.raises(redis.ConnectionError):
            r.ping()
        fresh_redis.restart()
        assert r.ping()
        assert r.xlen("genclip:test:persist") == 1, "append-only file not replayed"
    finally:
        r.close()


def test_kill_simulates_crash_and_start_recovers(fresh_redis: RedisServer) -> None:
    pid = fresh_redis.pid
    fresh_redis.kill()
    assert not fresh_redis.is_running()
    assert pid is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not port_open(fresh_redis.port)
    fresh_redis.start()
    r = redis.Redis.from_url(fresh_redis.url, socket_timeout=2)
    try:
        assert r.ping()
    finally:
        r.close()


def test_missing_binary_names_install_command(tmp_path: Path) -> None:
    with pytest.raises(BrokerBinaryMissingError) as err:
        find_binary("mosquitto", search_path=str(tmp_path))
    assert "bash deploy/services.sh install" in str(err.value)
    assert "apt-get install" in str(err.value)
    with pytest.raises(pytest.fail.Exception, match=r"bash deploy/services\.sh install"):
        require_binary("redis-server", search_path=str(tmp_path))
    assert "deploy/services.sh install" in INSTALL_HINT


# --- deploy/services.sh --------------------------------------------------------------------------


def _services(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SERVICES), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def services_env(tmp_path: Path) -> Iterator[tuple[dict[str, str], int, int]]:
    """A config with free ports and a private state dir; `down` always runs at the end."""
    mqtt_port, redis_port = free_port(), free_port()
    while redis_port == mqtt_port:
        redis_port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f'[mqtt]\nhost = "127.0.0.1"\nport = {mqtt_port}\n\n[redis]\nurl = "redis://127.0.0.1:{redis_port}/0"\n'
    )
    env = {**os.environ, "GENCLIP_CONFIG": str(config), "GENCLIP_STATE_DIR": str(tmp_path / "run")}
    yield env, mqtt_port, redis_port
    _services(env, "down")


def test_services_up_status_down(services_env: tuple[dict[str, str], int, int], mqtt_clients: list[MqttClient]) -> None:
    env, mqtt_port, redis_port = services_env
    state = Path(env["GENCLIP_STATE_DIR"])

    up = _services(env, "up")
    assert up.returncode == 0, up.stdout + up.stderr
    assert port_open(mqtt_port) and port_open(redis_port)
    assert (state / "mosquitto.pid").is_file() and (state / "redis.pid").is_file()
    status = _services(env, "status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("running (pid") == 2
    _roundtrip(mqtt_clients, mqtt_port)
    r = redis.Redis(port=redis_port, socket_timeout=WAIT_S)
    try:
        assert r.ping()
        assert r.config_get("appendonly") == {"appendonly": "yes"}
        assert r.config_get("protected-mode") == {"protected-mode": "yes"}
    finally:
        r.close()

    pids = {p: (state / p).read_text() for p in ("mosquitto.pid", "redis.pid")}
    again = _services(env, "up")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == 2
    assert {p: (state / p).read_text() for p in pids} == pids

    down = _services(env, "down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not port_open(mqtt_port) and not port_open(redis_port)
    assert not (state / "mosquitto.pid").exists() and not (state / "redis.pid").exists()
    status = _services(env, "status")
    assert status.returncode == 3, status.stdout + status.stderr
    assert status.stdout.count("not running") == 2

    down_again = _services(env, "down")
    assert down_again.returncode == 0, down_again.stdout + down_again.stderr
    assert down_again.stdout.count("not running") == 2


def test_services_up_leaves_foreign_port_alone(services_env: tuple[dict[str, str], int, int]) -> None:
    env, mqtt_port, redis_port = services_env
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", mqtt_port))
        foreign.listen()
        up = _services(env, "up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"port {mqtt_port} is already used by another process" in up.stderr
        assert not (Path(env["GENCLIP_STATE_DIR"]) / "mosquitto.pid").exists()
        status = _services(env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert f"mosquitto: port {mqtt_port} used by another process" in status.stdout
        down = _services(env, "down")
        assert down.returncode == 0
    assert not port_open(redis_port)


def test_services_help() -> None:
    out = subprocess.run(["bash", str(SERVICES), "--help"], capture_output=True, text=True, timeout=10, check=False)
    assert out.returncode == 0
    assert "install|up|down|status" in out.stdout
