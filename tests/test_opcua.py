"""The OPC UA server (agent/opcua/): the handshake's buffer, the users file and config, and the real agent
with real Mosquitto and Redis and an asyncua client as a PLC: certificate and user/password (anonymous and a
wrong password refused), ResultCounter/Verdict/Reject monitored and matched with the MQTT result of the same
part, the ResultValid/ResultAck handshake through a buffer overrun, Trigger(partId) and SetThreshold by role;
ResultReady events (one per result, discarded ones included) matched field by field with MQTT; and
`trusted_clients_dir` letting in only the client certificates in it."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from agent.opcua.config import OpcuaConfig
from agent.opcua.handshake import ResultHandshake
from agent.opcua.nodes import PlcResult
from agent.opcua.users import UsersFileError, parse_users
from agent.results import iso
from agent.service import InspectionService
from bench.brokers import free_port
from bench.opcua_client import OpcuaCredentials, make_credentials, secure_client
from tests.faults_support import Subscriber, fault_config, metric, synthetic_camera, wait_for

LINE = "opc"


def result(part: str) -> PlcResult:
    now = datetime.now(UTC)
    return PlcResult("cam-1", part, 0, 1, True, 0.7, ("hole",), now, now + timedelta(seconds=1), "widget", part, now)


# --- the handshake, without a server --------------------------------------------------------------------------
def test_four_phase_handshake_presents_one_result_at_a_time_in_order():
    hs = ResultHandshake(capacity=4)
    assert hs.add(result("P-1")) is not None and hs.add(result("P-2")) is None
    state = hs.state()
    assert state.presented is not None and (state.presented.part_id, state.presented.number) == ("P-1", 1)
    assert (state.valid, state.buffered) == (True, 2)
    assert hs.acknowledge(True) is None and not hs.state().valid  # phase 3: valid drops, nothing new yet
    assert hs.add(result("P-3")) is None  # the PLC has not cleared its ack: nothing is presented
    presented = hs.acknowledge(False)  # phase 4 -> phase 1 with the next result
    assert presented is not None and (presented.part_id, presented.number) == ("P-2", 2) and hs.state().valid
    assert hs.acknowledge(False) is None  # a repeated write changes nothing


def test_a_full_buffer_discards_the_newest_sets_overrun_until_it_drains_and_leaves_a_counter_gap():
    hs = ResultHandshake(capacity=2)
    for n in range(1, 6):
        hs.add(result(f"P-{n}"))
    state = hs.state()
    assert (state.buffered, state.discarded, state.overrun) == (2, 3, True)
    seen = []
    while hs.state().valid:
        seen.append((hs.state().presented.part_id, hs.state().presented.number))  # type: ignore[union-attr]
        hs.acknowledge(True)
        if hs.state().buffered:
            assert hs.state().overrun  # still results of the overrun in the buffer
        hs.acknowledge(False)
    assert seen == [("P-1", 1), ("P-2", 2)] and not hs.state().overrun
    hs.add(result("P-6"))
    assert hs.state().presented.number == 6  # type: ignore[union-attr]  # 3, 4, 5 were discarded: a gap


def test_without_handshake_every_result_is_presented_and_acks_are_ignored():
    hs = ResultHandshake(capacity=1, handshake=False)
    for n in range(1, 4):
        assert hs.add(result(f"P-{n}")) is not None
    assert hs.acknowledge(True) is None and hs.state().presented.part_id == "P-3"  # type: ignore[union-attr]
    assert (hs.state().valid, hs.state().discarded, hs.state().overrun) == (True, 0, False)


# --- users and config -----------------------------------------------------------------------------------------
def test_users_file_roles_and_its_errors_name_the_line():
    users = parse_users("# comment\n\nplc-1:plc:pass:with:colons\nhmi:operator:longenough\n")
    assert users["plc-1"].password == "pass:with:colons" and users["hmi"].role == "operator"
    assert "pass" not in repr(users["plc-1"])
    for text, message in [
        ("plc:admin:longenough", "line 1: role 'admin'"),
        ("plc:plc", "line 1: expected name:role:password"),
        ("a:plc:longenough\na:reader:longenough", "line 2: user a is listed twice"),
        ("a:plc:short", "under 8 characters"),
    ]:
        with pytest.raises(UsersFileError, match=message):
            parse_users(text)


def test_config_off_by_default_and_checked_when_on(tmp_path, monkeypatch):
    assert not OpcuaConfig().enabled
    creds = make_credentials(tmp_path, LINE)
    cfg = OpcuaConfig(**creds.config(4840))
    assert cfg.namespace(LINE) == cfg.application(LINE) == f"urn:genclip-inspect:{LINE}"
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    with pytest.raises(ValidationError, match="is empty; generate them with `genclip opcua cert"):
        OpcuaConfig(**creds.config(4840, private_key_file=str(empty)))
    with pytest.raises(ValidationError, match="no users"):
        OpcuaConfig(**creds.config(4840, users_file=None))
    monkeypatch.setattr("agent.opcua.config.available", lambda: False)
    with pytest.raises(ValidationError, match=r"pip install 'genclip-inspect\[opcua\]'"):
        OpcuaConfig(**creds.config(4840))


def test_config_check_names_the_pip_command_when_the_extra_is_missing(tmp_path, monkeypatch):
    from cli.main import app

    creds = make_credentials(tmp_path, LINE)
    lines = ["[model]", 'pretrained = "random"', "[opcua]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in creds.config(4840).items()]
    path = tmp_path / "line.toml"
    path.write_text("\n".join(lines) + "\n")
    ok = CliRunner().invoke(app, ["config", "check", "--config", str(path)])
    assert ok.exit_code == 0, ok.output
    monkeypatch.setattr("agent.opcua.config.available", lambda: False)
    missing = CliRunner().invoke(app, ["config", "check", "--config", str(path)])
    assert missing.exit_code == 2 and "pip install 'genclip-inspect[opcua]'" in missing.output


# --- the agent, a PLC over OPC UA, and MQTT ---------------------------------------------------------------------
class Plc:
    """An asyncua client with a PLC's view: the camera's variables, monitored and read."""

    def __init__(self, client: Any, ns: int) -> None:
        from asyncua import ua

        self.ua, self.client, self.ns = ua, client, ns
        self.changes: dict[str, list[Any]] = {}

    def node(self, name: str, camera: str = "cam-1") -> Any:
        return self.client.get_node(self.ua.NodeId(f"{LINE}.{camera}.{name}" if camera else f"{LINE}.{name}", self.ns))

    async def read(self, *names: str) -> dict[str, Any]:
        return {name: await self.node(name).read_value() for name in names}

    async def monitor(self, *names: str) -> None:
        plc = self

        class Handler:
            def datachange_notification(self, node: Any, value: Any, data: Any) -> None:
                plc.changes.setdefault(node.nodeid.Identifier.rsplit(".", 1)[1], []).append(value)

        subscription = await self.client.create_subscription(20, Handler())
        await subscription.subscribe_data_change([self.node(n) for n in names])

    async def ack(self, value: bool) -> None:
        await self.node("ResultAck").write_value(self.ua.DataValue(self.ua.Variant(value, self.ua.VariantType.Boolean)))

    async def until(self, name: str, value: Any, timeout: float = 20.0) -> None:
        end = asyncio.get_running_loop().time() + timeout
        while (await self.node(name).read_value()) != value:
            assert asyncio.get_running_loop().time() < end, f"{name} never became {value!r}"
            await asyncio.sleep(0.02)

    async def trigger(self, part_id: str) -> list[Any]:
        camera = self.client.get_node(self.ua.NodeId(f"{LINE}.cam-1", self.ns))
        return await camera.call_method(self.ua.NodeId(f"{LINE}.cam-1.Trigger", self.ns), part_id)


async def refused(url: str, creds: OpcuaCredentials, user: str | None, password: str | None = None) -> str:
    client = await secure_client(url, creds, user, password)
    try:
        await client.connect()
    except Exception as exc:
        return type(exc).__name__
    await client.disconnect()
    return "connected"


def test_a_plc_over_opcua_gets_the_mqtt_result_runs_the_handshake_through_an_overrun_and_triggers_parts(
    tmp_path: Path, mosquitto, redis_server
) -> None:
    port = free_port()
    creds = make_credentials(tmp_path, LINE)
    camera = synthetic_camera("cam-1", 3, acquisition="triggered", queue_size=16, synthetic={"defect_rate": 0.5})
    cfg = fault_config(mosquitto.port, redis_server.url, LINE, [camera], mqtt={"decision_window_ms": 60_000})
    cfg.opcua = OpcuaConfig(**creds.config(port, result_buffer=3))
    url = f"opc.tcp://127.0.0.1:{port}/"
    watcher = Subscriber(mosquitto.port, [f"genclip/{LINE}/cam-1/#"], f"opc-watch-{LINE}")
    service = InspectionService(cfg)
    mqtt_results: dict[str, dict[str, Any]] = {}

    def mqtt_result(part: str) -> dict[str, Any]:
        wait_for(lambda: any(r["part_id"] == part for r in watcher.of("/result")), 30, f"the MQTT result of {part}")
        found = next(r for r in watcher.of("/result") if r["part_id"] == part)
        decision = next(d for d in watcher.of("/decision") if d["part_id"] == part)
        mqtt_results[part] = {**found, "reject": decision["reject"]}
        return mqtt_results[part]

    async def scenario() -> dict[str, Any]:
        from asyncua import ua

        seen: dict[str, Any] = {
            "anonymous": await refused(url, creds, None),
            "wrong password": await refused(url, creds, "plc", "not-the-password"),
        }
        client = await secure_client(url, creds, "plc")
        async with client:
            plc = Plc(client, await client.get_namespace_index(f"urn:genclip-inspect:{LINE}"))
            await plc.monitor("ResultCounter", "Verdict", "Reject", "ResultValid")
            counter, part = await plc.trigger("P-0001")  # the same path as an MQTT trigger
            seen["trigger"] = (counter, part)
            await plc.until("ResultValid", True)
            presented = [await plc.read("PartId", "ResultCounter", "Verdict", "Reject", "Score", "TriggerCounter")]
            for n in range(2, 7):  # five more parts, none acknowledged: the buffer (3) overruns
                await asyncio.to_thread(mqtt_result, f"P-{n - 1:04d}")
                await plc.trigger(f"P-{n:04d}")
            await asyncio.to_thread(mqtt_result, "P-0006")
            await plc.until("DiscardedResults", 3)
            seen["full"] = await plc.read("BufferedResults", "Overrun", "DiscardedResults", "PartId")
            try:
                await plc.trigger("P-0002")
            except ua.UaStatusCodeError as exc:
                seen["repeated"] = type(exc).__name__
            overrun_while_draining = []
            for _ in range(3):  # the four-phase handshake, one result at a time
                await plc.ack(True)
                await plc.until("ResultValid", False)
                overrun_while_draining.append(await plc.node("Overrun").read_value())
                await plc.ack(False)
                await asyncio.sleep(0.1)
                if await plc.node("ResultValid").read_value():
                    presented.append(
                        await plc.read("PartId", "ResultCounter", "Verdict", "Reject", "Score", "TriggerCounter")
                    )
            seen["drained"] = await plc.read("BufferedResults", "Overrun", "ResultValid")
            seen["overrun while draining"] = overrun_while_draining
            counter, part = await plc.trigger("")  # no part id: the agent names the part
            await plc.until("ResultValid", True)
            presented.append(await plc.read("PartId", "ResultCounter", "Verdict", "Reject", "Score", "TriggerCounter"))
            seen["made id"] = (counter, part)
            line = client.get_node(ua.NodeId(LINE, plc.ns))
            try:
                await line.call_method(ua.NodeId(f"{LINE}.SetThreshold", plc.ns), "widget", 0.4)
            except ua.UaStatusCodeError as exc:
                seen["plc SetThreshold"] = type(exc).__name__
            seen["line"] = {n: await plc.node(n, camera="").read_value() for n in ("Status", "Heartbeat")}
            await asyncio.sleep(0.3)
            seen["changes"] = plc.changes
            seen["presented"] = presented
        async with await secure_client(url, creds, "operator") as operator:
            seen["operator SetThreshold"] = await operator.get_node(ua.NodeId(LINE, plc.ns)).call_method(
                ua.NodeId(f"{LINE}.SetThreshold", plc.ns), "WIDGET", 0.4
            )
        async with await secure_client(url, creds, "reader") as reader:
            try:
                await Plc(reader, plc.ns).ack(True)
            except ua.UaStatusCodeError as exc:
                seen["reader ack"] = type(exc).__name__
        return seen

    try:
        service.start()
        seen = asyncio.run(scenario())
        made = seen["made id"][1]
        mqtt_result(made)
        refused_repeated = metric(service, "genclip_triggers_refused_total", camera="cam-1", reason="repeated")
        thresholds = service.info()["operator_overrides"]
    finally:
        service.shutdown()
        watcher.close()
    assert seen["anonymous"] == "BadIdentityTokenRejected" and seen["wrong password"] == "BadUserAccessDenied"
    assert seen["trigger"] == (1, "P-0001") and seen["repeated"] == "BadEntryExists" and refused_repeated == 1
    assert seen["full"] == {"BufferedResults": 3, "Overrun": True, "DiscardedResults": 3, "PartId": "P-0001"}
    assert seen["overrun while draining"] == [True, True, False] and seen["drained"] == {
        "BufferedResults": 0,
        "Overrun": False,
        "ResultValid": False,
    }
    assert made.startswith("cam-1-") and seen["made id"][0] == 7
    presented = seen["presented"]
    assert [(p["PartId"], p["ResultCounter"]) for p in presented] == [
        ("P-0001", 1),
        ("P-0002", 2),
        ("P-0003", 3),
        (made, 7),  # 4, 5 and 6 were discarded: a gap the PLC sees
    ]
    verdicts = {"OK": 0, "NG": 1, "ERROR": 2}
    for shown in presented:
        mqtt = mqtt_results[shown["PartId"]]
        assert shown["Verdict"] == verdicts[mqtt["verdict"]] and shown["Reject"] == mqtt["reject"]
        assert shown["Score"] == pytest.approx(mqtt["score"]) and shown["TriggerCounter"] == mqtt["trigger"]
    changes = seen["changes"]
    assert changes["ResultCounter"] == [0, 1, 2, 3, 7]  # monitored: every presented result, in order
    assert changes["ResultValid"][:3] == [False, True, False]
    assert changes["Verdict"][-1] == verdicts[mqtt_results[made]["verdict"]]
    assert seen["plc SetThreshold"] == "BadUserAccessDenied" and seen["reader ack"] == "BadUserAccessDenied"
    assert seen["operator SetThreshold"] == ["widget", 0.4] and thresholds["thresholds"] == {"widget": 0.4}  # type: ignore[index]
    assert seen["line"]["Status"] in ("online", "degraded") and seen["line"]["Heartbeat"] >= 1


def utc(moment: datetime) -> datetime:
    """asyncua's DateTime as an aware UTC datetime (it may hand back naive UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def test_result_ready_events_one_per_result_with_the_mqtt_result_fields_whatever_the_handshake_does(
    tmp_path: Path, mosquitto, redis_server
) -> None:
    port = free_port()
    creds = make_credentials(tmp_path, LINE)
    camera = synthetic_camera("cam-1", 5, acquisition="triggered", queue_size=8, synthetic={"defect_rate": 0.5})
    cfg = fault_config(mosquitto.port, redis_server.url, LINE, [camera], mqtt={"decision_window_ms": 60_000})
    cfg.opcua = OpcuaConfig(**creds.config(port, result_buffer=1))  # no acks: parts 2 and 3 are discarded
    url = f"opc.tcp://127.0.0.1:{port}/"
    watcher = Subscriber(mosquitto.port, [f"genclip/{LINE}/cam-1/#"], f"opc-events-{LINE}")
    service = InspectionService(cfg)
    parts = ["E-0001", "E-0002", "E-0003"]

    async def scenario() -> dict[str, Any]:
        from asyncua import ua

        events: list[Any] = []

        class Handler:
            def event_notification(self, event: Any) -> None:
                events.append(event)

        async with await secure_client(url, creds, "reader") as reader:  # readers may subscribe to events
            ns = await reader.get_namespace_index(f"urn:genclip-inspect:{LINE}")
            event_type = reader.get_node(ua.NodeId("ResultReadyEventType", ns))
            subscription = await reader.create_subscription(20, Handler())
            await subscription.subscribe_events(reader.get_node(ua.NodeId(f"{LINE}.cam-1", ns)), event_type)
            async with await secure_client(url, creds, "plc") as client:
                plc = Plc(client, ns)
                for part in parts:
                    await plc.trigger(part)
                    await asyncio.to_thread(
                        wait_for, lambda p=part: any(r["part_id"] == p for r in watcher.of("/result")), 30, part
                    )
                end = asyncio.get_running_loop().time() + 10
                while len(events) < len(parts) and asyncio.get_running_loop().time() < end:
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.3)  # nothing more comes
                handshake = await plc.read("PartId", "BufferedResults", "DiscardedResults", "Overrun")
        return {"events": events, "handshake": handshake}

    try:
        service.start()
        seen = asyncio.run(scenario())
        wait_for(lambda: len(watcher.of("/decision")) >= len(parts), 30, "the decisions")
        results = {r["part_id"]: r for r in watcher.of("/result")}
        decisions = {d["part_id"]: d for d in watcher.of("/decision")}
        run_id = service.info()["run_id"]
    finally:
        service.shutdown()
        watcher.close()
    assert seen["handshake"] == {"PartId": "E-0001", "BufferedResults": 1, "DiscardedResults": 2, "Overrun": True}
    events = seen["events"]
    assert [e.PartId for e in events] == parts  # one event per result, discarded ones included, in order
    verdicts = {"OK": 0, "NG": 1, "ERROR": 2}
    evaluations = {"OK": 1, "NG": 2, "ERROR": 0}
    severities = {"OK": 100, "NG": 500, "ERROR": 700}
    for number, event in enumerate(events, start=1):
        mqtt, decision = results[event.PartId], decisions[event.PartId]
        assert event.ResultId == f"{mqtt['run_id']}:cam-1:{mqtt['seq']}" and mqtt["run_id"] == run_id
        assert (event.Camera, event.ProductId, event.IsPartial) == ("cam-1", mqtt["product_class"], False)
        assert (event.ResultCounter, event.TriggerCounter) == (number, mqtt["trigger"])
        assert event.Verdict == verdicts[mqtt["verdict"]] and event.ResultEvaluation == evaluations[mqtt["verdict"]]
        assert event.Reject == decision["reject"] and event.Score == pytest.approx(mqtt["score"])
        assert event.DefectTypes == ",".join(decision["defect_types"])  # on the decision, not the result
        assert iso(utc(event.CapturedAt)) == mqtt["captured_at"] and iso(utc(event.Deadline)) == decision["deadline"]
        assert utc(event.CreationTime) >= utc(event.CapturedAt)
        assert event.Severity == severities[mqtt["verdict"]]
        assert event.Message.Text == f"cam-1 {event.PartId} {mqtt['verdict']}"
        assert event.SourceNode.Identifier == f"{LINE}.cam-1"


