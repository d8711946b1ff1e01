"""What every frame source shares: its capture thread, its status, numbering and error handling.

A source owns one daemon thread named `source-<camera id>`. Subclasses write `_run`, which
captures until `_stopping` is set; whatever it raises is logged with the camera id, counted,
and `_run` is called again after a capped exponential backoff, so bad input never ends a
source. Frames go out through `_emit_frame`, which numbers them and calls the pipeline's
`emit` (that call may block when the camera's queue policy is 'block'). Every frame carries the
source's run id (the service's, else one of its own); a frame without an id from outside gets
`<camera>-<run id>-<seq>` (agent/identity.py), so part ids never repeat across restarts.

A camera triggered over MQTT (`acquisition = "triggered"`, `trigger = "mqtt"`) has a `TriggerQueue`
(agent/triggers.py): `accept_trigger` numbers and queues a trigger from any thread; the capture
thread binds each to a frame (`_emit_frame(..., trigger=...)`) or answers it as missed
(`_answer_missed`), in trigger order. While the thread waits (`_wait`) it answers the triggers that
waited longer than `trigger_timeout_ms`; when it ends, the triggers still waiting are answered as
not inspected ("shutdown"). A triggered camera is never 'stalled': idle, it is waiting for a trigger.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import ClassVar, Literal

import numpy as np

from agent.frames import Frame
from agent.identity import camera_part_id, new_run_id
from agent.logs import get_logger
from agent.sources.config import CameraConfig
from agent.triggers import Trigger, TriggerQueue, TriggerRefusedError

Emit = Callable[[Frame], None]
State = Literal["starting", "running", "reconnecting", "stalled", "ended", "failed"]
WAITING_AFTER_S = 1.0  # a triggered camera that delivered nothing this long shows 'waiting for trigger'
TRIGGER_POLL_S = 0.05  # how often a waiting capture thread looks for triggers past their timeout
NO_PICTURE = np.zeros((1, 1), np.uint8)  # the image of a part answered without one (a missed trigger)
HEALTHY_STATES: frozenset[State] = frozenset({"running", "ended"})


@dataclass(frozen=True, slots=True)
class SourceStatus:
    """A snapshot of one source, for /health and /metrics."""

    camera: str
    state: State
    detail: str  # why: the error, the reconnect wait, the end of the file
    frames: int  # emitted since start
    errors: int  # exceptions caught (open/read/decode/emit failures)
    last_frame_at: datetime | None

    @property
    def healthy(self) -> bool:
        """Running, or ended on purpose (a video file played to its end with `loop = false`).

        'starting' is not healthy yet; 'reconnecting', 'stalled' and 'failed' mean no frames are coming.
        """
        return self.state in HEALTHY_STATES


class Backoff:
    """Capped exponential waits: min, 2*min, 4*min ... max; `reset` after a success."""

    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum, self.maximum = minimum, maximum
        self._next = minimum

    def next(self) -> float:
        wait = self._next
        self._next = min(self.maximum, self._next * 2)
        return wait

    def reset(self) -> None:
        self._next = self.minimum


class FrameSource(ABC):
    """One camera's capture thread; `start`, `stop` and `status` are safe from any thread."""

    watch_stalls: ClassVar[bool] = False  # a source that should deliver steadily (not a folder waiting for files)

    def __init__(self, camera: CameraConfig, emit: Emit, *, line_id: str = "", run_id: str | None = None) -> None:
        self.camera = camera
        self.run_id = new_run_id() if run_id is None else run_id
        self._emit = emit
        self.log = get_logger(f"agent.sources.{type(self).__name__}").bind(camera=camera.id)
        if line_id:
            self.log = self.log.bind(line=line_id)
        self.backoff = Backoff(camera.reconnect_min_s, camera.reconnect_max_s)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._state: State = "starting"
        self._detail = ""
        self._seq = 0
        self._frames = 0
        self._errors = 0
        self._last_frame_at: datetime | None = None
        self._heartbeat_at = time.monotonic()
        self._emitting = False
        self._traced: set[type[BaseException]] = set()
        timeout_s = camera.trigger_timeout_ms / 1000.0
        self.triggers: TriggerQueue | None = TriggerQueue(timeout_s) if camera.mqtt_triggered else None

    # --- public API -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the capture thread (once)."""
        if self._thread is not None:
            raise RuntimeError(f"source {self.camera.id} already started")
        self._thread = threading.Thread(target=self._main, name=f"source-{self.camera.id}", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to stop, without waiting (stop several sources at once, then `stop` each)."""
        self._stopping.set()
        self._interrupt()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to stop, wait up to `timeout` s for it to release its device and end.

        A thread blocked inside `emit` (a full 'block' queue) ends when emit returns; the pipeline
        should stop consuming only after its sources.
        """
        self.request_stop()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                self.log.warning("source thread did not stop in time", timeout_s=timeout)

    def status(self) -> SourceStatus:
        """A consistent snapshot; a running source that has had no frame for `stall_timeout_s` shows 'stalled'.

        That covers a capture call that hangs despite its timeouts (some device drivers ignore them). A camera
        that triggers itself is not watched: idle, it shows 'running', "waiting for trigger".
        """
        with self._lock:
            state, detail = self._state, self._detail
            quiet = time.monotonic() - self._heartbeat_at
            watched = self.watch_stalls and self._delivers_unasked
            if watched and state == "running" and not self._emitting and quiet > self.camera.stall_timeout_s:
                state, detail = "stalled", f"no frame for {quiet:.1f} s"
            elif self.camera.acquisition == "triggered" and state == "running" and quiet > WAITING_AFTER_S:
                detail = detail or "waiting for trigger"
            return SourceStatus(self.camera.id, state, detail, self._frames, self._errors, self._last_frame_at)

    @property
    def _delivers_unasked(self) -> bool:
        """Frames come without a trigger: free-run, or a live stream the agent drains between MQTT triggers."""
        if self.camera.acquisition == "free-run":
            return True
        return self.triggers is not None and self.camera.is_live

    @property
    def self_triggered(self) -> bool:
        """The camera triggers itself (a hardware line): every frame is a part, none comes while the line stands."""
        return self.camera.acquisition == "triggered" and self.camera.trigger == "camera"

    def accept_trigger(self, part_id: str | None, on_accepted: Callable[[Trigger], None] | None = None) -> Trigger:
        """Queue a trigger from the PLC (any thread, never blocks); TriggerRefusedError when this camera takes none.

        `on_accepted` hears the trigger (with its final part id) before the capture thread can take it."""
        if self.triggers is None:
            why = "it triggers itself" if self.self_triggered else "it is free-run"
            raise TriggerRefusedError("not_triggered", f"camera {self.camera.id} takes no MQTT trigger: {why}")
        make_id = partial(camera_part_id, self.camera.id, self.run_id)
        return self.triggers.accept(part_id, make_id, on_accepted)

    def grab_errors(self) -> dict[str, int] | None:
        """Frames the camera delivered broken, by kind ('failed', 'incomplete'); None: a source without grabs."""
        return None

    def device(self) -> str | None:
        """The camera device in use (vendor, model, serial) once opened; None where there is no such thing."""
        return None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- for subclasses -------------------------------------------------------------------------------
    @abstractmethod
    def _run(self) -> None:
        """Capture until `_stopping` is set (or the source ends); raising means 'retry after a backoff'."""

    def _interrupt(self) -> None:  # noqa: B027 (optional hook)
        """Wake the thread from a wait that `_stopping` alone does not end (an observer, a device)."""

    def _cleanup(self) -> None:  # noqa: B027 (optional hook)
        """Release devices and files; runs on the capture thread when it ends."""

    def _set_state(self, state: State, detail: str = "") -> None:
        with self._lock:
            changed = (state, detail) != (self._state, self._detail)
            self._state, self._detail = state, detail
        if changed:
            self.log.info("source state", state=state, detail=detail or None)

    def _count_error(self, what: str, exc: BaseException) -> None:
        """Log and count a caught exception; a traceback only the first time an unexpected kind is seen."""
        with self._lock:
            self._errors += 1
        expected = isinstance(exc, OSError | ValueError | SourceError)
        first = type(exc) not in self._traced  # one traceback per kind of surprise, not one per frame
        self._traced.add(type(exc))
        self.log.warning(what, error=str(exc) or type(exc).__name__, exc_info=first and not expected)

    def _back_off(self, state: State, reason: str) -> bool:
        """Show `state` with the reason and the wait, then wait the next backoff; True when stop was asked."""
        wait = self.backoff.next()
        self._set_state(state, f"{reason}; retry in {wait:.1f} s")
        return self._wait(wait)

    def _wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, answering triggers past their timeout; True when stop was asked meanwhile."""
        if self.triggers is None:
            return self._stopping.wait(max(0.0, seconds))
        end = time.monotonic() + seconds
        while True:
            self._answer_overdue()
            left = end - time.monotonic()
            if left <= 0 or self._stopping.wait(min(left, TRIGGER_POLL_S)):
                return self._stopping.is_set()

    def _answer_overdue(self) -> None:
        """Answer every trigger that waited longer than `trigger_timeout_ms` for a frame as missed."""
        if self.triggers is not None:
            for trigger in self.triggers.overdue():
                self._answer_missed(trigger, f"missed trigger: no frame within {self.camera.trigger_timeout_ms:g} ms")

    def _answer_missed(self, trigger: Trigger, why: str) -> None:
        """Send a part without a picture down the pipeline, to be answered ERROR in its place in trigger order."""
        self.log.warning("trigger not answered with a frame", part=trigger.part_id, trigger=trigger.count, why=why)
        self._emit_frame(NO_PICTURE, trigger.part_id, trigger.count, trigger=trigger, not_inspected=why)

    def _heartbeat(self) -> None:
        """Note that the device delivered (a frame grabbed, even if not emitted)."""
        with self._lock:
            self._heartbeat_at = time.monotonic()

    def _next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def _emit_frame(
        self,
        image: np.ndarray,
        part_id: str | None = None,
        seq: int | None = None,
        on_end: Callable[[str], None] | None = None,
        error: str | None = None,
        redelivered_on: frozenset[str] = frozenset(),
        *,
        trigger: Trigger | None = None,
        captured: tuple[datetime, float] | None = None,
        not_inspected: str | None = None,
        camera_frame: tuple[int | None, int | None] = (None, None),
    ) -> Frame | None:
        """Number the image, wrap it in a Frame and hand it to the pipeline; None when emit raised.

        `seq` is given when the part id needs it before the call; otherwise the next number is taken.
        `on_end` hears how the frame ended ("published" or a drop reason), from whichever thread ended it.
        `error` marks a part whose picture could not be read: it is published as ERROR (a reject).
        `redelivered_on`: the drop reasons after which this source offers the same part again (not answered).
        `trigger`: the PLC trigger the frame answers (its part id and counter); `captured`: when the picture was
        taken (wall, monotonic), when known better than "now" (at grab time, before decoding);
        `not_inspected`: why the part is answered without a picture (a missed trigger);
        `camera_frame`: the camera's frame id and timestamp (a GenICam camera), each None when not given.
        """
        seq = self._next_seq() if seq is None else seq
        captured_at, captured_mono = captured if captured is not None else (datetime.now(UTC), time.monotonic())
        frame = Frame(
            camera=self.camera.id,
            seq=seq,
            part_id=part_id if part_id is not None else camera_part_id(self.camera.id, self.run_id, seq),
            product_class=self.camera.product_class,
            image=image,
            on_end=on_end,
            error=error,
            redelivered_on=redelivered_on,
            run_id=self.run_id,
            trigger=trigger,
            missed_triggers=self.triggers.missed if self.triggers is not None else None,
            not_inspected=not_inspected,
            captured_at=captured_at,
            captured_mono=captured_mono,
            camera_frame_id=camera_frame[0],
            camera_timestamp=camera_frame[1],
        )
        with self._lock:
            self._emitting = True
        try:
            self._emit(frame)
        except Exception as exc:
            self._count_error("emit raised; frame not taken", exc)
            return None
        finally:
            with self._lock:
                self._emitting = False
                self._heartbeat_at = time.monotonic()
        with self._lock:
            self._frames += 1
            self._last_frame_at = frame.captured_at
        return frame

    # --- thread body ----------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._run()
                    return
                except Exception as exc:
                    self._count_error("source error; retrying", exc)
                    if self._back_off("reconnecting", str(exc) or type(exc).__name__):
                        return
        finally:
            try:
                self._cleanup()
            except Exception as exc:
                self._count_error("cleanup failed", exc)
            if self.triggers is not None:
                for trigger in self.triggers.close():
                    self._answer_missed(trigger, "shutdown")
            if self._stopping.is_set():
                self._set_state("ended", "stopped")


class SourceError(Exception):
    """An expected capture problem (device gone, stream ended early); logged without a traceback."""
