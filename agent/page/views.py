"""What the page reads, as JSON: one part, the line's state (status, brokers, cameras with their counters,
classes with thresholds and calibration figures), and what the page needs of the service (`LinePort`).

The part is the published result's own fields (agent/results.py), so the page shows what the PLC and the
Redis stream got; the line's state is the retained info (`service.info()`) plus the brokers' links, each
camera's counters (agent/metrics.py `camera_counts`) and each class's calibration (model/classes.py).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Protocol

from agent.control import Answer, Command
from agent.metrics import AgentMetrics
from agent.page.live import LivePart
from agent.results import JsonObject

if TYPE_CHECKING:
    from model.classes import ClassStatus

PART_FIELDS = (
    "part_id",
    "seq",
    "run_id",
    "product_class",
    "captured_at",
    "latency_ms",
    "score",
    "threshold",
    "threshold_source",
    "verdict",
    "error",
    "defects",
    "map_key",
    "trigger",
    "missed_triggers",
)


class LinePort(Protocol):
    """What the page asks of the running line (agent/service.py implements it)."""

    @property
    def metrics(self) -> AgentMetrics: ...

    def info(self) -> JsonObject:
        """The retained info: model, cameras, classes, status."""
        ...

    def handle_command(self, command: Command) -> Answer:
        """Run an operator command through the same table as MQTT commands (agent/commands.py)."""
        ...

    def class_statuses(self) -> list[ClassStatus]:
        """Every class the engine knows (empty while it loads)."""
        ...

    def sink_health(self) -> list[tuple[str, bool, str]]:
        """(sink, connected, why) of each broker link."""
        ...

    def record_review(self, fields: dict[str, str]) -> str:
        """Append an operator's review of a part to Redis; its stream entry id. Raises when Redis refuses."""
        ...


def part_json(part: LivePart) -> JsonObject:
    """A part as the page shows it: its number, camera, the result's fields, prompt version, frame size."""
    result = part.inspection.result
    model = result.get("model")
    image = part.image
    return {
        "n": part.number,
        "camera": part.inspection.camera,
        **{key: result.get(key) for key in PART_FIELDS},
        "prompt_version": model.get("prompt_version") if isinstance(model, dict) else None,
        "frame_size": None if image is None else [int(image.shape[1]), int(image.shape[0])],  # width, height
        "picture": image is not None,
    }


def class_json(status: ClassStatus) -> JsonObject:
    """A class: word, threshold and its source, and the calibration figures (good-part scores, false rejects)."""
    return {
        "name": status.product_class,
        "class_word": status.class_word,
        "class_word_source": status.class_word_source,
        "threshold": status.threshold,
        "threshold_source": status.threshold_source,
        "stale_reason": status.stale_reason,
        "calibration": None if status.calibration is None else asdict(status.calibration),
    }


def line_json(line: LinePort) -> JsonObject:
    """The line's state for the page: status, model, brokers, cameras with counters, classes."""
    info = line.info()
    model = info.get("model")
    cameras = info.get("cameras")
    return {
        "line": {"id": info.get("line"), "name": info.get("name"), "run_id": info.get("run_id")},
        "status": info.get("status"),
        "model": model,
        "brokers": [{"sink": sink, "up": up, "detail": why} for sink, up, why in line.sink_health()],
        "cameras": [_camera_json(line.metrics, c) for c in cameras if isinstance(c, dict)]
        if isinstance(cameras, list)
        else [],
        "classes": [class_json(s) for s in line.class_statuses()],
        "class_errors": {
            name: entry["error"]
            for name, entry in _dict(info.get("classes")).items()
            if isinstance(entry, dict) and "error" in entry
        },
    }


def _dict(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def _camera_json(metrics: AgentMetrics, camera: dict[str, object]) -> JsonObject:
    counts = metrics.camera_counts(str(camera["id"]))
    return {
        **camera,
        "counters": {
            "parts": counts.parts,
            **counts.verdicts,
            "dropped": {reason: n for reason, n in sorted(counts.dropped.items()) if n},
            "missed_triggers": camera.get("missed_triggers"),
        },
    }
