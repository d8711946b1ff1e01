"""The shipped broker access-control examples (deploy/mosquitto, deploy/redis) against real brokers.

The tests load the files in deploy/ as shipped; only what must differ on a test machine is
replaced (port, file paths, passwords), so a change to an example is a change to what is tested.
Where an account may do something, delivery is checked positively, so that a broken broker setup
is never mistaken for a denial; where it may not, a later allowed message on the same path proves
that the denied one had its chance to arrive.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import re
import secrets
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import redis
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from redis.backoff import NoBackoff
from redis.retry import Retry

from agent.control import ARGS as COMMANDS
from agent.control import Command
from agent.publish.config import MqttConfig, RedisConfig
from agent.publish.mqtt import MqttPublisher
from agent.publish.redis_streams import RedisStreamPublisher
from tests.brokers import HOST, BrokerStartError, MosquittoServer, RedisServer, require_binary
from tests.test_publish_mqtt import make_inspection, wait_until

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
MOSQUITTO_CONF = REPO / "deploy" / "mosquitto" / "genclip.conf"
MOSQUITTO_ACL = REPO / "deploy" / "mosquitto" / "acl"
REDIS_ACL = REPO / "deploy" / "redis" / "users.acl"
WAIT_S = 5.0
NOT_AUTHORIZED = 0x87
ACCEPTED = {0x00, 0x10}  # PUBACK "Success", and "No matching subscribers" (Mosquitto 2.0 tells MQTT 5 clients)
LINES = ("line-1", "line-2")
MQTT_ACCOUNTS = {
    "genclip-line-1",
    "genclip-line-2",
    "plc-line-1",
    "plc-line-2",
    "genclip-dashboard",
    "genclip-operator",
    "genclip-monitor",
}
REDIS_USERS = {"default", "admin", "genclip-line-1", "genclip-line-2", "genclip-dashboard"}
PLACEHOLDER = "#<sha256-of-password>"


# --- Mosquitto with the shipped config and ACL ----------------------------------------------------


def acl_users(text: str) -> list[str]:
    return [line.split(maxsplit=1)[1].strip() for line in text.splitlines() if line.startswith("user ")]


def mosquitto_conf(shipped: str, *, port: int, password_file: Path, acl_file: Path) -> str:
    """The shipped fragment with the test's port and paths; everything else is kept as it is."""
    out, keys = [], []
    for line in shipped.splitlines():
        key = line.split(maxsplit=1)[0] if line.strip() and not line.lstrip().startswith("#") else None
        if key == "listener":
            line = f"listener {port} {HOST}"
        elif key == "password_file":
            line = f"password_file {password_file}"
        elif key == "acl_file":
            line = f"acl_file {acl_file}"
        if key:
            keys.append(key)
        out.append(line)
    assert keys.count("listener") == 1, "the example should have exactly one active listener"
    assert {"allow_anonymous", "password_file", "acl_file"} <= set(keys)
    assert "allow_anonymous false" in shipped.splitlines()
    # Test-only: run as this user (as root Mosquitto would switch to `mosquitto`), log for failures.
    out += [f"user {getpass.getuser()}", "log_dest stdout", "log_type all", ""]
    return "\n".join(out)


class AclMosquitto(MosquittoServer):
    """Mosquitto configured by deploy/mosquitto/genclip.conf and deploy/mosquitto/acl."""

    def __init__(self, workdir: Path, password_file: Path, **kwargs: Any) -> None:
        self.password_file = password_file
        super().__init__(workdir, **kwargs)

    def _command(self) -> list[str]:
        acl = self.workdir / "acl"
        acl.write_text(MOSQUITTO_ACL.read_text())
        conf = self.workdir / "genclip.conf"
        conf.write_text(
            mosquitto_conf(MOSQUITTO_CONF.read_text(), port=self.port, password_file=self.password_file, acl_file=acl)
        )
        return [self.executable, "-c", str(conf)]


