"""What the agent publishes about a frame: the `Inspection`, and the JSON payloads made from it.

One `Inspection` per accepted frame: `build_inspection` for a frame that reached the engine (or whose
picture could not be read), `build_uninspected` for one the agent dropped before it was inspected
(verdict ERROR, `error` "not inspected: <reason>"; see agent/failsafe.py). The result payload
(schema 1) goes to MQTT `<prefix>/<line>/<camera>/result` and to the Redis stream;
the reject payload to `.../reject` for NG (and ERROR) parts; the decision payload
to `.../decision` for every part. See docs/integration.md for the field list.

Identity: every payload carries `part_id`, `seq` (the camera's acquisition counter) and `run_id`
(the agent's start, agent/identity.py); map keys carry the run id too, so neither a part id the
agent made nor a map key repeats after a restart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Literal

import numpy as np

from agent.frames import Frame
from agent.outcomes import Outcome, Prediction
from model.regions import Defect

SCHEMA = 1
Verdict = Literal["OK", "NG", "ERROR"]
MapPolicy = Literal["all", "ng", "none"]  # which frames get an anomaly-map PNG ([redis].maps)
JsonObject = dict[str, object]  # a payload as it goes on the wire


def iso(moment: datetime) -> str:
    """ISO 8601 UTC with milliseconds and a Z, the one time format of every payload."""
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def map_key(line: str, camera: str, seq: int, run_id: str = "") -> str:
    """The Redis key of a frame's anomaly map PNG: `genclip:<line>:map:<camera>:<run id>:<seq>`
    (`...:<camera>:<seq>` for a frame made without a run id)."""
    run = f"{run_id}:" if run_id else ""
    return f"genclip:{line}:map:{camera}:{run}{seq}"


def results_stream(line: str) -> str:
    """The Redis stream every result of a line is appended to."""
    return f"genclip:{line}:results"


def reviews_stream(line: str) -> str:
    """The Redis stream operators' reviews of parts (good/defect, from the live page) are appended to."""
    return f"genclip:{line}:reviews"


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
    deadline: datetime  # when the decision window started (trigger or capture) + the line's decision window
    captured_mono: float
    defect_types: list[str]
    result: JsonObject
    map_png: bytes | None = None  # stored under result["map_key"] when not None
    error: str | None = None
    signal_reject: bool = True  # False: an uninspected part under [mqtt].reject_uninspected = false (no reject)
    run_id: str = ""  # the agent's run the frame was taken in (agent/identity.py)
    trigger: int | None = None  # the camera's trigger counter for this part (None: not triggered over MQTT)
    deadline_mono: float | None = None  # `deadline` on the monotonic clock

    @property
    def rejects(self) -> bool:
        """NG parts are rejected; so are parts that could not be inspected (unless `signal_reject` is off)."""
        return self.verdict != "OK" and self.signal_reject

    @property
    def stored_map_key(self) -> str:
        """Where the map PNG is stored: the result's `map_key`, else the frame's usual key."""
        key = self.result.get("map_key")
        return key if isinstance(key, str) and key else map_key(self.line, self.camera, self.seq, self.run_id)

    def reject_payload(self) -> JsonObject:
        return {
            "schema": SCHEMA,
            "line": self.line,
            "camera": self.camera,
            "part_id": self.part_id,
            "seq": self.seq,
            "run_id": self.run_id,
            "trigger": self.trigger,
            "captured_at": iso(self.captured_at),
            "deadline": iso(self.deadline),
            "verdict": self.verdict,
            "score": self.score,
            "defect_types": self.defect_types,
            **self.error_fields(),
        }

    def decision_payload(self) -> JsonObject:
        return {**self.reject_payload(), "reject": self.rejects}

    def error_fields(self) -> JsonObject:
        """`{"error": why}` for an ERROR part (added to its reject and decision), else nothing."""
        return {"error": self.error} if self.verdict == "ERROR" and self.error is not None else {}


