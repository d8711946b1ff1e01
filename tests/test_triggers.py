"""Triggered acquisition (agent/triggers.py): trigger payloads, the trigger queue, triggered cameras, and the
agent taking PLC triggers over real Mosquitto and Redis: one decision per trigger, with its part id and counter."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from pydantic import ValidationError

from agent.frames import Frame
from agent.service import InspectionService
from agent.sources import CameraConfig, open_source
from agent.triggers import MAX_WAITING, TriggerQueue, TriggerRefusedError, parse_trigger
from tests.faults_support import Subscriber, assert_identity, fault_config, metric, synthetic_camera, wait_for
from tests.source_fixtures import Collector, stop_promptly, wait_until


# --- payloads and the queue -----------------------------------------------------------------------------------
def test_trigger_payloads_json_text_or_empty():
    assert parse_trigger(b'{"part_id": "P-1042"}') == "P-1042"
    assert parse_trigger(b"P-1042\n") == "P-1042"
    assert parse_trigger(b"") is None and parse_trigger(b"{}") is None and parse_trigger(b'{"part_id": null}') is None
    for bad, reason in [
        (b'{"part_id": 7}', "malformed"),
        (b'{"part_id": "a", "x": 1}', "malformed"),
        (b"{not json", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b"P" * 129, "bad_part_id"),
        (b'{"part_id": "a\\u0007b"}', "bad_part_id"),
    ]:
        with pytest.raises(TriggerRefusedError) as caught:
            parse_trigger(bad)
        assert caught.value.reason == reason, bad


def made(count: int) -> str:
    return f"cam-1-run-{count}"


def test_queue_numbers_triggers_and_names_parts_the_plc_did_not():
    queue = TriggerQueue(timeout_s=0.2)
    heard: list[str] = []
    first = queue.accept("P-1", made, lambda t: heard.append(t.part_id))
    second = queue.accept(None, made)
    assert (first.count, first.part_id) == (1, "P-1") and (second.count, second.part_id) == (2, "cam-1-run-2")
    assert heard == ["P-1"]
    with pytest.raises(TriggerRefusedError) as repeated:
        queue.accept("P-1", made)  # QoS 1 delivered it twice: one part
    assert repeated.value.reason == "repeated" and queue.count == 2
    assert queue.next(0.0) == first and queue.take_before(second.received_mono - 1) is None
    assert queue.take_before(time.monotonic()) == second and queue.next(0.01) is None


def test_queue_answers_overdue_triggers_and_refuses_beyond_its_bound_and_after_close():
    queue = TriggerQueue(timeout_s=0.05)
    for n in range(MAX_WAITING):
        queue.accept(f"P-{n}", made)
    with pytest.raises(TriggerRefusedError) as full:
        queue.accept("P-x", made)
    assert full.value.reason == "queue_full"
    assert queue.overdue(time.monotonic()) == []
    late = queue.overdue(time.monotonic() + 0.06)
    assert [t.part_id for t in late] == [f"P-{n}" for n in range(MAX_WAITING)]
    assert queue.counts() == (MAX_WAITING, MAX_WAITING)
    queue.accept("P-y", made)
    assert [t.part_id for t in queue.close()] == ["P-y"]
    with pytest.raises(TriggerRefusedError) as closed:
        queue.accept("P-z", made)
    assert closed.value.reason == "stopping"


def test_a_folder_camera_cannot_be_triggered_and_triggered_keys_are_checked(tmp_path):
    with pytest.raises(ValidationError, match="triggered by its files"):
        CameraConfig(id="f", source=str(tmp_path), kind="folder", product_class="w", acquisition="triggered")
    with pytest.raises(ValidationError, match="acquisition"):
        CameraConfig(id="c", source="synthetic:a", product_class="w", acquisition="on-demand")
    cam = CameraConfig(id="c", source="synthetic:a", product_class="w", acquisition="triggered")
    assert cam.mqtt_triggered and cam.trigger == "mqtt" and cam.trigger_timeout_ms == 1000


# --- a triggered synthetic camera -----------------------------------------------------------------------------
def triggered_camera(**keys: object) -> CameraConfig:
    synthetic = {"width": 64, "height": 48, "defect_rate": 0.5, **keys.pop("synthetic", {})}  # type: ignore[dict-item]
    return CameraConfig(
        id="cam-1",
        source="synthetic:t",
        product_class="widget",
        acquisition="triggered",
        synthetic=synthetic,
        **keys,  # type: ignore[arg-type]
    )


def test_one_frame_per_trigger_bound_to_its_part_id_missed_ones_in_their_place(tmp_path):
    truth = tmp_path / "truth.jsonl"
    emit = Collector()
    source = open_source(
        triggered_camera(synthetic={"withhold_every": 3, "ground_truth": str(truth)}), emit, run_id="r1"
    )
    source.start()
    try:
        assert wait_until(lambda: source.status().state == "running", timeout=10)
        for n in range(1, 8):
            source.accept_trigger(f"P-{n}" if n != 5 else None)
        assert wait_until(lambda: len(emit) == 7, timeout=10)
        time.sleep(1.2)
        assert source.status().detail == "waiting for trigger" and source.status().healthy
    finally:
        stop_promptly(source)
    frames = emit.snapshot()
    assert [f.part_id for f in frames] == ["P-1", "P-2", "P-3", "P-4", "cam-1-r1-5", "P-6", "P-7"]
    assert [f.seq for f in frames] == [f.trigger.count for f in frames if f.trigger] == list(range(1, 8))
    missed = [f.part_id for f in frames if f.not_inspected]
    assert missed == ["P-3", "P-6"] and all(f.answer_only for f in frames if f.not_inspected)
    assert [f.missed_triggers for f in frames] == [0, 0, 1, 1, 1, 2, 2]
    assert source.triggers is not None and source.triggers.counts() == (7, 2)
    records = [json.loads(line) for line in truth.read_text().splitlines()]
    assert [(r["part_id"], r["withheld"]) for r in records if r["withheld"]] == [("P-3", True), ("P-6", True)]
    assert len(records) == 7


def test_triggers_that_wait_too_long_are_answered_missed_in_order_and_the_rest_at_stop():
    """The first frame's hand-over blocks 1 s (a full pipeline): the triggers behind it time out (200 ms)."""
    release = threading.Event()
    emit = Collector()

    def slow(frame: Frame) -> None:
        if frame.seq == 1:
            release.wait(1.0)
        emit(frame)

    source = open_source(triggered_camera(trigger_timeout_ms=200), slow, run_id="r1")
    source.start()
    try:
        assert wait_until(lambda: source.status().state == "running", timeout=10)
        for n in range(1, 5):
            source.accept_trigger(f"P-{n}")
        assert wait_until(lambda: len(emit) == 4, timeout=10)
        source.accept_trigger("P-5")
        source.accept_trigger("P-6")
        source.request_stop()  # P-5 may still be taken; what waits at the stop is answered "shutdown"
    finally:
        stop_promptly(source)
    frames = emit.snapshot()
    assert [f.part_id for f in frames] == [f"P-{n}" for n in range(1, 7)]
    assert frames[0].not_inspected is None
    assert [f.not_inspected for f in frames[1:4]] == ["missed trigger: no frame within 200 ms"] * 3
    assert frames[5].not_inspected in (None, "shutdown")


