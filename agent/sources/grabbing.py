"""The capture loop every GenICam camera shares (kinds pylon and genicam), over a `Device` of either library.

Each start (and each reconnect) opens the camera named by `source` (serial number or user-defined name),
sets it up (agent/sources/genicam_setup.py) and grabs:
- free-run and triggered by the camera (a hardware line): every frame the camera delivers is a part, bound
  to nothing; a free-run camera silent for `stall_timeout_s` is lost (reconnected); a hardware-triggered one
  is waiting for its trigger, never stalled.
- triggered over MQTT: for each trigger, in order, frames left over from earlier triggers are discarded, the
  camera's TriggerSoftware is executed and the next frame is bound to the trigger; no frame by the trigger's
  `trigger_timeout_ms`: a missed trigger (answered ERROR, counted).
Every frame carries the camera's frame id (GigE Vision block id, USB3 Vision frame id) and timestamp into
the result (`camera_frame_id`, `camera_timestamp`). A frame the camera delivers broken (a failed grab, an
incomplete buffer) is counted (`grab_errors`, genclip_grab_errors_total) and its part answered ERROR with the
camera's reason; `genicam.error_limit` of them in a row, or the device gone (unplugged, powered off, its link
lost), close the camera and open it again with the sources' backoff. The state and reason are in /health
and the info message like any source's; `device()` names the camera in use.
"""

from __future__ import annotations

import threading
import time
from abc import abstractmethod
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar, Literal, Protocol

import numpy as np

from agent.sources.base import NO_PICTURE, TRIGGER_POLL_S, Emit, FrameSource, SourceError
from agent.sources.config import CameraConfig
from agent.sources.genicam_setup import Features, configure
from agent.sources.pixels import PixelFormatError, to_engine_image
from agent.triggers import Trigger, TriggerQueue

GRAB_POLL_S = 0.1  # how long one wait for a frame lasts before stop, removal and stalls are looked at
GrabError = Literal["failed", "incomplete"]


@dataclass(frozen=True, slots=True)
class Grab:
    """One buffer from the camera: its pixels (HxW or HxWxC, as the pixel format lays them out) or why not."""

    data: np.ndarray | None
    pixel_format: str
    frame_id: int | None
    timestamp: int | None
    grabbed: tuple[datetime, float]  # wall, monotonic: when the buffer came to the agent
    error: str | None = None
    error_kind: GrabError = "failed"


def grabbed_now() -> tuple[datetime, float]:
    return datetime.now(UTC), time.monotonic()


class Device(Protocol):
    """An open camera of one library (pypylon, harvesters), set up and ready to start."""

    features: Features
    name: str  # vendor, model, serial: for logs and the info message

    def start(self, *, newest_only: bool) -> None:
        """Start acquisition; `newest_only`: keep only the newest frame when the agent falls behind."""
        ...

    def grab(self, timeout_s: float) -> Grab | None:
        """The next buffer, waiting up to `timeout_s`; None when none came."""
        ...

    def software_trigger(self) -> None:
        """Execute TriggerSoftware (once the camera is ready for a trigger)."""
        ...

    def removed(self) -> bool:
        """Whether the library saw the device go (unplugged, powered off, its link lost)."""
        ...

    def close(self) -> None:
        """Stop acquisition and release the camera (never raises)."""
        ...