def encode_map_png(anomaly_map: np.ndarray, size: int | None = None) -> bytes:
    """An anomaly map [S, S] in [0, 1] as an 8-bit gray PNG (0 = normal, 255 = most anomalous)."""
    import cv2

    values = np.asarray(anomaly_map, dtype=np.float32)
    if size is not None and values.shape != (size, size):
        values = cv2.resize(values, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32)
    ok, png = cv2.imencode(".png", np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if not ok:
        raise ValueError("PNG encoding of the anomaly map failed")
    return png.tobytes()


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def defect_json(defect: Defect) -> JsonObject:
    """One defect region as published: type, its probability, peak score, area and box in frame pixels."""
    return {
        "type": defect.type,
        "type_probability": _finite(defect.type_probability),
        "score": _finite(defect.score),
        "area_px": int(defect.area),
        "bbox": [int(v) for v in defect.bbox],
    }


def decision_deadline(frame: Frame, window_s: float) -> tuple[datetime, float]:
    """The part's deadline (wall, monotonic): its trigger's arrival, else its capture, plus the window."""
    start_at, start_mono = frame.decided_from
    return start_at + timedelta(seconds=window_s), start_mono + window_s


def _inspection(
    frame: Frame,
    line: str,
    deadline: tuple[datetime, float],
    verdict: Verdict,
    score: float | None,
    defect_types: list[str],
    result: JsonObject,
    map_png: bytes | None = None,
    error: str | None = None,
) -> Inspection:
    return Inspection(
        line=line,
        camera=frame.camera,
        seq=frame.seq,
        part_id=frame.part_id,
        product_class=frame.product_class,
        verdict=verdict,
        score=score,
        captured_at=frame.captured_at,
        deadline=deadline[0],
        deadline_mono=deadline[1],
        captured_mono=frame.captured_mono,
        defect_types=defect_types,
        result=result,
        map_png=map_png,
        error=error,
        run_id=frame.run_id,
        trigger=frame.trigger.count if frame.trigger is not None else None,
    )


def _part_fields(frame: Frame, line: str, model: Mapping[str, str], now: datetime | None) -> JsonObject:
    """The fields every result payload starts with: which part, when, by which model."""
    published = now or datetime.now(UTC)
    return {
        "schema": SCHEMA,
        "line": line,
        "camera": frame.camera,
        "seq": frame.seq,
        "run_id": frame.run_id,
        "part_id": frame.part_id,
        "trigger": frame.trigger.count if frame.trigger is not None else None,
        "missed_triggers": frame.missed_triggers,
        "camera_frame_id": frame.camera_frame_id,
        "camera_timestamp": frame.camera_timestamp,
        "product_class": frame.product_class,
        "captured_at": iso(frame.captured_at),
        "published_at": iso(published),
        "latency_ms": round((time.monotonic() - frame.captured_mono) * 1000.0, 2),
        "model": dict(model),
    }


def build_inspection(
    frame: Frame,
    outcome: Outcome,
    *,
    line: str,
    window_s: float,
    maps: MapPolicy,
    map_size: int | None,
    model: Mapping[str, str],
    now: datetime | None = None,
) -> Inspection:
    """The Inspection of one frame from its outcome (a Prediction, a FrameError or a BatchFailure)."""
    base = _part_fields(frame, line, model, now)
    deadline = decision_deadline(frame, window_s)

    if not isinstance(outcome, Prediction):
        result: JsonObject = {
            **base,
            "score": None,
            "threshold": None,
            "threshold_source": None,
            "verdict": "ERROR",
            "error": outcome.reason,
            "defects": [],
            "map_key": None,
        }
        return _inspection(frame, line, deadline, "ERROR", None, ["inspection-error"], result, error=outcome.reason)
    verdict: Verdict = "NG" if outcome.is_anomalous else "OK"
    store_map = maps == "all" or (maps == "ng" and verdict == "NG")
    result = {
        **base,
        "score": _finite(outcome.score),
        "threshold": _finite(outcome.threshold),
        "threshold_source": outcome.threshold_source,
        "verdict": verdict,
        "defects": [defect_json(d) for d in outcome.defects],
        "class_word": outcome.class_word,
        "model": {**model, "prompt_version": outcome.prompt_version},
        "map_key": map_key(line, frame.camera, frame.seq, frame.run_id) if store_map else None,
    }
    png = encode_map_png(outcome.anomaly_map, map_size) if store_map else None
    types = list(dict.fromkeys(d.type for d in outcome.defects))
    return _inspection(frame, line, deadline, verdict, _finite(outcome.score), types, result, map_png=png)


def build_uninspected(
    frame: Frame,
    reason: str,
    *,
    line: str,
    window_s: float,
    model: Mapping[str, str],
    signal_reject: bool = True,
    now: datetime | None = None,
) -> Inspection:
    """The ERROR Inspection of a frame dropped before it was inspected (`reason`: queue_full, stale, ...).

    Same payloads as an inspected ERROR part: score null, `error` "not inspected: <reason>", no map.
    With `signal_reject` False (`[mqtt].reject_uninspected = false`) it gets a decision but no reject.
    """
    why = f"not inspected: {reason}"
    result: JsonObject = {
        **_part_fields(frame, line, model, now),
        "score": None,
        "threshold": None,
        "threshold_source": None,
        "verdict": "ERROR",
        "error": why,
        "inspected": False,
        "defects": [],
        "map_key": None,
    }
    deadline = decision_deadline(frame, window_s)
    inspection = _inspection(frame, line, deadline, "ERROR", None, ["not-inspected"], result, error=why)
    return replace(inspection, signal_reject=signal_reject)