def test_a_free_run_camera_refuses_triggers():
    source = open_source(CameraConfig(id="cam-1", source="synthetic:f", product_class="w"), Collector())
    with pytest.raises(TriggerRefusedError) as refused:
        source.accept_trigger("P-1")
    assert refused.value.reason == "not_triggered" and "free-run" in str(refused.value)


# --- the agent, with real brokers -----------------------------------------------------------------------------
class Plc:
    """Publishes triggers (QoS 1) like a PLC."""

    def __init__(self, port: int, line: str) -> None:
        self.line = line
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, f"trig-{line}", protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def trigger(self, camera: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(f"genclip/{self.line}/{camera}/trigger", payload, qos=1, retain=retain).wait_for_publish(5)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_the_agent_answers_every_mqtt_trigger_once_in_order_and_refuses_bad_ones(mosquitto, redis_server):
    line = "trig"
    cameras = [
        synthetic_camera("cam-1", 1, acquisition="triggered", queue_size=16, synthetic={"withhold_every": 4}),
        synthetic_camera("cam-2", 2, fps=2),
    ]
    cfg = fault_config(mosquitto.port, redis_server.url, line, cameras, mqtt={"decision_window_ms": 60_000})
    watcher = Subscriber(mosquitto.port, [f"genclip/{line}/cam-1/#"], f"plc-watch-{line}")
    service = InspectionService(cfg)
    plc = Plc(mosquitto.port, line)
    try:
        plc.trigger("cam-1", b"P-retained", retain=True)  # left on the broker: it comes at the agent's subscribe
        service.start()
        for n in range(1, 13):
            plc.trigger("cam-1", json.dumps({"part_id": f"P-{n:04d}"}).encode())
        plc.trigger("cam-1", b"P-0001")  # a repeat of an accepted part id
        plc.trigger("cam-1", b'{"part_id": 12}')  # malformed
        plc.trigger("cam-2", b"P-free")  # a free-run camera
        plc.trigger("cam-9", b"P-nowhere")
        wait_for(lambda: len(watcher.of("/decision")) >= 12, 60, "12 decisions")
        info = service.info()
    finally:
        plc.client.publish(f"genclip/{line}/cam-1/trigger", b"", qos=1, retain=True).wait_for_publish(5)
        plc.close()
        service.shutdown()
    time.sleep(0.3)
    watcher.close()
    decisions = watcher.of("/decision")
    assert [(d["part_id"], d["trigger"], d["seq"]) for d in decisions] == [(f"P-{n:04d}", n, n) for n in range(1, 13)]
    missed = [d["part_id"] for d in decisions if d["verdict"] == "ERROR"]
    assert missed == ["P-0004", "P-0008", "P-0012"]
    assert all(d["reject"] and d["error"].startswith("not inspected: missed trigger") for d in decisions[3::4])
    results = watcher.of("/result")
    assert [r["missed_triggers"] for r in results][-1] == 3 and all(r["trigger"] for r in results)
    for d in decisions:  # the deadline starts at the trigger, before the capture
        assert d["deadline"] > d["captured_at"]
    refused = {
        reason: metric(service, "genclip_triggers_refused_total", reason=reason)
        for reason in ("repeated", "malformed", "retained", "not_triggered", "unknown_camera")
    }
    assert refused == dict.fromkeys(refused, 1.0), refused
    assert metric(service, "genclip_triggers_total", camera="cam-1") == 12
    assert metric(service, "genclip_triggers_missed_total", camera="cam-1") == 3
    cam1 = next(c for c in info["cameras"] if c["id"] == "cam-1")  # type: ignore[union-attr]
    assert (cam1["acquisition"], cam1["trigger"], cam1["triggers"], cam1["missed_triggers"]) == (
        "triggered",
        "mqtt",
        12,
        3,
    )
    cam2 = next(c for c in info["cameras"] if c["id"] == "cam-2")  # type: ignore[union-attr]
    assert cam2["acquisition"] == "free-run" and cam2["triggers"] is None
    assert_identity(service)


def test_no_picture_frames_keep_their_place_between_scored_ones():
    """A batch mixing pictures and missed triggers: outcomes come back in the frames' order."""
    from agent.worker import LaunchedBatch

    class Scored:
        seconds = 0.01

        def wait(self) -> None:
            pass

        def outcomes(self) -> list[str]:
            return ["scored-1", "scored-2"]

    def frame(seq: int, not_inspected: str | None = None) -> Frame:
        return Frame("c", seq, f"P-{seq}", "w", np.zeros((2, 2), np.uint8), not_inspected=not_inspected)

    frames = [frame(1, "missed trigger: x"), frame(2), frame(3, "missed trigger: y"), frame(4)]
    outcomes = LaunchedBatch(frames, Scored()).outcomes()  # type: ignore[arg-type]
    assert [getattr(o, "reason", o) for o in outcomes] == [
        "missed trigger: x",
        "scored-1",
        "missed trigger: y",
        "scored-2",
    ]


# --- OpenCV cameras, triggered --------------------------------------------------------------------------------
def opencv_camera(source: str, **keys: object) -> CameraConfig:
    keys = {"stall_timeout_s": 2.0, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2, **keys}
    return CameraConfig(id="cam", source=source, product_class="widget", acquisition="triggered", **keys)  # type: ignore[arg-type]


def test_a_video_file_triggered_over_mqtt_gives_one_frame_per_trigger(video_file):
    emit = Collector()
    source = open_source(opencv_camera(str(video_file), stall_timeout_s=0.5), emit)
    source.start()
    try:
        assert wait_until(lambda: source.status().state == "running", timeout=5)  # opened, waiting: healthy
        time.sleep(1.2)  # longer than stall_timeout_s: waiting for a trigger is not a stall
        assert len(emit) == 0  # nothing is read without a trigger
        assert source.status().detail == "waiting for trigger" and source.status().healthy
        triggers = [source.accept_trigger(f"P-{n}") for n in range(1, 4)]
        assert wait_until(lambda: len(emit) == 3, timeout=5)
        time.sleep(0.3)
        assert len(emit) == 3
    finally:
        stop_promptly(source)
    frames = emit.snapshot()
    assert [(f.part_id, f.seq) for f in frames] == [("P-1", 1), ("P-2", 2), ("P-3", 3)]
    assert [round(float(f.image.mean()) / 20) for f in frames] == [0, 1, 2]  # the file's frames, in order
    for frame, trigger in zip(frames, triggers, strict=True):
        assert frame.trigger == trigger and frame.captured_mono >= trigger.received_mono
        assert frame.decided_from == (trigger.received_at, trigger.received_mono)


def test_a_self_triggered_camera_takes_every_frame_unpaced(video_file):
    emit = Collector()
    source = open_source(opencv_camera(str(video_file), trigger="camera", fps=1), emit)
    source.start()
    try:
        assert wait_until(lambda: source.status().state == "ended", timeout=5)  # 12 frames at fps 1 would take 12 s
    finally:
        stop_promptly(source)
    frames = emit.snapshot()
    assert [f.seq for f in frames] == list(range(1, 13)) and all(f.trigger is None for f in frames)
    with pytest.raises(TriggerRefusedError, match="triggers itself"):
        source.accept_trigger("P-1")


def test_a_stream_triggered_over_mqtt_binds_the_first_frame_after_each_trigger():
    from tests.test_source_capture import MjpegCamera

    stream = MjpegCamera()  # ~50 frames/s
    emit = Collector()
    source = open_source(opencv_camera(stream.url, trigger_timeout_ms=2000), emit)
    source.start()
    try:
        assert wait_until(lambda: source.status().state == "running", timeout=10)
        time.sleep(0.3)
        assert len(emit) == 0  # the stream is drained, no frame is a part without a trigger
        triggers = []
        for n in range(1, 6):
            triggers.append(source.accept_trigger(f"P-{n}"))
            time.sleep(0.1)
        assert wait_until(lambda: len(emit) == 5, timeout=5)
        time.sleep(0.3)
        assert len(emit) == 5 and source.status().state == "running"
    finally:
        stop_promptly(source)
        stream.close()
    frames = emit.snapshot()
    assert [f.part_id for f in frames] == [f"P-{n}" for n in range(1, 6)]
    for frame, trigger in zip(frames, triggers, strict=True):
        assert 0 <= frame.captured_mono - trigger.received_mono < 1.0, frame.captured_mono - trigger.received_mono


@pytest.fixture(scope="module")
def video_file(tmp_path_factory: pytest.TempPathFactory):
    """An MJPG .avi of 12 frames; frame i is grey level 20 * i."""
    import cv2

    path = tmp_path_factory.mktemp("video") / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    for i in range(12):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    return path
