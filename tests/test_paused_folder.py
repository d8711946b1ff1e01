"""A paused folder camera takes nothing new (issue 21): a file dropped while its camera is paused is taken
only after `resume`, and its part's decision window starts then, so its reject reaches the PLC in time."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.client import CallbackAPIVersion

import agent.sources.folder as folder_module
from agent.service import InspectionService
from tests.faults_support import Subscriber, assert_identity, fault_config, parse_time, wait_for

WINDOW_MS = 2_000  # shorter than the pause: a part stamped at the drop would be past its deadline at resume
PAUSED_S = 3.0


def command(port: int, line: str, name: str) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"operator-{name}", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.publish(f"genclip/{line}/cmd/{name}", json.dumps({"camera": "grabber"}), qos=1).wait_for_publish(5)
    client.loop_stop()
    client.disconnect()


def recording_reads(monkeypatch: Any) -> list[float]:
    """Monotonic times at which the folder source read an image file."""
    reads: list[float] = []
    real: Callable[..., np.ndarray] = folder_module.read_frame

    def read_frame(path: Path, *args: Any) -> np.ndarray:
        reads.append(time.monotonic())
        return real(path, *args)

    monkeypatch.setattr(folder_module, "read_frame", read_frame)
    return reads


def test_a_file_dropped_into_a_paused_folder_waits_untouched_and_gets_its_decision_after_resume(
    tmp_path, mosquitto, redis_server, monkeypatch
):
    inbox, line = tmp_path / "inbox", "paused-folder"
    inbox.mkdir()
    camera = {"id": "grabber", "source": str(inbox), "product_class": "widget", "settle_ms": 20}  # block policy
    cfg = fault_config(mosquitto.port, redis_server.url, line, [camera], mqtt={"decision_window_ms": WINDOW_MS})
    cfg.thresholds = {"widget": 0.01}  # every inspected part is NG: the part must get a reject
    reads = recording_reads(monkeypatch)
    watcher = Subscriber(mosquitto.port, [f"genclip/{line}/#"], f"plc-{line}")
    service = InspectionService(cfg)
    service.start()
    try:
        wait_for(lambda: service.sources["grabber"].status().state == "running", 20, "the folder camera running")
        command(mosquitto.port, line, "pause")
        wait_for(lambda: service.batcher.paused() == ["grabber"], 10, "the camera paused")
        image = cv2.imencode(".png", np.random.default_rng(3).integers(0, 256, (32, 32, 3), np.uint8))[1]
        part = inbox / "part-7.png"
        part.write_bytes(image.tobytes())
        time.sleep(PAUSED_S)
        assert part.exists() and part.read_bytes() == image.tobytes()  # still there, as written
        assert service.sources["grabber"].status().frames == 0 and [p for p in inbox.iterdir() if p.is_file()] == [part]
        resumed_at, resumed_mono = datetime.now().astimezone(), time.monotonic()
        command(mosquitto.port, line, "resume")
        wait_for(lambda: watcher.of("/decision") and watcher.of("/reject"), 30, "the part's decision and reject")
        wait_for(lambda: (inbox / "done" / "part-7.png").exists(), 10, "the file done")
        time.sleep(0.5)  # a second decision would come now
    finally:
        service.shutdown()
        watcher.close()
    assert len(reads) == 1 and reads[0] >= resumed_mono  # not read while paused; read once, after the resume
    decisions, rejects = watcher.of("/decision"), watcher.of("/reject")
    assert [d["part_id"] for d in decisions] == ["part-7"] and [r["part_id"] for r in rejects] == ["part-7"]
    decision = decisions[0]
    assert decision["reject"] is True and decision["verdict"] == "NG"
    assert parse_time(decision["captured_at"]) >= resumed_at  # the decision window starts at the take
    wall = time.time() - time.monotonic()  # monotonic arrival times -> wall clock
    arrived = [wall + at for t, _p, at in watcher.messages if t.endswith(("/decision", "/reject"))]
    assert len(arrived) == 2 and max(arrived) <= parse_time(decision["deadline"]).timestamp()  # before the deadline
    sent = service.mqtt.stats.counts()
    assert (sent["reject"]["sent"], sent["reject"]["expired"], sent["decision"]["expired"]) == (1, 0, 0)
    counts = assert_identity(service)
    assert counts["expired"] == 0 and counts["dropped"] == {} and service.failsafe.answered == 0
