"""What the agent publishes about a frame: the `Inspection`, and the JSON payloads made from it.

One `Inspection` per accepted frame that reached the engine. The result payload
(schema 1) goes to MQTT `<prefix>/<line>/<camera>/result` and to the Redis stream;
the reject payload to `.../reject` for NG (and ERROR) parts; the decision payload
to `.../decision` for every part. See docs/integration.md for the field list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

SCHEMA = 1
Verdict = Literal["OK", "NG", "ERROR"]


def iso(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and a Z, the one time format of every payload."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def map_key(line: str, camera: str, seq: int) -> str:
    """The Redis key of a frame's anomaly map PNG."""
    return f"genclip:{line}:map:{camera}:{seq}"


def results_stream(line: str) -> str:
    """The Redis stream every result of a line is appended to."""
    return f"genclip:{line}:results"


@dataclass(frozen=True, slots=True, eq=False)
class Inspection:
    """One frame's outcome, ready for the publishers; `result` is the schema-1 result payload."""

    line: str
    camera: str
    seq: int
    part_id: str
    product_class: str
    verdict: Verdict
    score: float | None  # None when the frame could not be scored (verdict ERROR)
    captured_at: datetime
    deadline: datetime  # captured_at + the line's decision window
    captured_mono: float
    defect_types: list[str]
    result: dict[str, Any]
    map_png: bytes | None = None  # stored under result["map_key"] when not None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rejects(self) -> bool:
        """NG parts are rejected; so are parts that could not be inspected."""
        return self.verdict != "OK"

    def reject_payload(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "line": self.line,
            "camera": self.camera,
            "part_id": self.part_id,
            "seq": self.seq,
            "captured_at": iso(self.captured_at),
            "deadline": iso(self.deadline),
            "verdict": self.verdict,
            "score": self.score,
            "defect_types": self.defect_types,
        }

    def decision_payload(self) -> dict[str, Any]:
        return {**self.reject_payload(), "reject": self.rejects}
