"""OpenCV capture: a camera index, a network stream (rtsp://, http://) or a video file.

Live streams are read as fast as they deliver (so the driver's buffer never fills with old
frames) and only every `1/fps` s a frame is decoded and emitted. Files are paced at `fps`.
Triggered cameras are not paced: triggered by the camera itself, every frame grabbed is a part;
triggered over MQTT, a live stream is drained and the first frame grabbed after a trigger is bound
to it, a file is read one frame per trigger. A frame is stamped when it is grabbed, before decoding.
A self-triggered camera whose read times out (no trigger came) is waiting, not lost; one whose read
fails at once is lost and reconnected.
FFmpeg's open and read timeouts are set to `stall_timeout_s`, so a stream that stops sending
ends `grab()` instead of hanging it; the source then reconnects with a capped backoff.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import ClassVar, Literal

import cv2

from agent.sources.base import TRIGGER_POLL_S, Emit, FrameSource, SourceError
from agent.sources.config import CameraConfig, SourceForm, video_path_problem
from agent.triggers import Trigger

Outcome = Literal["stopped", "ended", "lost"]


NOT_A_VIDEO = "OpenCV cannot open this file as a video (not a video, or a codec this OpenCV build lacks)"
CANNOT_OPEN: dict[SourceForm, str] = {
    "device": "not connected, in use by another program, or no permission",
    "stream": "unreachable, a wrong URL or credentials, or no answer within stall_timeout_s",
    "pipeline": "the GStreamer pipeline did not start (an element missing, or OpenCV built without GStreamer)",
    "sequence": "no image matches the sequence pattern",
}


def video_capture(camera: CameraConfig) -> cv2.VideoCapture:
    """`cv2.VideoCapture` on the camera's source, maybe not opened; FFmpeg gets open/read timeouts."""
    index = camera.device_index
    if index is not None:
        return cv2.VideoCapture(index)
    if cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG):
        timeout_ms = int(camera.stall_timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        return cv2.VideoCapture(camera.source, cv2.CAP_FFMPEG, params)
    return cv2.VideoCapture(camera.source)


def open_failure(camera: CameraConfig) -> str:
    """Why OpenCV could not open the camera's source: a file not found, a file that is no video (to this
    OpenCV), or a device, stream, pipeline or image sequence that cannot be opened."""
    form = camera.source_form
    if form == "path":
        return f"cannot open {camera.source}: {video_path_problem(camera.folder) or NOT_A_VIDEO}"
    if form == "device" and camera.device_index is None and not camera.folder.exists():
        return f"cannot open device {camera.source}: not found (not plugged in, or another name)"
    return f"cannot open {form} {camera.source}: {CANNOT_OPEN[form]}"


def video_problem(camera: CameraConfig) -> str | None:
    """Why the camera's video file cannot be played (not found, no video, no frame readable), None when it can;
    for `config check`. Opens the file and reads one frame."""
    problem = video_path_problem(camera.folder)
    if problem is not None:
        return problem
    capture = video_capture(camera)
    try:
        if not capture.isOpened():
            return NOT_A_VIDEO
        return None if capture.grab() else "OpenCV opens it but reads no frame (empty, cut short, or a codec it lacks)"
    finally:
        capture.release()


class OpenCvSource(FrameSource):
    """`cv2.VideoCapture` with rate limiting, stall detection, reconnects and end-of-file handling."""

    watch_stalls: ClassVar[bool] = True

    def __init__(self, camera: CameraConfig, emit: Emit, *, line_id: str = "", run_id: str | None = None) -> None:
        super().__init__(camera, emit, line_id=line_id, run_id=run_id)
        self._lost_reason = ""

    def _open(self) -> cv2.VideoCapture:
        """Open the source or raise SourceError saying which it is (see `open_failure`)."""
        capture = video_capture(self.camera)
        if not capture.isOpened():
            capture.release()
            raise SourceError(open_failure(self.camera))
        return capture

    def _run(self) -> None:
        while not self._stopping.is_set():
            first = self.status().state == "starting"
            self._set_state("starting" if first else "reconnecting", f"opening {self.camera.source}")
            capture = self._open()
            if self.camera.acquisition == "triggered":
                self._set_state("running")  # opened: it may deliver nothing until the first trigger
            try:
                outcome = self._capture(capture)
            finally:
                capture.release()
            if outcome == "stopped":
                return
            if outcome == "ended":
                if not self.camera.loop:
                    self._set_state("ended", "end of video file")
                    return
                self.log.debug("video file looped")
                continue
            self._count_error("capture lost; reconnecting", SourceError(self._lost_reason))
            stalled = self._lost_reason.startswith("no frame")
            if self._back_off("stalled" if stalled else "reconnecting", self._lost_reason):
                return

    def _capture(self, capture: cv2.VideoCapture) -> Outcome:
        """Read until stop, end of file or loss; `_lost_reason` says why it was lost."""
        live = self.camera.is_live
        period = 1.0 / self.camera.fps
        due = time.monotonic()
        got_any = False
        last_frame = time.monotonic()
        while not self._stopping.is_set():
            trigger = self._trigger_for_file() if self.triggers is not None and not live else None
            if self.triggers is not None and not live and trigger is None:
                continue  # no trigger yet (or stopping)
            started = time.monotonic()
            if not capture.grab():
                if trigger is not None:
                    self._unread(trigger)
                if self._waited_for_trigger(started):
                    continue
                quiet = time.monotonic() - last_frame
                if not live and got_any:
                    return "ended"
                if quiet >= 0.9 * self.camera.stall_timeout_s:
                    self._lost_reason = f"no frame for {quiet:.1f} s"
                else:
                    self._lost_reason = "read failed" if got_any else "opened but no frame could be read"
                return "lost"
            grabbed = (datetime.now(UTC), time.monotonic())
            last_frame = now = grabbed[1]
            self._heartbeat()
            if not got_any:
                got_any = True
                self.backoff.reset()
                self._set_state("running")
            if self.triggers is not None and live:
                self._answer_overdue()
                trigger = self.triggers.take_before(now)
                if trigger is None:
                    continue  # drain the stream; no trigger waits for this frame
            elif live and not self.self_triggered and now < due:
                continue  # drain the stream; this frame is not due yet
            ok, image = capture.retrieve()
            if not ok or image is None:
                if trigger is not None:
                    self._unread(trigger)
                self._lost_reason = "frame could not be decoded"
                return "lost"
            seq = trigger.count if trigger is not None else None
            self._emit_frame(image, trigger.part_id if trigger else None, seq, trigger=trigger, captured=grabbed)
            if self.camera.acquisition == "triggered":
                continue
            due = max(due + period, time.monotonic())  # after a long pause, do not burst to catch up
            if not live and self._wait(due - time.monotonic()):
                return "stopped"
        return "stopped"

    def _trigger_for_file(self) -> Trigger | None:
        """A file read one frame per trigger: the next trigger (answering overdue ones), None meanwhile."""
        assert self.triggers is not None
        self._answer_overdue()
        return self.triggers.next(TRIGGER_POLL_S)

    def _unread(self, trigger: Trigger) -> None:
        """A trigger whose frame could not be read: answered as missed (the next frame belongs to the next part)."""
        assert self.triggers is not None
        self.triggers.missed_one()
        self._answer_missed(trigger, "missed trigger: the camera's frame could not be read")

    def _waited_for_trigger(self, started: float) -> bool:
        """A self-triggered camera's read that timed out (it waited, no trigger came) rather than failed at once."""
        waited = time.monotonic() - started
        return self.self_triggered and waited >= min(1.0, 0.5 * self.camera.stall_timeout_s)