@pytest.fixture(scope="module")
def mqtt_passwords(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A password file for every account of the shipped ACL, made with mosquitto_passwd -b."""
    tool = require_binary("mosquitto_passwd")
    path = tmp_path_factory.mktemp("mosquitto-passwd") / "passwd"
    passwords = {user: secrets.token_urlsafe(12) for user in acl_users(MOSQUITTO_ACL.read_text())}
    for i, (user, password) in enumerate(passwords.items()):
        create = ["-c"] if i == 0 else []
        subprocess.run([tool, *create, "-b", str(path), user, password], check=True, capture_output=True, timeout=10)
    return path, passwords


@pytest.fixture
def broker(tmp_path: Path, mqtt_passwords: tuple[Path, dict[str, str]]) -> Iterator[AclMosquitto]:
    """A fresh broker per test, so retained messages of one test never reach another."""
    server = AclMosquitto(tmp_path / "mosquitto", mqtt_passwords[0], executable=require_binary("mosquitto"))
    try:
        server.start()
    except BrokerStartError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()


class Client:
    """An MQTT 5 client logged in as one account; records CONNACK, PUBACK and SUBACK codes and messages."""

    def __init__(
        self,
        port: int,
        user: str | None,
        password: str | None,
        *,
        client_id: str | None = None,
        will: str | None = None,
    ) -> None:
        self.user = user
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{user or 'anon'}-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self.client.reconnect_delay_set(min_delay=0.1, max_delay=0.5)  # type: ignore[arg-type]
        if user is not None:
            self.client.username_pw_set(user, password)
        if will is not None:
            self.client.will_set(will, b"offline", qos=1, retain=True)  # as MqttPublisher sets it
        self._cv = threading.Condition()
        self.connack: ReasonCode | None = None
        self.acks: dict[int, ReasonCode] = {}
        self.subacks: dict[int, list[ReasonCode]] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.connect(HOST, port, keepalive=10)
        self.client.loop_start()
        assert self._wait(lambda: self.connack is not None), f"{user}: no CONNACK"

    def _on_connect(self, c: mqtt.Client, u: Any, f: Any, rc: ReasonCode, p: Any) -> None:
        with self._cv:
            self.connack = rc
            self._cv.notify_all()

    def _on_publish(self, c: mqtt.Client, u: Any, mid: int, rc: ReasonCode, p: Any) -> None:
        with self._cv:
            self.acks[mid] = rc
            self._cv.notify_all()

    def _on_subscribe(self, c: mqtt.Client, u: Any, mid: int, rcs: list[ReasonCode], p: Any) -> None:
        with self._cv:
            self.subacks[mid] = rcs
            self._cv.notify_all()

    def _on_message(self, c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        with self._cv:
            self.messages.append((m.topic, m.payload))
            self._cv.notify_all()

    def _wait(self, predicate: Callable[[], bool], timeout: float = WAIT_S) -> bool:
        with self._cv:
            return self._cv.wait_for(predicate, timeout)

    @property
    def connected(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def publish(self, topic: str, payload: bytes = b"x", *, retain: bool = False, **props: Any) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (ACCEPTED, or 0x87 not authorized)."""
        properties = Properties(PacketTypes.PUBLISH)
        for name, value in props.items():
            setattr(properties, name, value)
        info = self.client.publish(topic, payload, qos=1, retain=retain, properties=properties)
        assert self._wait(lambda: info.mid in self.acks), f"{self.user}: no PUBACK for {topic}"
        return self.acks[info.mid].value

    def subscribe(self, *topics: str) -> list[int]:
        """Subscribe at QoS 1 and return the SUBACK reason codes (granted QoS, or 0x87)."""
        _, mid = self.client.subscribe([(t, 1) for t in topics])
        assert self._wait(lambda: mid in self.subacks), f"{self.user}: no SUBACK"
        return [rc.value for rc in self.subacks[mid]]

    def wait_for(self, topic: str, payload: bytes) -> bool:
        return self._wait(lambda: (topic, payload) in self.messages)

    def topics(self) -> set[str]:
        with self._cv:
            return {t for t, _ in self.messages}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def login(broker: AclMosquitto, mqtt_passwords: tuple[Path, dict[str, str]]) -> Iterator[Callable[..., Client]]:
    """login(user, **kwargs) -> a connected Client with that account's password; closed after the test."""
    made: list[Client] = []

    def make(user: str, **kwargs: Any) -> Client:
        client = Client(broker.port, user, mqtt_passwords[1][user], **kwargs)
        made.append(client)
        assert client.connected, f"{user} could not log in: {client.connack}"
        return client

    yield make
    for client in made:
        client.close()


def line_topics(line: str) -> dict[str, str]:
    base = f"genclip/{line}"
    return {
        "status": f"{base}/status",
        "heartbeat": f"{base}/heartbeat",
        "info": f"{base}/info",
        "result": f"{base}/cam-1/result",
        "reject": f"{base}/cam-1/reject",
        "decision": f"{base}/cam-1/decision",
        "trigger": f"{base}/cam-1/trigger",
        "response": f"{base}/cmd/response",
        "response-sub": f"{base}/cmd/response/alice",
        **{f"cmd-{name}": f"{base}/cmd/{name}" for name in COMMANDS},
        "cmd-unknown": f"{base}/cmd/selfdestruct",
    }


T1, T2 = line_topics("line-1"), line_topics("line-2")


def agent_writes(t: dict[str, str]) -> set[str]:
    return {t[k] for k in ("status", "heartbeat", "info", "result", "reject", "decision", "response", "response-sub")}


MAY_PUBLISH: dict[str, set[str]] = {
    "genclip-line-1": agent_writes(T1),
    "genclip-line-2": agent_writes(T2),
    "plc-line-1": {T1["trigger"]},
    "plc-line-2": {T2["trigger"]},
    "genclip-dashboard": set(),
    "genclip-operator": {t[f"cmd-{name}"] for t in (T1, T2) for name in COMMANDS},
    "genclip-monitor": set(),
}


def test_shipped_files_name_the_documented_accounts() -> None:
    assert sorted(acl_users(MOSQUITTO_ACL.read_text())) == sorted(MQTT_ACCOUNTS)
    redis_users = [line.split()[1] for line in REDIS_ACL.read_text().splitlines() if line.strip()]
    assert sorted(redis_users) == sorted(REDIS_USERS)
    for line in REDIS_ACL.read_text().splitlines():
        if not line.startswith("user default "):
            assert PLACEHOLDER in line and " >" not in line, f"a clear-text password in users.acl: {line}"


def test_login_is_required(broker: AclMosquitto, login: Callable[..., Client]) -> None:
    anonymous = Client(broker.port, None, None)
    wrong = Client(broker.port, "genclip-line-1", "not-the-password")
    try:
        # Mosquitto 2.0.11 answers 0x87 (Not authorized) to both, never 0x86 (Bad user name or password);
        # either is a refusal the agent reports as permanent (PERMANENT_REFUSALS).
        for client in (anonymous, wrong):
            assert client.connack is not None and client.connack.value in (0x86, NOT_AUTHORIZED), client.connack
    finally:
        anonymous.close()
        wrong.close()
    assert login("genclip-line-1").connected


@pytest.mark.parametrize("account", sorted(MQTT_ACCOUNTS))
def test_who_may_publish_what(login: Callable[..., Client], account: str) -> None:
    """Every account against every kind of topic of both lines, and topics outside genclip/<line>."""
    probes = [*T1.values(), *T2.values(), "genclip/line-3/status", "genclip/line-1", "other/topic"]
    client = login(account)
    codes = {topic: client.publish(topic) for topic in probes}
    assert {t for t, code in codes.items() if code in ACCEPTED} == MAY_PUBLISH[account]
    assert all(code == NOT_AUTHORIZED for t, code in codes.items() if t not in MAY_PUBLISH[account]), codes


def test_who_reads_what(login: Callable[..., Client]) -> None:
    """Everyone subscribes to genclip/#; each receives exactly what the ACL lets it read."""
    readers = {account: login(account) for account in sorted(MQTT_ACCOUNTS)}
    for reader in readers.values():
        assert reader.subscribe("genclip/#") == [1]  # Mosquitto 2.0 grants, then filters each message
    agents = {"line-1": login("genclip-line-1"), "line-2": login("genclip-line-2")}
    operator = login("genclip-operator")
    plcs = {"line-1": login("plc-line-1"), "line-2": login("plc-line-2")}
    for line, t in (("line-1", T1), ("line-2", T2)):
        assert plcs[line].publish(t["trigger"], b"end") in ACCEPTED
        for kind in ("status", "heartbeat", "info", "result", "reject", "decision", "response", "response-sub"):
            assert agents[line].publish(t[kind]) in ACCEPTED, (line, kind)
        assert operator.publish(t["cmd-reload"], b"{}") in ACCEPTED
    # The last messages: once a reader has them, everything published before has reached it.
    for t in (T1, T2):
        assert agents[t["status"].split("/")[1]].publish(t["status"], b"end") in ACCEPTED
        assert operator.publish(t["cmd-snapshot"], b"end") in ACCEPTED
    ends = {
        "genclip-line-1": [T1["cmd-snapshot"], T1["trigger"]],
        "genclip-line-2": [T2["cmd-snapshot"], T2["trigger"]],
        "plc-line-1": [T1["status"]],
        "plc-line-2": [T2["status"]],
        # Messages of different publishers have no order between them: the monitor also reads the
        # operator's commands, so it waits for the operator's last ones too.
        "genclip-monitor": [
            T1["status"],
            T2["status"],
            T1["cmd-snapshot"],
            T2["cmd-snapshot"],
            T1["trigger"],
            T2["trigger"],
        ],
    }
    for account, reader in readers.items():
        for topic in ends.get(account, [T1["status"], T2["status"]]):
            assert reader.wait_for(topic, b"end"), f"{account} did not get {topic}: {reader.messages}"

    def reads(t: dict[str, str], *kinds: str) -> set[str]:
        return {t[k] for k in kinds}

    expected = {
        # cmd/+ also matches cmd/response (the agent ignores it), not the cmd/response/... sub-tree
        "genclip-line-1": reads(T1, "cmd-reload", "cmd-snapshot", "response", "trigger"),
        "genclip-line-2": reads(T2, "cmd-reload", "cmd-snapshot", "response", "trigger"),
        "plc-line-1": reads(T1, "status", "heartbeat", "reject", "decision"),
        "plc-line-2": reads(T2, "status", "heartbeat", "reject", "decision"),
        "genclip-dashboard": reads(T1, "status", "heartbeat", "info", "result")
        | reads(T2, "status", "heartbeat", "info", "result"),
        "genclip-operator": reads(T1, "status", "info", "response", "response-sub")
        | reads(T2, "status", "info", "response", "response-sub"),
        "genclip-monitor": reads(T1, "status", "heartbeat", "info", "result", "reject", "decision", "response")
        | reads(T2, "status", "heartbeat", "info", "result", "reject", "decision", "response")
        | reads(T1, "response-sub")
        | reads(T2, "response-sub")
        | reads(T1, "cmd-reload", "cmd-snapshot", "trigger")
        | reads(T2, "cmd-reload", "cmd-snapshot", "trigger"),
    }
    for account, reader in readers.items():
        assert reader.topics() == expected[account], account


def test_plc_cannot_command_the_agent(login: Callable[..., Client]) -> None:
    agent = login("genclip-line-1")
    assert agent.subscribe("genclip/line-1/cmd/+") == [1]
    plc = login("plc-line-1")
    assert plc.publish("genclip/line-1/cmd/pause", b"{}") == NOT_AUTHORIZED
    assert plc.publish("genclip/line-1/cmd/reload", b"{}") == NOT_AUTHORIZED
    operator = login("genclip-operator")
    assert operator.publish("genclip/line-1/cmd/snapshot", b"{}") in ACCEPTED
    assert agent.wait_for("genclip/line-1/cmd/snapshot", b"{}")
    assert agent.messages == [("genclip/line-1/cmd/snapshot", b"{}")]


def test_dashboard_reads_results_but_not_rejects(login: Callable[..., Client]) -> None:
    dashboard = login("genclip-dashboard")
    codes = dashboard.subscribe("genclip/+/+/reject", "genclip/+/+/decision", "genclip/+/+/result")
    assert codes[2] == 1
    assert all(code in (1, NOT_AUTHORIZED) for code in codes[:2]), codes  # 2.0.11 grants: 1
    plc = login("plc-line-1")
    assert plc.subscribe("genclip/line-1/+/reject") == [1]
    agent = login("genclip-line-1")
    assert agent.publish("genclip/line-1/cam-1/reject", b"NG") in ACCEPTED
    assert agent.publish("genclip/line-1/cam-1/decision", b"NG") in ACCEPTED
    assert agent.publish("genclip/line-1/cam-1/result", b"result") in ACCEPTED
    assert plc.wait_for("genclip/line-1/cam-1/reject", b"NG")  # the reject was delivered to who may read it
    assert dashboard.wait_for("genclip/line-1/cam-1/result", b"result")
    assert dashboard.messages == [("genclip/line-1/cam-1/result", b"result")]
    assert dashboard.publish("genclip/line-1/cam-1/result", b"forged") == NOT_AUTHORIZED


def test_agent_writes_only_its_own_line(login: Callable[..., Client]) -> None:
    monitor = login("genclip-monitor")
    assert monitor.subscribe("genclip/#") == [1]
    agent = login("genclip-line-1")
    for topic in ("genclip/line-2/cam-1/reject", "genclip/line-2/status", "genclip/line-2/cmd/response"):
        assert agent.publish(topic, b"intruder") == NOT_AUTHORIZED, topic
    assert agent.publish("genclip/line-1/cmd/reload", b"{}") == NOT_AUTHORIZED  # no commands to itself
    assert agent.publish("genclip/line-1/cam-1/reject", b"own") in ACCEPTED
    assert monitor.wait_for("genclip/line-1/cam-1/reject", b"own")
    assert monitor.messages == [("genclip/line-1/cam-1/reject", b"own")]

    # Nor does it read another line's commands, while it gets its own.
    assert agent.subscribe("genclip/+/cmd/+") == [1]
    operator = login("genclip-operator")
    assert operator.publish("genclip/line-2/cmd/pause", b"{}") in ACCEPTED
    assert operator.publish("genclip/line-1/cmd/resume", b"{}") in ACCEPTED
    assert agent.wait_for("genclip/line-1/cmd/resume", b"{}")
    assert agent.messages == [("genclip/line-1/cmd/resume", b"{}")]


def test_retained_status_is_filtered_too(login: Callable[..., Client]) -> None:
    for line in LINES:
        assert login(f"genclip-{line}").publish(f"genclip/{line}/status", b"online", retain=True) in ACCEPTED
    plc = login("plc-line-2")
    assert plc.subscribe("genclip/+/status") == [1]
    assert login("genclip-line-2").publish("genclip/line-2/status", b"end") in ACCEPTED
    assert plc.wait_for("genclip/line-2/status", b"end")
    assert plc.messages == [("genclip/line-2/status", b"online"), ("genclip/line-2/status", b"end")]


def test_last_will_reaches_the_plc_only_from_the_right_account(login: Callable[..., Client]) -> None:
    """The Last Will is checked when it is sent: a will on another line's status connects, then is dropped."""
    monitor = login("genclip-monitor")
    plc = login("plc-line-1")
    for reader in (monitor, plc):
        assert reader.subscribe("genclip/+/status") == [1]
    # An agent of line-1 whose will names line-2 (a copy-pasted config): connected, then replaced by a
    # new connection with its client id, which makes the broker send (or drop) the will at once.
    wrong = login("genclip-line-1", client_id="wrong-will", will="genclip/line-2/status")
    wrong.client.loop_stop()  # as dead as a hung process: no reconnects, no DISCONNECT
    login("genclip-line-1", client_id="wrong-will")
    # The real thing: the agent's connection drops without a DISCONNECT.
    agent = login("genclip-line-1", will="genclip/line-1/status")
    agent.client.loop_stop()
    agent.client.socket().shutdown(socket.SHUT_RDWR)
    assert plc.wait_for("genclip/line-1/status", b"offline")
    assert monitor.wait_for("genclip/line-1/status", b"offline")
    assert monitor.messages == [("genclip/line-1/status", b"offline")]


# --- the agent's own MQTT publisher, logged in as the line's agent -------------------------------


@pytest.fixture
def publisher(
    broker: AclMosquitto, mqtt_passwords: tuple[Path, dict[str, str]], tmp_path: Path
) -> Iterator[Callable[..., MqttPublisher]]:
    made: list[MqttPublisher] = []

    def make(user: str, line: str, **kwargs: Any) -> MqttPublisher:
        secret = tmp_path / f"{user}.password"
        secret.write_text(mqtt_passwords[1][user] + "\n")
        config = MqttConfig(
            port=broker.port,
            username=user,
            password_file=secret,
            reconnect_min_s=0.1,
            reconnect_max_s=0.5,
            keepalive_s=5,
        )
        pub = MqttPublisher(config, line, **kwargs)
        made.append(pub)
        pub.start()
        return pub

    yield make
    for pub in made:
        pub.stop(timeout=1.0)


def test_mqtt_publisher_with_the_agent_account(
    login: Callable[..., Client], publisher: Callable[..., MqttPublisher]
) -> None:
    plc = login("plc-line-1")
    dashboard = login("genclip-dashboard")
    operator = login("genclip-operator")
    for reader in (plc, dashboard, operator):
        assert reader.subscribe("genclip/#") == [1]
    commands: list[Command] = []

    def handler(command: Command) -> dict:
        commands.append(command)
        return {"done": command.name}

    pub = publisher("genclip-line-1", "line-1", handler=handler)
    assert wait_until(lambda: pub.health() == (True, "connected")), pub.health()
    assert plc.wait_for("genclip/line-1/status", b"online")
    ng = make_inspection("line-1", 7, "NG")
    pub.publish_inspection(ng)
    reject = json.dumps(ng.reject_payload(), separators=(",", ":")).encode()
    assert plc.wait_for("genclip/line-1/cam-1/reject", reject)
    assert wait_until(lambda: len(plc.messages) >= 3)  # online, reject, decision
    assert {t for t, _ in plc.messages} == {
        "genclip/line-1/status",
        "genclip/line-1/cam-1/reject",
        "genclip/line-1/cam-1/decision",
    }
    assert wait_until(lambda: "genclip/line-1/cam-1/result" in dashboard.topics())
    assert dashboard.topics() == {"genclip/line-1/status", "genclip/line-1/cam-1/result"}

    # Commands: answered on cmd/response, or on a ResponseTopic below it; the agent answers a
    # ResponseTopic anywhere else on cmd/response (the broker would allow it its own reject topic).
    elsewhere, mine = "genclip/line-2/cmd/response", "genclip/line-1/cmd/response/alice"
    plc_topic = "genclip/line-1/cam-1/reject"
    cases = ((b"c1", None), (b"c2", elsewhere), (b"c3", mine), (b"c4", plc_topic))
    for correlation, reply_to in cases:
        props = {"ResponseTopic": reply_to} if reply_to else {}
        assert operator.publish("genclip/line-1/cmd/snapshot", b"{}", CorrelationData=correlation, **props) in ACCEPTED
    answer = json.dumps({"command": "snapshot", "ok": True, "done": "snapshot"}, separators=(",", ":")).encode()
    assert operator.wait_for("genclip/line-1/cmd/response", answer)
    assert operator.wait_for(mine, answer)
    assert wait_until(lambda: pub.stats["response"].sent == 4), pub.stats.snapshot()
    assert [c.correlation for c in commands] == [b"c1", b"c2", b"c3", b"c4"]
    assert elsewhere not in operator.topics()
    assert wait_until(lambda: [t for t, _ in list(operator.messages)].count("genclip/line-1/cmd/response") == 3)
    assert pub.stats["response"].dropped == 0
    assert plc.messages.count((plc_topic, answer)) == 0

    assert pub.stats["reject"].sent == 1 and pub.stats["reject"].dropped == 0
    assert pub.stats["result"].dropped == 0 and pub.stats["decision"].dropped == 0
    pub.stop(timeout=2.0)
    assert plc.wait_for("genclip/line-1/status", b"stopped")


def test_mqtt_publisher_with_another_lines_account_is_refused_everything(
    login: Callable[..., Client], publisher: Callable[..., MqttPublisher]
) -> None:
    """A config with line-2's agent account on line-1: connected, but every message is refused."""
    plc = login("plc-line-1")
    assert plc.subscribe("genclip/line-1/#") == [1]
    pub = publisher("genclip-line-2", "line-1")
    pub.publish_inspection(make_inspection("line-1", 1, "NG"))
    assert wait_until(lambda: pub.stats["reject"].dropped == 1 and pub.stats["status"].dropped == 1)
    assert pub.health() == (True, "connected")  # the link is fine; the broker's log and the counters say why
    marker = login("genclip-line-1")
    assert marker.publish("genclip/line-1/status", b"end") in ACCEPTED
    assert plc.wait_for("genclip/line-1/status", b"end")
    assert plc.messages == [("genclip/line-1/status", b"end")]


# --- Redis with the shipped users.acl ------------------------------------------------------------


def redis_acl(shipped: str, passwords: dict[str, str]) -> str:
    """users.acl with each placeholder replaced by the SHA-256 of that user's test password."""
    out = []
    for line in shipped.splitlines():
        if PLACEHOLDER in line:
            user = line.split()[1]
            line = line.replace(PLACEHOLDER, "#" + hashlib.sha256(passwords[user].encode()).hexdigest())
        out.append(line)
    return "\n".join(out) + "\n"


class AclRedis(RedisServer):
    """redis-server with an ACL file; ready once the admin user gets PONG."""

    def __init__(self, workdir: Path, aclfile: Path, admin_password: str, **kwargs: Any) -> None:
        self.aclfile = aclfile
        self.admin_password = admin_password
        super().__init__(workdir, **kwargs)

    def _command(self) -> list[str]:
        return [*super()._command(), "--aclfile", str(self.aclfile)]

    def _ready(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(f"AUTH admin {self.admin_password}\r\nPING\r\n".encode())
                reply = b""
                while b"\r\n" not in reply.partition(b"\r\n")[2]:
                    chunk = s.recv(64)
                    if not chunk:
                        return False
                    reply += chunk
                return reply.startswith(b"+OK\r\n+PONG")
        except OSError:
            return False


@pytest.fixture
def redis_passwords() -> dict[str, str]:
    return {user: secrets.token_urlsafe(12) for user in REDIS_USERS}


@pytest.fixture
def acl_redis(tmp_path: Path, redis_passwords: dict[str, str]) -> Iterator[AclRedis]:
    aclfile = tmp_path / "users.acl"
    aclfile.write_text(redis_acl(REDIS_ACL.read_text(), redis_passwords))
    server = AclRedis(
        tmp_path / "redis", aclfile, redis_passwords["admin"], executable=require_binary(RedisServer.binary)
    )
    try:
        server.start()
    except BrokerStartError as e:
        pytest.fail(str(e), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def connect(acl_redis: AclRedis, redis_passwords: dict[str, str]) -> Iterator[Callable[..., redis.Redis]]:
    """connect(user, db=0) -> a client logged in as that user; closed after the test."""
    made: list[redis.Redis] = []

    def make(user: str, db: int = 0) -> redis.Redis:
        password = redis_passwords[user]
        r = redis.Redis(acl_redis.host, acl_redis.port, db, username=user, password=password, socket_timeout=5)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def refused(call: Callable[[], Any]) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


def test_shipped_users_acl_does_not_load_until_passwords_are_set(tmp_path: Path) -> None:
    server = AclRedis(tmp_path, REDIS_ACL, "none", executable=require_binary(RedisServer.binary))
    with pytest.raises(BrokerStartError, match="password hash must be exactly 64 characters"):
        server.start()


def test_default_user_is_off(acl_redis: AclRedis) -> None:
    once = {"host": acl_redis.host, "port": acl_redis.port, "socket_timeout": 5, "retry": Retry(NoBackoff(), 0)}
    with redis.Redis(**once) as anonymous, pytest.raises(redis.exceptions.AuthenticationError):
        anonymous.ping()
    with redis.Redis(password="guess", **once) as default, pytest.raises(redis.exceptions.AuthenticationError):
        default.ping()


def test_agent_user_writes_only_its_own_keys(connect: Callable[..., redis.Redis]) -> None:
    admin, agent = connect("admin"), connect("genclip-line-1")
    assert agent.ping()
    pipe = agent.pipeline(transaction=False)
    pipe.xadd("genclip:line-1:results", {"payload": "{}"}, maxlen=100, approximate=True)
    pipe.set("genclip:line-1:map:cam-1:1", b"png", ex=60)
    pipe.set("genclip:line-1:info", "{}")
    replies = pipe.execute(raise_on_error=False)
    assert not any(isinstance(r, Exception) for r in replies), replies
    assert admin.xlen("genclip:line-1:results") == 1 and admin.get("genclip:line-1:map:cam-1:1") == b"png"

    assert refused(lambda: agent.xadd("genclip:line-2:results", {"payload": "{}"}))
    assert refused(lambda: agent.set("genclip:line-2:info", "{}"))
    assert refused(lambda: agent.set("other", "x"))
    assert refused(lambda: agent.get("genclip:line-1:info"))  # write only: it never reads
    assert refused(lambda: agent.delete("genclip:line-1:results"))
    for command in (
        ("FLUSHALL",),
        ("KEYS", "*"),
        ("CONFIG", "GET", "*"),
        ("ACL", "LIST"),
        ("XTRIM", "genclip:line-1:results", "MAXLEN", "0"),
    ):
        assert refused(lambda c=command: agent.execute_command(*c)), command
    assert admin.exists("genclip:line-2:results", "genclip:line-2:info", "other") == 0
    assert admin.xlen("genclip:line-1:results") == 1


def test_dashboard_user_reads_only(connect: Callable[..., redis.Redis]) -> None:
    admin, dashboard = connect("admin"), connect("genclip-dashboard")
    entry = admin.xadd("genclip:line-2:results", {"payload": "{}", "verdict": "NG"})
    admin.set("genclip:line-2:map:cam-1:3", b"png", ex=60)
    admin.set("secret", "x")
    assert dashboard.ping()
    assert dashboard.xrange("genclip:line-2:results") == [(entry, {b"payload": b"{}", b"verdict": b"NG"})]
    assert dashboard.xrevrange("genclip:line-2:results", count=1)[0][0] == entry
    assert dashboard.xread({"genclip:line-2:results": "0"}, block=100) != []
    assert dashboard.xlen("genclip:line-2:results") == 1
    assert dashboard.get("genclip:line-2:map:cam-1:3") == b"png" and dashboard.ttl("genclip:line-2:map:cam-1:3") > 0

    assert refused(lambda: dashboard.xadd("genclip:line-2:results", {"payload": "{}"}))
    assert refused(lambda: dashboard.delete("genclip:line-2:results"))
    assert refused(lambda: dashboard.set("genclip:line-2:info", "{}"))
    assert refused(lambda: dashboard.get("secret"))
    assert refused(lambda: dashboard.xgroup_create("genclip:line-2:results", "g"))
    for command in (("FLUSHALL",), ("KEYS", "*"), ("CONFIG", "GET", "*")):
        assert refused(lambda c=command: dashboard.execute_command(*c)), command
    assert admin.xlen("genclip:line-2:results") == 1


@pytest.mark.parametrize("db", [0, 3])
def test_redis_publisher_with_the_agent_user(
    acl_redis: AclRedis,
    connect: Callable[..., redis.Redis],
    redis_passwords: dict[str, str],
    tmp_path: Path,
    db: int,
) -> None:
    secret = tmp_path / "redis-password"
    secret.write_text(redis_passwords["genclip-line-1"] + "\n")
    config = RedisConfig(
        url=f"{acl_redis.url.rsplit('/', 1)[0]}/{db}",
        username="genclip-line-1",
        password_file=secret,
        reconnect_min_s=0.05,
        reconnect_max_s=0.2,
    )
    pub = RedisStreamPublisher(config, "line-1")
    pub.start()
    try:
        pub.publish_inspection(make_inspection("line-1", 5, "NG", map_png=b"png"))
        pub.publish_info({"version": "1.2.3"})
        assert wait_until(lambda: pub.stats["result"].sent == 1 and pub.stats["info"].sent == 1), pub.health()
        assert pub.stats["map"].sent == 1 and pub.health() == (True, "connected")
    finally:
        pub.stop(timeout=1.0)

    admin, dashboard = connect("admin"), connect("genclip-dashboard", db)
    [(_, fields)] = dashboard.xrange("genclip:line-1:results")
    assert json.loads(fields[b"payload"])["seq"] == 5 and fields[b"verdict"] == b"NG"
    assert dashboard.get("genclip:line-1:map:cam-1:5") == b"png"
    assert json.loads(dashboard.get("genclip:line-1:info")) == {"version": "1.2.3"}
    # Nothing the agent sent was refused: the user has every command redis-py and the agent need.
    log = admin.acl_log()
    assert [e for e in log if e.get("username") == "genclip-line-1"] == [], log


def test_placeholders_are_replaced_per_user() -> None:
    acl = redis_acl(REDIS_ACL.read_text(), {user: user for user in REDIS_USERS})
    assert PLACEHOLDER not in acl
    assert "#" + hashlib.sha256(b"genclip-line-1").hexdigest() in acl
    assert re.search(r"^user default off ", acl, re.M)
