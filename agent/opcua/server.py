"""`OpcuaServer`: the line's OPC UA server, a `Publisher` beside MQTT and Redis, on its own thread and loop.

Fed like the other sinks: the result thread (and the fail-safe thread, for parts answered ERROR) calls
`publish_inspection`, which turns the Inspection into a `PlcResult` and appends it to a bounded
hand-off queue (`[opcua].queue_size`; full: the oldest is dropped and counted as
`genclip_messages_total{sink="opcua",kind="result",outcome="dropped"}`), then wakes the server's
asyncio loop. It never waits for the loop or a client. The loop (thread `opcua`) applies the results
to the address space (agent/opcua/nodes.py) through each camera's handshake (agent/opcua/handshake.py)
and fires one ResultReady event per result; once a second it counts `Heartbeat` up and writes
`Status` and `PromptVersion` (from the info the service publishes).

A PLC's writes of `ResultAck` reach the handshake through asyncua's PostWrite callback, on the loop.
Method calls run on asyncua's worker threads: `Trigger(partId)` goes to `on_trigger` (the service's
`opcua_trigger`: the path of an MQTT trigger, with its refusals), `SetThreshold(class, value)` to
`handler` (the service's `handle_command`: the MQTT `threshold` command). Who may write and call is
decided in agent/opcua/security.py.

Start: `start` returns at once; `startup_problem` waits for the server to listen and returns why it
could not (port in use, a certificate asyncua refuses): a configuration error the service refuses
to start with. Stop: what is queued is applied, `Status` becomes `stopped`, the server closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, cast

from asyncua import Node, Server, ua
from asyncua.common.callback import CallbackType, ServerItemCallback
from pydantic import ValidationError

from agent.commands import ENGINE_LOADING
from agent.control import Answer, Command, ThresholdArgs
from agent.logs import get_logger
from agent.opcua.config import OpcuaConfig
from agent.opcua.handshake import HandshakeState, ResultHandshake
from agent.opcua.nodes import (
    CAMERA_VARIABLES,
    EPOCH,
    LINE_VARIABLES,
    NO_SCORE,
    RESULT_READY,
    SET_THRESHOLD,
    TRIGGER,
    PlcResult,
    VariableType,
    camera_node,
    camera_variable,
    line_node,
    line_variable,
    plc_result,
)
from agent.opcua.security import LineUsers, PinnedClients, RolePermissions
from agent.opcua.ua_values import data_value, node_id, status
from agent.opcua.users import read_users
from agent.publish.outbox import DeliveryStats, Outbox, link_health
from agent.results import Inspection, JsonObject
from agent.triggers import Trigger, TriggerRefusedError

log = get_logger(__name__)

OnTrigger = Callable[[str, str | None], Trigger]  # camera, part id (None: the agent makes one); raises refusals
CommandHandler = Callable[[Command], Answer]
HEARTBEAT_S = 1.0
APPLY_BATCH = 256
VARIANTS: dict[VariableType, ua.VariantType] = {
    "String": ua.VariantType.String,
    "StringArray": ua.VariantType.String,
    "UInt32": ua.VariantType.UInt32,
    "Int16": ua.VariantType.Int16,
    "Boolean": ua.VariantType.Boolean,
    "Double": ua.VariantType.Double,
    "DateTime": ua.VariantType.DateTime,
}
INITIAL: dict[VariableType, object] = {
    "String": "",
    "StringArray": [],
    "UInt32": 0,
    "Int16": 0,
    "Boolean": False,
    "Double": NO_SCORE,
    "DateTime": EPOCH,
}
# How a refused trigger answers the method call (the reason is logged and counted as for MQTT).
REFUSALS = {
    "malformed": ua.StatusCodes.BadInvalidArgument,
    "bad_part_id": ua.StatusCodes.BadInvalidArgument,
    "repeated": ua.StatusCodes.BadEntryExists,
    "not_triggered": ua.StatusCodes.BadNotSupported,
    "unknown_camera": ua.StatusCodes.BadNotFound,
    "queue_full": ua.StatusCodes.BadTooManyOperations,
    "not_running": ua.StatusCodes.BadInvalidState,
    "stopping": ua.StatusCodes.BadInvalidState,
}
EVENT_FIELDS: tuple[tuple[str, ua.VariantType], ...] = (
    ("ResultId", ua.VariantType.String),
    ("PartId", ua.VariantType.String),
    ("ProductId", ua.VariantType.String),
    ("CreationTime", ua.VariantType.DateTime),
    ("ResultEvaluation", ua.VariantType.Int32),
    ("IsPartial", ua.VariantType.Boolean),
    ("Camera", ua.VariantType.String),
    ("ResultCounter", ua.VariantType.UInt32),
    ("TriggerCounter", ua.VariantType.UInt32),
    ("Verdict", ua.VariantType.Int16),
    ("Reject", ua.VariantType.Boolean),
    ("Score", ua.VariantType.Double),
    ("DefectTypes", ua.VariantType.String),
    ("CapturedAt", ua.VariantType.DateTime),
    ("Deadline", ua.VariantType.DateTime),
)
EVALUATION = {0: 1, 1: 2, 2: 0}  # Verdict -> OPC 40001-101 ResultEvaluationEnum: OK 1, NotOK 2, Undefined 0
SEVERITY = {0: 100, 1: 500, 2: 700}


class OpcuaServer:
    """One OPC UA server per line: the PLC's flat variables, the handshake, Trigger and SetThreshold."""

    sink = "opcua"

    def __init__(
        self,
        config: OpcuaConfig,
        line_id: str,
        cameras: list[str],
        *,
        on_trigger: OnTrigger | None = None,
        handler: CommandHandler | None = None,
    ) -> None:
        self.config = config
        self.line = line_id
        self.cameras = list(cameras)
        self._on_trigger = on_trigger
        self._handler = handler
        self._inbox: Outbox[PlcResult] = Outbox(config.queue_size, on_drop=self._dropped)
        self.stats = DeliveryStats(("result",), lambda: len(self._inbox))
        self._handshakes = {c: ResultHandshake(config.result_buffer, handshake=config.handshake) for c in cameras}
        self._state_lock = threading.Lock()
        self._status = "starting"
        self._prompt_version = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._listening = threading.Event()
        self._done = threading.Event()  # the first start attempt finished (listening or failed)
        self._problem = ""
        self._closed = False
        self._server: Server | None = None
        self._ns = 0
        self._written: dict[str, object] = {}  # node id -> the value last written (only changes are written)
        self._ack_nodes: dict[ua.NodeId, str] = {}  # ResultAck node -> camera
        self._events: dict[str, Any] = {}  # camera -> its ResultReady event generator
        self.heartbeat = 0

    # --- the Publisher protocol -----------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="opcua", daemon=True)
        self._thread.start()

    def startup_problem(self, timeout: float) -> str | None:
        """Why the server cannot serve (port taken, certificate refused), or None; waits up to `timeout` s."""
        self._done.wait(timeout)
        return self._problem or None

    def publish_inspection(self, inspection: Inspection) -> None:
        """Hand the part's result to the server's loop; never waits."""
        if inspection.camera not in self._handshakes:
            return
        self._inbox.put(plc_result(inspection))
        self._poke()

    def publish_info(self, info: JsonObject) -> None:
        """Status and PromptVersion come from the line's info; written by the loop."""
        status, model = info.get("status"), info.get("model")
        with self._state_lock:
            if isinstance(status, dict) and isinstance(status.get("state"), str):
                self._status = status["state"]
            if isinstance(model, dict) and isinstance(model.get("prompt_version"), str):
                self._prompt_version = model["prompt_version"]
        self._poke()

    def health(self) -> tuple[bool, str]:
        listening = self._listening.is_set()
        return link_health(self._closed, self._thread is not None, listening, self._problem or "not listening yet")

    def stop(self, timeout: float = 5.0) -> None:
        """Apply what is queued, set Status `stopped`, close the server; within `timeout` s."""
        if self._thread is None or self._closed:
            return
        self._stopping = True
        self._poke()
        self._thread.join(max(timeout, 0.1))
        left = self._inbox.clear()
        if left:
            self.stats.count("result", "dropped", len(left))
            log.warning("opcua results not applied at stop", count=len(left))
        self._closed = True

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://{self.config.host}:{self.config.port}/"

    # --- the loop -------------------------------------------------------------------------------------
    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is None or wake is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop has closed: stop() counts what is left
            loop.call_soon_threadsafe(wake.set)

    def _dropped(self, _result: PlcResult) -> None:
        self.stats.count("result", "dropped")

    def _run(self) -> None:
        logging.getLogger("asyncua").setLevel(logging.WARNING)  # it logs every request at INFO
        try:
            asyncio.run(self._serve())
        except Exception as exc:  # never let the thread die silently
            self._problem = self._problem or f"opcua server failed: {exc}"
            log.exception("opcua server failed")
        finally:
            self._listening.clear()
            self._done.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        try:
            server = await self._build()
            await server.start()
        except Exception as exc:
            self._problem = f"OPC UA server cannot start on {self.endpoint}: {exc}"
            log.error("opcua server cannot start", endpoint=self.endpoint, error=str(exc))
            self._done.set()
            return
        self._server = server
        self._listening.set()
        self._done.set()
        log.info("opcua server listening", endpoint=self.endpoint, namespace=self.config.namespace(self.line))
        beats = asyncio.create_task(self._heartbeats())
        try:
            while not self._stopping:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), HEARTBEAT_S)
                self._wake.clear()
                await self._apply_queued()
                await self._write_line()
            await self._apply_queued()
            await self._write_line("stopped")
        finally:
            beats.cancel()
            await server.stop()

    async def _heartbeats(self) -> None:
        while True:
            self.heartbeat += 1
            await self._write(line_variable(self.line, "Heartbeat"), self.heartbeat, ua.VariantType.UInt32)
            await self._write_line()
            await asyncio.sleep(HEARTBEAT_S)

    async def _write_line(self, status: str | None = None) -> None:
        with self._state_lock:
            state, version = status or self._status, self._prompt_version
        await self._write(line_variable(self.line, "Status"), state, ua.VariantType.String)
        await self._write(line_variable(self.line, "PromptVersion"), version, ua.VariantType.String)

    async def _apply_queued(self) -> None:
        while True:
            batch = self._inbox.pop_batch(APPLY_BATCH)
            if not batch:
                return
            for result in batch:
                handshake = self._handshakes[result.camera]
                presented = handshake.add(result)
                await self._show(result.camera, presented, handshake.state())
                await self._fire_event(replace_number(result, handshake))
                self.stats.count("result", "sent")

    async def _show(self, camera: str, presented: PlcResult | None, state: HandshakeState) -> None:
        """The presented result's variables first, then the handshake's: ResultValid is set last."""
        types = dict((name, kind) for name, kind, _ in CAMERA_VARIABLES)
        if presented is not None:
            for name, value in presented.values().items():
                await self._write(camera_variable(self.line, camera, name), value, VARIANTS[types[name]])
        for name, value in state.values().items():
            await self._write(camera_variable(self.line, camera, name), value, VARIANTS[types[name]])

    async def _write(self, node: str, value: object, variant: ua.VariantType) -> None:
        if self._written.get(node, _UNSET) == value:
            return
        assert self._server is not None
        data = data_value(value, variant, datetime.now(UTC))
        await self._server.write_attribute_value(node_id(node, self._ns), data)
        self._written[node] = value

    async def _fire_event(self, result: PlcResult) -> None:
        generator = self._events.get(result.camera)
        if generator is None:
            return
        event = generator.event
        event.ResultId = result.result_id
        event.PartId = result.part_id
        event.ProductId = result.product_class
        event.CreationTime = result.published_at
        event.ResultEvaluation = EVALUATION[result.verdict]
        event.IsPartial = False
        event.Camera = result.camera
        event.ResultCounter = result.number
        event.TriggerCounter = result.trigger
        event.Verdict = result.verdict
        event.Reject = result.reject
        event.Score = result.score
        event.DefectTypes = ",".join(result.defect_types)
        event.CapturedAt = result.captured_at
        event.Deadline = result.deadline
        event.Severity = SEVERITY[result.verdict]
        verdict = ("OK", "NG", "ERROR")[result.verdict]
        await generator.trigger(message=f"{result.camera} {result.part_id} {verdict}")

    # --- the address space ------------------------------------------------------------------------------
    async def _build(self) -> Server:
        cfg = self.config
        users_path = cfg.users_path
        users = LineUsers(read_users(users_path) if users_path is not None else {}, cfg.allow_anonymous)
        server = Server(user_manager=users)
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name(f"GenCLIP Inspect {self.line}")
        await server.set_application_uri(cfg.application(self.line))
        assert cfg.certificate_path is not None and cfg.private_key_path is not None  # checked by the config
        await server.load_certificate(str(cfg.certificate_path))
        await server.load_private_key(str(cfg.private_key_path))
        tokens: list[type] = [ua.UserNameIdentityToken]
        if cfg.allow_anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        if cfg.trusted_clients_path is not None:
            server.set_certificate_validator(PinnedClients(cfg.trusted_clients_path))
        self._ns = await server.register_namespace(cfg.namespace(self.line))
        methods = await self._address_space(server)
        permissions = RolePermissions(users, set(self._ack_nodes), methods[TRIGGER], methods[SET_THRESHOLD])
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt], permissions)
        server.subscribe_server_callback(CallbackType.PostWrite, self._on_write)
        return server

    async def _address_space(self, server: Server) -> dict[str, set[ua.NodeId]]:
        ns, line = self._ns, self.line
        root = await server.nodes.objects.add_object(node_id(line_node(line), ns), ua.QualifiedName(line, ns))
        for name, kind, about in LINE_VARIABLES:
            await self._variable(root, line_variable(line, name), name, kind, about)
        threshold = await root.add_method(
            node_id(line_variable(line, SET_THRESHOLD), ns),
            ua.QualifiedName(SET_THRESHOLD, ns),
            self._set_threshold,
            [_argument("Class", ua.ObjectIds.String), _argument("Value", ua.ObjectIds.Double)],
            [_argument("Class", ua.ObjectIds.String), _argument("Threshold", ua.ObjectIds.Double)],
        )
        event_type = await self._event_type(server)
        triggers: set[ua.NodeId] = set()
        for camera in self.cameras:
            node = await root.add_object(node_id(camera_node(line, camera), ns), ua.QualifiedName(camera, ns))
            for name, kind, about in CAMERA_VARIABLES:
                variable = await self._variable(node, camera_variable(line, camera, name), name, kind, about)
                if name == "ResultAck":
                    await variable.set_writable(True)
                    self._ack_nodes[variable.nodeid] = camera
            method = await node.add_method(
                node_id(camera_variable(line, camera, TRIGGER), ns),
                ua.QualifiedName(TRIGGER, ns),
                self._trigger_method(camera),
                [_argument("PartId", ua.ObjectIds.String)],
                [_argument("TriggerCounter", ua.ObjectIds.UInt32), _argument("PartId", ua.ObjectIds.String)],
            )
            triggers.add(method.nodeid)
            self._events[camera] = await server.get_event_generator(event_type, node.nodeid)
        return {TRIGGER: triggers, SET_THRESHOLD: {threshold.nodeid}}

    async def _event_type(self, server: Server) -> Node:
        """ResultReadyEventType (a BaseEventType) with EVENT_FIELDS as properties, string node ids too."""
        ns = self._ns
        base = server.get_node(node_id(ua.ObjectIds.BaseEventType))
        event_type = await base.add_object_type(node_id(RESULT_READY, ns), ua.QualifiedName(RESULT_READY, ns))
        for name, variant in EVENT_FIELDS:
            field, qname = node_id(f"{RESULT_READY}.{name}", ns), ua.QualifiedName(name, ns)
            await event_type.add_property(field, qname, ua.get_default_value(variant), varianttype=variant)
        return event_type

    async def _variable(self, parent: Node, identifier: str, name: str, kind: VariableType, about: str) -> Node:
        variable = await parent.add_variable(
            node_id(identifier, self._ns), ua.QualifiedName(name, self._ns), INITIAL[kind], varianttype=VARIANTS[kind]
        )
        if kind == "StringArray":
            await variable.write_value_rank(ua.ValueRank.OneDimension)
            await variable.write_array_dimensions(cast(Any, [0]))  # asyncua's hint says int; the attribute is a list
        await variable.write_attribute(ua.AttributeIds.Description, ua.DataValue(ua.Variant(ua.LocalizedText(about))))
        self._written[identifier] = INITIAL[kind]
        return variable

    # --- the PLC's writes and calls ----------------------------------------------------------------------
    async def _on_write(self, event: ServerItemCallback, _dispatcher: Any) -> None:
        """PostWrite: a client's good writes of ResultAck go to the camera's handshake (on the loop)."""
        if not event.is_external:
            return
        for item, written in zip(event.request_params.NodesToWrite, event.response_params, strict=False):
            camera = self._ack_nodes.get(item.NodeId)
            if camera is None or not written.is_good():
                continue
            ack = bool(item.Value.Value.Value)
            handshake = self._handshakes[camera]
            presented = handshake.acknowledge(ack)
            await self._show(camera, presented, handshake.state())

    def _trigger_method(self, camera: str) -> Callable[..., Any]:
        def trigger(_parent: ua.NodeId, part_id: ua.Variant) -> Any:
            """Trigger(PartId) -> (TriggerCounter, PartId): an MQTT trigger's path; "" lets the agent name it."""
            text = part_id.Value if isinstance(part_id.Value, str) else ""
            if self._on_trigger is None:
                return status(ua.StatusCodes.BadNotSupported)
            try:
                accepted = self._on_trigger(camera, text.strip() or None)
            except TriggerRefusedError as exc:
                return status(REFUSALS.get(exc.reason, ua.StatusCodes.BadInvalidState))
            return [
                ua.Variant(accepted.count, ua.VariantType.UInt32),
                ua.Variant(accepted.part_id, ua.VariantType.String),
            ]

        return trigger

    def _set_threshold(self, _parent: ua.NodeId, product_class: ua.Variant, value: ua.Variant) -> Any:
        """SetThreshold(Class, Value) -> (Class, Threshold): the MQTT `threshold` command."""
        if self._handler is None:
            return status(ua.StatusCodes.BadNotSupported)
        try:
            args = ThresholdArgs.model_validate({"class": product_class.Value, "value": value.Value})
        except ValidationError as exc:
            log.warning("opcua SetThreshold refused", error=str(exc.errors()[0]["msg"]))
            return status(ua.StatusCodes.BadOutOfRange)
        try:
            answer = self._handler(Command("threshold", args))
        except ValueError as exc:
            log.warning("opcua SetThreshold refused", error=str(exc))
            loading = str(exc) == ENGINE_LOADING
            return status(ua.StatusCodes.BadInvalidState if loading else ua.StatusCodes.BadInvalidArgument)
        name, threshold = answer.get("product_class"), answer.get("threshold")
        return [ua.Variant(str(name), ua.VariantType.String), ua.Variant(float(threshold), ua.VariantType.Double)]  # type: ignore[arg-type]


_UNSET = object()


def replace_number(result: PlcResult, handshake: ResultHandshake) -> PlcResult:
    """The result with the ResultCounter number its handshake gave it (the last one numbered)."""
    return replace(result, number=handshake.numbered)


def _argument(name: str, datatype: int) -> ua.Argument:
    argument = ua.Argument()
    argument.Name = name
    argument.DataType = node_id(datatype)
    argument.ValueRank = -1
    return argument