def test_trusted_clients_dir_lets_in_only_the_client_certificates_in_it(tmp_path: Path, monkeypatch) -> None:
    import shutil

    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from agent.opcua.certificate import write_certificate
    from agent.opcua.server import OpcuaServer
    from bench.opcua_client import CLIENT_URI

    creds = make_credentials(tmp_path, LINE)
    stranger = write_certificate(tmp_path / "stranger", CLIENT_URI, client=True)
    monkeypatch.setenv("HOME", str(tmp_path))  # the folder given as ~/trusted: expanded like the other files
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    pem = x509.load_der_x509_certificate(creds.client.certificate.read_bytes()).public_bytes(Encoding.PEM)
    (trusted / "plc.pem").write_bytes(pem)  # our client, as PEM
    shutil.copy(creds.server.certificate, trusted / "other.der")  # someone else, as DER
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "README").write_text("not a certificate\n")
    with pytest.raises(ValidationError, match=r"trusted_clients_dir: .*junk/README is not a readable X.509"):
        OpcuaConfig(**creds.config(4840, trusted_clients_dir="~/junk"))
    port = free_port()
    url = f"opc.tcp://127.0.0.1:{port}/"
    server = OpcuaServer(OpcuaConfig(**creds.config(port, trusted_clients_dir="~/trusted")), LINE, ["cam-1"])

    async def scenario() -> dict[str, str]:
        seen = {
            "stranger": await refused(url, OpcuaCredentials(creds.server, stranger, creds.users), "plc"),
            "trusted": await refused(url, creds, "plc"),
        }
        async with await secure_client(url, creds, "reader") as reader:  # a trusted client works as usual
            ns = await reader.get_namespace_index(f"urn:genclip-inspect:{LINE}")
            seen["read"] = await Plc(reader, ns).node("PartId").read_value()
        return seen

    server.start()
    try:
        assert server.startup_problem(30) is None
        seen = asyncio.run(scenario())
    finally:
        server.stop()
    assert seen == {"stranger": "BadCertificateUntrusted", "trusted": "connected", "read": ""}
