"""The OPC UA address space of a line, as data: node ids, variable names and types, the result a PLC sees.

Every node of the line has a string node id in the line's namespace (`[opcua].namespace_uri`, default
`urn:genclip-inspect:<line>`), stable across restarts and installs, so a PLC program can name them:

    ns=<idx>;s=<line>                      the line's object (Objects/<line>)
    ns=<idx>;s=<line>.Status               ... its variables (LINE_VARIABLES) and SetThreshold
    ns=<idx>;s=<line>.<camera>             a camera's object, which emits ResultReady events
    ns=<idx>;s=<line>.<camera>.Verdict     ... its variables (CAMERA_VARIABLES) and Trigger

`<idx>` is the namespace's index in the server's NamespaceArray (2 on this server; a client looks it
up by the URI). Browse names equal the last part of the node id, in the same namespace.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from agent.results import Inspection

VariableType = Literal["String", "UInt32", "Int16", "Boolean", "Double", "DateTime", "StringArray"]

VERDICTS = {"OK": 0, "NG": 1, "ERROR": 2}  # the Verdict variable
NO_SCORE = -1.0  # Score when the part has none (ERROR): PLCs handle NaN badly
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # CapturedAt and Deadline before the first result

# The result a PLC reads, per camera: (name, type, meaning). Written before ResultValid is set.
RESULT_VARIABLES: tuple[tuple[str, VariableType, str], ...] = (
    ("PartId", "String", "the part's id (the PLC's from its trigger, else the agent's)"),
    ("TriggerCounter", "UInt32", "the camera's trigger counter for this part; 0 unless triggered by MQTT/OPC UA"),
    ("ResultCounter", "UInt32", "the number of this result since the start, from 1; a gap = results discarded"),
    ("Verdict", "Int16", "0 OK, 1 NG, 2 ERROR"),
    ("Reject", "Boolean", "reject the part (NG, and ERROR unless [mqtt].reject_uninspected = false)"),
    ("Score", "Double", "the image score 0..1; -1 when there is none (ERROR)"),
    ("DefectTypes", "StringArray", "defect types found (NG), inspection-error / not-inspected (ERROR), else empty"),
    ("CapturedAt", "DateTime", "when the picture was taken (UTC)"),
    ("Deadline", "DateTime", "the decision deadline (UTC): after it, reject on silence"),
)
# The handshake, per camera.
HANDSHAKE_VARIABLES: tuple[tuple[str, VariableType, str], ...] = (
    ("ResultValid", "Boolean", "true: the result variables hold a result the PLC has not acknowledged"),
    ("ResultAck", "Boolean", "written by the PLC: true acknowledges the presented result, then false again"),
    ("Overrun", "Boolean", "true: results were discarded because the buffer was full; false once it drained"),
    ("BufferedResults", "UInt32", "unacknowledged results held, the presented one included"),
    ("DiscardedResults", "UInt32", "results discarded since the start because the buffer was full"),
)
CAMERA_VARIABLES = RESULT_VARIABLES + HANDSHAKE_VARIABLES
LINE_VARIABLES: tuple[tuple[str, VariableType, str], ...] = (
    ("Status", "String", "starting, online, degraded, stopped (as the retained MQTT status)"),
    ("Heartbeat", "UInt32", "+1 every second while the server runs, from 1 at every start"),
    ("PromptVersion", "String", "the prompt version the engine scores with"),
)
TRIGGER = "Trigger"
SET_THRESHOLD = "SetThreshold"
RESULT_READY = "ResultReadyEventType"
RESERVED = {name for name, _, _ in LINE_VARIABLES} | {SET_THRESHOLD}  # camera ids that would clash with them


def line_node(line: str) -> str:
    return line


def line_variable(line: str, name: str) -> str:
    return f"{line}.{name}"


def camera_node(line: str, camera: str) -> str:
    return f"{line}.{camera}"


def camera_variable(line: str, camera: str, name: str) -> str:
    return f"{line}.{camera}.{name}"


def clashing_cameras(cameras: list[str]) -> list[str]:
    """Camera ids whose node ids would be those of a line variable or method."""
    return [camera for camera in cameras if camera in RESERVED]


@dataclass(frozen=True, slots=True)
class PlcResult:
    """One part's result as the OPC UA variables show it (flat, base types)."""

    camera: str
    part_id: str
    trigger: int
    verdict: int
    reject: bool
    score: float
    defect_types: tuple[str, ...]
    captured_at: datetime
    deadline: datetime
    product_class: str
    result_id: str  # unique: <run id>:<camera>:<seq>
    published_at: datetime
    number: int = 0  # ResultCounter, given by the camera's handshake

    def values(self) -> dict[str, object]:
        """RESULT_VARIABLES' values, by name."""
        return {
            "PartId": self.part_id,
            "TriggerCounter": self.trigger,
            "ResultCounter": self.number,
            "Verdict": self.verdict,
            "Reject": self.reject,
            "Score": self.score,
            "DefectTypes": list(self.defect_types),
            "CapturedAt": self.captured_at,
            "Deadline": self.deadline,
        }


def plc_result(inspection: Inspection, published_at: datetime | None = None) -> PlcResult:
    """What the OPC UA variables show of an Inspection."""
    score = inspection.score
    return PlcResult(
        camera=inspection.camera,
        part_id=inspection.part_id,
        trigger=inspection.trigger or 0,
        verdict=VERDICTS[inspection.verdict],
        reject=inspection.rejects,
        score=score if score is not None and math.isfinite(score) else NO_SCORE,
        defect_types=tuple(inspection.defect_types),
        captured_at=inspection.captured_at,
        deadline=inspection.deadline,
        product_class=inspection.product_class,
        result_id=f"{inspection.run_id}:{inspection.camera}:{inspection.seq}",
        published_at=published_at or datetime.now(UTC),
    )