class GenICamSource(FrameSource):
    """A GenICam camera's capture thread; subclasses open the `Device` of their library."""

    watch_stalls: ClassVar[bool] = True

    def __init__(self, camera: CameraConfig, emit: Emit, *, line_id: str = "", run_id: str | None = None) -> None:
        super().__init__(camera, emit, line_id=line_id, run_id=run_id)
        self._grab_errors: Counter[str] = Counter()
        self._in_a_row = 0
        self._device_name: str | None = None
        self._pixel_format = ""
        self._counts_lock = threading.Lock()
        self.device_in_use: Device | None = None  # the open camera (tests and benchmarks drive its features)

    # --- for the service ------------------------------------------------------------------------------
    def grab_errors(self) -> dict[str, int]:
        with self._counts_lock:
            return {kind: self._grab_errors[kind] for kind in ("failed", "incomplete")}

    def device(self) -> str | None:
        return self._device_name

    # --- for subclasses -------------------------------------------------------------------------------
    @abstractmethod
    def _open_device(self) -> Device:
        """Find the camera named by `source` and open it; SourceError when it is not there or busy."""

    # --- the loop -------------------------------------------------------------------------------------
    def _run(self) -> None:
        first = self.status().state == "starting"
        self._set_state("starting" if first else "reconnecting", f"opening camera {self.camera.source}")
        device = self._open_device()
        self.device_in_use = device
        try:
            self._device_name = device.name
            self._pixel_format = configure(device.features, self.camera)
            device.start(newest_only=self.camera.acquisition == "free-run")
            self._in_a_row = 0
            self.log.info("camera open", device=device.name, pixel_format=self._pixel_format)
            self._set_state("running")
            if self.triggers is not None:
                self._serve_triggers(device, self.triggers)
            else:
                self._take_frames(device)
        finally:
            self.device_in_use = None
            device.close()

    def _take_frames(self, device: Device) -> None:
        """Free-run or hardware-triggered: every frame the camera delivers is a part."""
        last = time.monotonic()
        while not self._stopping.is_set():
            grab = device.grab(GRAB_POLL_S)
            if grab is None:
                self._check_present(device)
                quiet = time.monotonic() - last
                if not self.self_triggered and quiet > self.camera.stall_timeout_s:
                    raise SourceError(f"no frame for {quiet:.1f} s")
                continue
            last = time.monotonic()
            self._deliver(grab, None)

    def _serve_triggers(self, device: Device, triggers: TriggerQueue) -> None:
        """Triggered over MQTT: one TriggerSoftware per trigger, its frame bound to it, in trigger order."""
        timeout_s = self.camera.trigger_timeout_ms / 1000.0
        while not self._stopping.is_set():
            self._answer_overdue()
            trigger = triggers.next(TRIGGER_POLL_S)
            if trigger is None:
                self._check_present(device)
                continue
            self._discard_leftovers(device)
            try:
                device.software_trigger()
            except Exception as exc:
                self._unanswered(trigger, f"missed trigger: TriggerSoftware failed: {exc}")
                raise
            left = trigger.received_mono + timeout_s - time.monotonic()
            grab = device.grab(max(left, GRAB_POLL_S))
            if grab is None:
                limit = f"{self.camera.trigger_timeout_ms:g} ms"
                self._unanswered(trigger, f"missed trigger: no frame within {limit} after TriggerSoftware")
                self._check_present(device)
                continue
            self._deliver(grab, trigger)

    def _deliver(self, grab: Grab, trigger: Trigger | None) -> None:
        """Emit a good frame; count a broken one and answer its part ERROR (lost after `error_limit` in a row)."""
        self._heartbeat()
        image: np.ndarray | None = None
        error = grab.error
        if error is None and grab.data is not None:
            try:
                image = to_engine_image(grab.data, grab.pixel_format or self._pixel_format)
            except PixelFormatError as exc:
                error = str(exc)
        seq = trigger.count if trigger is not None else None
        part = trigger.part_id if trigger is not None else None
        ids = (grab.frame_id, grab.timestamp)
        if image is not None:
            self._in_a_row = 0
            self.backoff.reset()
            self._emit_frame(image, part, seq, trigger=trigger, captured=grab.grabbed, camera_frame=ids)
            return
        reason = error or "the camera delivered an empty buffer"
        with self._counts_lock:
            self._grab_errors[grab.error_kind] += 1
        self._in_a_row += 1
        self.log.warning("grab error", kind=grab.error_kind, error=reason, frame_id=grab.frame_id, part=part)
        error = f"grab {grab.error_kind}: {reason}"
        self._emit_frame(NO_PICTURE, part, seq, error=error, trigger=trigger, captured=grab.grabbed, camera_frame=ids)
        if self._in_a_row >= self.camera.genicam.error_limit:
            raise SourceError(f"{self._in_a_row} grabs failed in a row, the last: {reason}")

    def _discard_leftovers(self, device: Device) -> None:
        """Frames still queued from earlier (a trigger answered as missed, then its frame came late)."""
        while (grab := device.grab(0.0)) is not None:
            self.log.warning("late frame discarded: its trigger was answered already", frame_id=grab.frame_id)

    def _unanswered(self, trigger: Trigger, why: str) -> None:
        assert self.triggers is not None
        self.triggers.missed_one()
        self._answer_missed(trigger, why)

    @staticmethod
    def _check_present(device: Device) -> None:
        if device.removed():
            raise SourceError("camera removed (unplugged, powered off, or its link lost)")
