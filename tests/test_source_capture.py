"""The OpenCV source: video files (end, loop, pacing) and an HTTP MJPEG stream that stalls and comes back."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.sources import CameraConfig, open_source
from agent.sources.base import SourceError
from agent.sources.capture import OpenCvSource, open_failure
from tests.source_fixtures import Collector, stop_promptly, wait_until

FRAMES = 12


def camera(source: str, **keys) -> CameraConfig:
    keys = {"fps": 200, "stall_timeout_s": 0.5, "reconnect_min_s": 0.05, "reconnect_max_s": 0.2, **keys}
    return CameraConfig(id="cam", source=source, product_class="widget", **keys)


def start(cam: CameraConfig, emit: Collector) -> OpenCvSource:
    source = open_source(cam, emit)
    assert isinstance(source, OpenCvSource)
    source.start()
    return source


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    """An MJPG .avi of FRAMES frames; frame i is grey level 20 * i."""
    path = tmp_path_factory.mktemp("video") / "line.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (64, 48))
    assert writer.isOpened()
    for i in range(FRAMES):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    return path


def test_video_file_plays_once_and_ends(video):
    emit = Collector()
    source = start(camera(str(video)), emit)
    assert wait_until(lambda: source.status().state == "ended")
    frames = emit.snapshot()
    assert [f.seq for f in frames] == list(range(1, FRAMES + 1))
    assert [f.part_id for f in frames[:2]] == [f"cam-{source.run_id}-1", f"cam-{source.run_id}-2"]
    assert [round(float(f.image.mean()) / 20) for f in frames] == list(range(FRAMES))
    status = source.status()
    assert status.healthy and status.frames == FRAMES and status.detail == "end of video file"
    assert wait_until(lambda: not source.alive)
    stop_promptly(source)


def test_video_file_loops_and_is_paced_at_fps(video):
    emit = Collector()
    source = start(camera(str(video), fps=40, loop=True), emit)
    try:
        assert wait_until(lambda: len(emit) >= FRAMES + 3)
        began = time.monotonic()
        count = len(emit)
        time.sleep(0.5)
        rate = (len(emit) - count) / (time.monotonic() - began)
        assert 30 <= rate <= 48, rate
        frames = emit.snapshot()
        assert [f.seq for f in frames] == list(range(1, len(frames) + 1))
        assert round(float(frames[FRAMES].image.mean()) / 20) == 0  # back at the first frame
        assert source.status().state == "running"
    finally:
        stop_promptly(source)


def test_a_source_that_cannot_open_keeps_retrying(tmp_path):
    emit = Collector()
    source = start(camera(str(tmp_path / "missing.avi")), emit)
    try:
        assert wait_until(lambda: source.status().errors >= 3)
        status = source.status()
        assert status.state == "reconnecting" and "cannot open" in status.detail and not status.healthy
    finally:
        stop_promptly(source)


def test_a_missing_file_a_file_that_is_no_video_and_a_device_say_which_they_are(tmp_path):
    """Not one 'cannot open X' for all: the state detail says file not found, no video, or which device/stream."""
    garbage = tmp_path / "notes.avi"
    garbage.write_bytes(b"\x00not a video\xff" * 500)
    (tmp_path / "frames").mkdir()
    expected = {
        str(tmp_path / "missing.avi"): "file not found",
        str(garbage): "OpenCV cannot open this file as a video (not a video, or a codec this OpenCV build lacks)",
        str(tmp_path / "frames"): "is a folder, not a video file",
    }
    for path, why in expected.items():
        source = open_source(camera(path, kind="opencv"), Collector())
        assert isinstance(source, OpenCvSource)
        with pytest.raises(SourceError) as caught:
            source._open()
        assert str(caught.value).startswith(f"cannot open {path}: {why}"), caught.value
    assert open_failure(camera("/dev/video-nope")) == (
        "cannot open device /dev/video-nope: not found (not plugged in, or another name)"
    )
    assert open_failure(camera("7")).startswith("cannot open device 7: not connected, in use")
    assert open_failure(camera("rtsp://10.0.0.9/cam")).startswith("cannot open stream rtsp://10.0.0.9/cam: unreachable")
    emit = Collector()
    source = start(camera(str(garbage)), emit)
    try:
        assert wait_until(lambda: "retry in" in source.status().detail)
        assert source.status().detail.startswith(f"cannot open {garbage}: OpenCV cannot open this file as a video")
    finally:
        stop_promptly(source)


def test_an_emit_that_raises_does_not_stop_capture(video):
    emit = Collector(fail=lambda frame: frame.seq % 2 == 0)
    source = start(camera(str(video), loop=True), emit)
    try:
        assert wait_until(lambda: len(emit) >= 10)
        assert source.alive and source.status().errors >= 9
        assert all(f.seq % 2 == 1 for f in emit.snapshot())
    finally:
        stop_promptly(source)


# --- an MJPEG stream over HTTP, as cheap IP cameras serve it ---------------------------------------------
class MjpegCamera:
    """multipart/x-mixed-replace JPEG parts at ~50 fps on 127.0.0.1; `stalled` holds every connection silent."""

    def __init__(self) -> None:
        self.stalled = threading.Event()
        self.closing = threading.Event()
        camera = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
                self.end_headers()
                value = 0
                try:
                    while not camera.closing.is_set():
                        if camera.stalled.is_set():
                            time.sleep(0.02)
                            continue
                        jpeg = cv2.imencode(".jpg", np.full((48, 64, 3), value % 250, np.uint8))[1].tobytes()
                        head = f"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
                        self.wfile.write(head.encode() + jpeg + b"\r\n")
                        self.wfile.flush()
                        value += 1
                        time.sleep(0.02)
                except OSError:
                    pass  # the client went away

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/video.mjpg"

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mjpeg() -> Iterator[MjpegCamera]:
    server = MjpegCamera()
    yield server
    server.close()


def test_http_stream_stall_is_reported_and_capture_resumes(mjpeg):
    emit = Collector()
    source = start(camera(mjpeg.url, fps=20), emit)
    seen: list[str] = []

    def state_is(*wanted: str) -> bool:
        state = source.status().state
        if not seen or seen[-1] != state:
            seen.append(state)
        return state in wanted

    try:
        assert wait_until(lambda: len(emit) >= 5)
        assert source.status().state == "running"
        mjpeg.stalled.set()
        assert wait_until(lambda: state_is("stalled"), timeout=3)
        before = len(emit)
        stalled_at = time.monotonic()
        while time.monotonic() - stalled_at < 1.5:  # the stall lasts: reconnects time out and back off
            state_is()
            time.sleep(0.005)
        assert "reconnecting" in seen and len(emit) == before
        status = source.status()
        assert not status.healthy and status.errors >= 2 and status.detail
        mjpeg.stalled.clear()
        assert wait_until(lambda: len(emit) >= before + 5, timeout=4)
        assert source.status().state == "running"
        frames = emit.snapshot()
        assert [f.seq for f in frames] == list(range(1, len(frames) + 1))  # numbering goes on across reconnects
    finally:
        stop_promptly(source)
