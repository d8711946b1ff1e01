"""Helpers for the fault tests (tests/test_faults.py): crashing brokers, flaky cameras, the frame identity.

Everything here drives real processes and sockets on 127.0.0.1; nothing is mocked.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import InspectConfig
from agent.service import InspectionService
from tests.brokers import BrokerServer
from tests.factories import tiny_config


def now_utc() -> datetime:
    return datetime.now(UTC)


def parse_time(text: str) -> datetime:
    """The agent's ISO 8601 'Z' times."""
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def wait_for(condition: Callable[[], object], timeout: float, what: str, every: float = 0.05) -> float:
    """Poll until `condition()` is true; returns the seconds it took, or fails the test naming `what`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(every)
    if condition():
        return time.monotonic() - start
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- brokers --------------------------------------------------------------------------------------------------
def crash(server: BrokerServer) -> None:
    """SIGKILL the broker: nothing is flushed, clients see their connection reset."""
    server.kill()


def come_back(server: BrokerServer) -> None:
    """Start a crashed broker again on the same port (never a new one: clients reconnect to the old address)."""
    server._port_fixed = True  # BrokerServer.start() would otherwise move to a free port on a failed start
    server.start()


# --- the service ----------------------------------------------------------------------------------------------
def synthetic_camera(camera_id: str, seed: int, fps: float = 3.0, **keys: Any) -> dict[str, Any]:
    """A small synthetic camera (128x96: cheap to render and to score on two CPU cores)."""
    synthetic = {"defect_rate": 0.4, "seed": seed, "width": 128, "height": 96, **keys.pop("synthetic", {})}
    source = f"synthetic:{seed}"
    return {"id": camera_id, "source": source, "product_class": "widget", "fps": fps, "synthetic": synthetic, **keys}


def fault_config(
    mqtt_port: int,
    redis_url: str,
    line: str,
    cameras: list[dict[str, Any]],
    *,
    mqtt: dict[str, Any] | None = None,
    redis: dict[str, Any] | None = None,
    agent: dict[str, Any] | None = None,
) -> InspectConfig:
    """genclip-tiny on the CPU, fast reconnects, no anomaly maps (PNG encoding costs CPU the tests need)."""
    model = tiny_config().model_dump(exclude_none=True, by_alias=True)
    return InspectConfig(
        line={"id": line},
        model=model,
        engine={"batch_size": 4, "max_wait_ms": 20},
        cameras=cameras,
        thresholds={"widget": 0.62},
        mqtt={"port": mqtt_port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0, **(mqtt or {})},
        redis={"url": redis_url, "maps": "none", "reconnect_min_s": 0.1, "reconnect_max_s": 0.5, **(redis or {})},
        agent={"health_port": 0, "shutdown_timeout_s": 20, **(agent or {})},
    )


def assert_identity(service: InspectionService, *, stopped: bool = True) -> dict[str, Any]:
    """accepted == published + dropped (by reason) + expired + in flight; in flight 0 after a clean stop.

    Also: what the ledger accepted is what the cameras handed over (frames emitted by the sources).
    """
    snap = service.ledger.snapshot()
    counts = snap.as_dict()
    print(f"ledger {service.line}: {counts}")
    assert snap.accepted == snap.published + sum(snap.dropped.values()) + snap.expired + snap.in_flight, counts
    assert snap.in_flight >= 0, counts
    if stopped:
        assert snap.in_flight == 0, counts
        emitted = sum(source.status().frames for source in service.sources.values())
        assert snap.accepted == emitted, (counts, emitted)
    return counts


def metric(service: InspectionService, name: str, **labels: str) -> float:
    """One sample of /metrics (as rendered for Prometheus); 0 when the series does not exist."""
    text = service.metrics.render().decode()
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def camera_reasons(service: InspectionService, camera: str) -> list[str]:
    return [r for r in service.health_reasons() if r.startswith(f"camera {camera}:")]


# --- MQTT -----------------------------------------------------------------------------------------------------
class Subscriber:
    """A PLC stand-in: MQTT 5, QoS 1, persistent session (clean_start False + session expiry), fast reconnects.

    Keeps every message with its arrival time; `connected` follows the connection.
    """

    def __init__(self, port: int, topics: list[str], client_id: str, persistent: bool = True) -> None:
        self.topics = topics
        self.messages: list[tuple[str, Any, float]] = []
        self.connects = 0
        self.connected = threading.Event()
        self.lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *_: self.connected.clear()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.05, 0.2)  # back before the agent (0.2-1 s): little queues in the broker
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600 if persistent else 0
        self.client.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            return
        for topic in self.topics:
            client.subscribe(topic, qos=1)
        self.connects += 1
        self.connected.set()

    def _on_message(self, _c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        try:
            payload: Any = json.loads(message.payload)
        except ValueError:
            payload = message.payload.decode()
        with self.lock:
            self.messages.append((message.topic, payload, time.monotonic()))

    def of(self, suffix: str) -> list[Any]:
        with self.lock:
            return [p for t, p, _ in self.messages if t.endswith(suffix)]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def retained(port: int, topic: str, timeout: float = 5.0) -> Any:
    """The retained message a fresh subscriber gets on `topic` (None if there is none within `timeout`)."""
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: Any, _u: Any, message: mqtt.MQTTMessage) -> None:
        if message.retain:
            got.append(message.payload)
            done.set()

    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        client.loop_stop()
        client.disconnect()
    return got[-1].decode() if got else None


def duplicates(values: list[str]) -> dict[str, int]:
    return {k: n for k, n in Counter(values).items() if n > 1}


# --- cameras --------------------------------------------------------------------------------------------------
def write_video(path: Path, frames: int = 6, value: int = 60, size: tuple[int, int] = (64, 48)) -> Path:
    """An MJPG .avi, written next to `path` and renamed into place (as a recorder would publish it)."""
    staging = path.with_name(f"staging-{path.name}")
    writer = cv2.VideoWriter(str(staging), cv2.VideoWriter_fourcc(*"MJPG"), 25, size)
    assert writer.isOpened()
    for i in range(frames):
        writer.write(np.full((size[1], size[0], 3), (value + 10 * i) % 250, np.uint8))
    writer.release()
    staging.replace(path)
    return path


class MjpegCamera:
    """An IP camera on 127.0.0.1: multipart/x-mixed-replace JPEG frames at ~`fps`.

    `stall()` keeps every connection open but silent; `go_down()` closes the listening socket and
    every stream (a rebooting camera: connections are refused); `resume()` brings it back on the same port.
    """

    def __init__(self, fps: float = 20.0) -> None:
        self.period = 1.0 / fps
        self.stalled = threading.Event()
        self.generation = 0
        self.served = 0
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self._serve()
        self.url = f"http://127.0.0.1:{self.port}/video.mjpg"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                generation = camera.generation
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                value = 0
                try:
                    while camera.generation == generation:
                        if camera.stalled.is_set():
                            time.sleep(0.02)
                            continue
                        image = np.full((48, 64, 3), value % 250, np.uint8)
                        jpeg = cv2.imencode(".jpg", image)[1].tobytes()
                        head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                        self.wfile.write(head.encode() + jpeg + b"\r\n")
                        self.wfile.flush()
                        camera.served += 1
                        value += 1
                        time.sleep(camera.period)
                except OSError:
                    pass  # the client went away

        return Handler

    def _serve(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        server.daemon_threads = True
        self.port = server.server_address[1]
        self.server = server
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()

    def stall(self) -> None:
        self.stalled.set()

    def go_down(self) -> None:
        self.generation += 1  # open streams end
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def resume(self) -> None:
        self.stalled.clear()
        if self.server is None:
            self._serve()

    def close(self) -> None:
        self.go_down()
