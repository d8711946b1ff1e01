"""The inspection service: cameras to engine to MQTT, Redis and OPC UA ([opcua]), wired together and run until stopped.

Start order: publishers (non-blocking: a broker that is down is retried in the
background; the OPC UA server, agent/opcua/, listens from its own thread), the HTTP server
(health, metrics, and the live page of agent/page/ with its encoder thread), the engine
worker (engine, classes, warm-up, on its own thread), then the cameras whose class could be
set up, then the checkpoint watcher; systemd hears READY=1 only then. The retained MQTT
status is `starting` from the first connect until then, `online` (or `degraded`, with
reasons) after, see agent/line_state.py. Stop order is the reverse: cameras stop, what is
queued is scored and published until `[agent].shutdown_timeout_s` has passed (the rest is dropped and
counted), every part dropped on the way is answered (an ERROR decision, agent/failsafe.py:
the fail-safe thread is stopped after the result thread and before the publishers), the
brokers get what is left of that time (at least a few seconds) to take the last results and
answers, `stopped` is published; then the page's streams end and the HTTP server stops (it never
touches the signal handlers `run` installs).

`run` (what `genclip run` calls) first takes the line's lock in its state directory
(agent/instance_lock.py), before any broker is touched: a second agent for the line exits 1
naming the running one's pid. Every start has a new run id (agent/identity.py), which the
cameras put into part ids and map keys. `reload` (the MQTT command, SIGHUP) re-reads class
profiles from [model].profile_dir after the prompts (agent/line_reload.py).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import numpy as np

from agent import __version__
from agent.batcher import FrameBatcher
from agent.commands import ENGINE_LOADING, dispatch, restore_operator_changes
from agent.config import InspectConfig
from agent.control import Answer, Command
from agent.failsafe import AnswerSettings, FailSafe
from agent.frames import Frame
from agent.health import HealthServer
from agent.identity import new_run_id
from agent.images import DEFAULT_MAX_PIXELS, UnreadableImageError, is_image_file, read_frame
from agent.instance_lock import LineLock, LineLockedError, state_dir_for
from agent.journal import PartJournal, journal_path, lost_report
from agent.ledger import FrameLedger
from agent.line_reload import reload_all
from agent.line_state import LineChecks, StatusMonitor
from agent.line_status import info_entry
from agent.logs import get_logger
from agent.metrics import AgentMetrics
from agent.operator_state import OPERATOR_FILE, OperatorStore
from agent.outcomes import Outcome, Prediction
from agent.page.routes import Page
from agent.publish.mqtt import MqttPublisher
from agent.publish.publisher import Publisher
from agent.publish.redis_streams import RedisStreamPublisher
from agent.recent_parts import RecentParts
from agent.reload import CheckpointWatcher, checkpoint_signature
from agent.result_stage import ResultStage
from agent.results import Inspection, JsonObject, build_inspection, build_uninspected, iso
from agent.sources import open_source
from agent.sources.base import FrameSource
from agent.systemd import SystemdNotifier
from agent.triggers import Trigger, TriggerRefusedError, checked_part_id, parse_trigger
from agent.worker import InferenceWorker
from model.checkpoint_files import checkpoint_candidates, resolve_checkpoint

if TYPE_CHECKING:
    from model.classes import ClassStatus
    from model.engine import Engine

log = get_logger("agent.service")
MAX_REFERENCE_IMAGES = 64
LINK_CHECK_S = 5.0  # how long start waits for the brokers' first answer before loading the engine
WATCHER_STOP_S = 1.0  # how long stop waits for the checkpoint watcher (a reload in progress is abandoned)
SOURCES_STOP_S = 5.0  # how long stop waits for all cameras together to release their devices
BATCH_GRACE_S = 10.0  # after the stop's time is up: the batch then on the device may still finish
FLUSH_MIN_S = 2.0  # the brokers get at least this long to take the last results
TASK_STALL_S = 300.0  # a prompt reload or recalibration on the worker may run this long before it counts as hung


class StartupError(RuntimeError):
    """The service cannot start; the message says what to fix."""


def reference_loader(folder: Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Callable[[], list[np.ndarray]]:
    """Reads a class's good-part images (sorted, at most 64) each time it is called."""

    def load() -> list[np.ndarray]:
        if not folder.is_dir():
            raise FileNotFoundError(f"reference folder not found: {folder}")
        frames = []
        for path in sorted(p for p in folder.iterdir() if is_image_file(p))[:MAX_REFERENCE_IMAGES]:
            try:
                frames.append(read_frame(path, max_pixels))
            except UnreadableImageError as exc:
                log.warning("reference image skipped", path=str(path), error=str(exc))
        return frames

    return load


class InspectionService:
    """One production line: its cameras, its engine, its publishers."""

    def __init__(self, config: InspectConfig) -> None:
        self.config = config
        self.line = config.line.id
        self.metrics = AgentMetrics()
        # a dropped frame's ERROR decision is queued to the fail-safe thread (never blocks; agent/failsafe.py)
        self.ledger = FrameLedger(
            on_drop=self.metrics.dropped, on_dropped_frame=lambda f, r: self.failsafe.submit(f, r)
        )
        # what is watched for new prompts: [agent].prompt_dir, else [model].checkpoint (a file or a folder)
        self.checkpoint_target: Path | None = config.agent.prompt_dir or config.model.checkpoint
        self.notifier = SystemdNotifier()
        self.thresholds = dict(config.thresholds)
        self.commanded: set[str] = set()  # classes whose threshold an operator set over MQTT (agent/operator_state.py)
        self.class_errors: dict[str, str] = {}
        self.last_reload_error: str | None = None
        self.profile_reload: JsonObject | None = None  # when class profiles were last re-read, and what changed
        self.started_at = datetime.now(UTC)
        self.run_id = new_run_id(self.started_at.timestamp())  # in every part id and map key of this start
        state_dir = state_dir_for(config.agent.state_dir, self.line)
        self.line_lock = LineLock(state_dir)
        self.operator = OperatorStore(state_dir / OPERATOR_FILE, config.agent.keep_operator_changes)
        self._stop = threading.Event()
        self._stop_signalled = False  # set by the signal handler, which must not take locks
        self._reload_signalled = False
        self._reload_lock = threading.Lock()
        try:
            triggered = any(camera.mqtt_triggered for camera in config.cameras)
            on_trigger = self.take_trigger if triggered else None
            self.mqtt = MqttPublisher(config.mqtt, self.line, handler=self.handle_command, on_trigger=on_trigger)
        except ValueError as exc:  # TLS files that cannot be loaded
            raise StartupError(str(exc)) from None
        self.redis = RedisStreamPublisher(config.redis, self.line)
        self.publishers: tuple[Publisher, ...] = (self.mqtt, self.redis, *self._opcua_server())
        self.journal = PartJournal(journal_path(state_dir))
        self.recent_parts = RecentParts(config.agent.confirm_good_parts)  # filled only with confirm_good on
        answers = AnswerSettings(self.line, config.mqtt.decision_window_ms / 1000.0, config.mqtt.reject_uninspected)
        self.failsafe = FailSafe(answers, self.publishers, self.metrics, self._model_fields, self.journal.closed)
        self.sources: dict[str, FrameSource] = {}
        self._running = threading.Event()  # set once the engine is warm, classes set up, cameras started
        self.checks = LineChecks(
            self.class_errors,
            lambda: self.worker.engine,
            self.sources,
            self.publishers,
            self.hang_reason,
            self._running,
            self.mqtt.sink,
        )
        self.status = StatusMonitor(self.checks.state, self.mqtt, self.publish_info, config.mqtt.heartbeat_s)
        cameras = [camera.id for camera in config.cameras]
        self.page = (
            Page(config.page, self, self.line, cameras, grows_memory=config.agent.confirm_good)
            if config.page.enabled
            else None
        )
        self.health = HealthServer(
            config.agent.health_host,
            config.agent.health_port,
            self.metrics,
            self.health_reasons,
            liveness=self.checks.liveness,
            routes=self.page.routes() if self.page is not None else (),
        )
        self.batcher = FrameBatcher(self.ledger, config.engine.batch_size, config.engine.max_wait_ms)
        batches = max(2, -(-config.agent.publish_queue // config.engine.batch_size))
        self.results = ResultStage(self.publish, self.ledger, self.metrics, capacity=batches)
        self.worker = InferenceWorker(
            self._build_engine, self._setup_classes, self.batcher, self.results.put, pipeline=config.engine.pipeline
        )
        self.watcher: CheckpointWatcher | None = None
        self._model_info: dict[str, str] = {}  # backbone, weights
        self._newest_at_start: tuple[Path, int, int] | None = None  # (path, size, mtime) when the engine loaded

    def _opcua_server(self) -> tuple[Publisher, ...]:
        """The OPC UA server ([opcua], extra `opcua`) when enabled: a sink beside MQTT and Redis."""
        if not self.config.opcua.enabled:
            return ()
        from agent.opcua.server import OpcuaServer  # asyncua: only with the extra

        cameras = [camera.id for camera in self.config.cameras]
        server = OpcuaServer(
            self.config.opcua, self.line, cameras, on_trigger=self.opcua_trigger, handler=self.handle_command
        )
        return (server,)

    # --- start and stop -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Bring everything up; raises StartupError (the service then exits non-zero) with the reason."""
        cfg = self.config
        if "id" not in cfg.line.model_fields_set:
            log.warning(
                "no [line] id in the configuration; running as the default",
                line=self.line,
                why="lines that share a broker or Redis must each have their own id: topics and keys are per line",
            )
        for publisher in self.publishers:
            self.metrics.add_stats_source(publisher.sink, publisher.stats.counts)
            self.metrics.watch_sink(publisher.sink, publisher.health)
        for camera in cfg.cameras:
            self.metrics.add_camera(camera.id)
            policy, max_age_ms = camera.resolved_queue_policy, camera.resolved_max_age_ms
            self.batcher.add_camera(camera.id, camera.queue_size, policy, max_age_ms)
            self.metrics.watch_queue(f"camera:{camera.id}", partial(self.batcher.depth, camera.id))
        self.metrics.watch_queue("results", self.results.depth)
        restore_operator_changes(self)  # before the classes are set up and the cameras start
        self.status.refresh()  # `starting` is the retained status the first connection announces
        for publisher in self.publishers:
            publisher.start()
        lost = lost_report(self.journal, self.line)  # parts a killed run never answered: retained `lost`
        if lost is not None:
            self.mqtt.publish_lost(lost)
        self.status.start()
        self._refuse_bad_credentials(LINK_CHECK_S)  # before the engine loads: fail in seconds, not minutes
        try:
            self.health.start()
        except Exception as exc:
            raise StartupError(str(exc)) from None
        if self.page is not None:
            self.page.start()
        self.results.start()
        self.failsafe.start()
        self.notifier.status("starting: loading the engine")
        self.worker.start()
        self.worker.ready.wait()
        if self.worker.error is not None:
            raise StartupError(f"the engine cannot start: {self.worker.error}") from self.worker.error
        self._refuse_bad_credentials(0.0)  # an answer that came while the engine loaded
        engine = self.worker.engine
        assert engine is not None  # ready without an error
        self._model_info = {"backbone": engine.backbone.name, "weights": engine.backbone.weights}
        self.metrics.set_prompt(engine.prompt_version, engine.backbone.name, str(self.checkpoint_target or ""))
        for camera in cfg.cameras:
            if camera.product_class in self.class_errors:
                log.error("camera not started: its class is not set up", camera=camera.id)
                continue
            source = open_source(
                camera,
                self._emitter(camera.id),
                line_id=self.line,
                max_frame_pixels=cfg.model.max_frame_pixels,
                run_id=self.run_id,
                paused=partial(self.batcher.is_paused, camera.id),  # a paused folder reads no new file
            )
            self.sources[camera.id] = source
            self.metrics.watch_camera(camera.id, source.status)
            if source.triggers is not None:
                self.metrics.watch_triggers(camera.id, source.triggers.counts)
            if source.grab_errors() is not None:
                self.metrics.watch_grab_errors(camera.id, partial(grab_errors_of, source))
            source.start()
        target = self.checkpoint_target
        if target is not None:
            self.watcher = CheckpointWatcher(target, self._on_checkpoint, cfg.agent.reload_debounce_s)
            self.watcher.start()
            self._catch_up_on_checkpoints(target)
        self._running.set()
        self.status.refresh()  # online (or degraded, with reasons) and the info, now
        threading.Thread(target=self._watchdog_loop, name="watchdog", daemon=True).start()
        self.notifier.ready()
        log.info(
            "inspection running",
            cameras=len(self.sources),
            classes=engine.classes.names(),
            prompt_version=engine.prompt_version,
            health=f"http://{cfg.agent.health_host}:{self.health.port}/healthz",
        )

    def _refuse_bad_credentials(self, wait_s: float) -> None:
        """StartupError when a broker refuses us for good (wrong password, untrusted certificate): a
        configuration error that retrying forever would only hide. A broker that is down or does not
        answer within `wait_s` is not an error: the publishers keep retrying and the line starts."""
        end = time.monotonic() + wait_s
        for publisher in self.publishers:
            problem = publisher.startup_problem(max(0.0, end - time.monotonic()))
            if problem is not None:
                raise StartupError(problem)

    def run(self) -> int:
        """Take the line lock, start(), serve until SIGTERM/SIGINT (SIGHUP: prompts and profiles); the exit code."""

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            # Runs between two bytecodes of the main thread, maybe inside a lock it holds: no locks here.
            if signum == signal.SIGHUP:
                self._reload_signalled = True
            else:
                self._stop_signalled = True

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, on_signal)
        try:
            self.line_lock.acquire()  # before any broker is touched: a double start must not flap the status
        except LineLockedError as exc:
            log.error("cannot start", reason=str(exc))
            return 1
        try:
            self.start()
        except StartupError as exc:
            log.error("cannot start", reason=str(exc))
            self.shutdown()
            return 1
        while not self._stop.is_set():
            time.sleep(0.1)
            if self._stop_signalled:  # a stop wins over a reload asked for at the same time
                self._stop.set()
            elif self._reload_signalled:
                self._reload_signalled = False
                threading.Thread(target=self._reload_on_signal, name="sighup-reload", daemon=True).start()
        self.shutdown()
        return 0

    def _reload_on_signal(self) -> None:
        """Off the main thread, which keeps watching for SIGTERM while new prompts are installed."""
        try:
            reload_all(self)
        except Exception as exc:
            log.warning("reload on SIGHUP refused; the running prompts keep serving", error=str(exc))

    def request_stop(self) -> None:
        self._stop.set()

    def shutdown(self) -> None:
        """Stop capture, finish or drop (counted) what is queued, flush publishers, publish `stopped`.

        One budget for all of it, `[agent].shutdown_timeout_s`, plus at most WATCHER_STOP_S for the
        checkpoint watcher, SOURCES_STOP_S for the cameras, BATCH_GRACE_S for a batch on the device when
        time is up, FLUSH_MIN_S for the result thread and for each broker, and Redis's socket timeout:
        with the largest setting (50 s) about 80 s, inside the unit's TimeoutStopSec (90 s).
        """
        self._stop.set()
        self.notifier.stopping()
        self.status.stop()  # no status or heartbeat after this: `stopped` is the last word
        drain_s = self.config.agent.shutdown_timeout_s
        log.info("stopping", queued=self.batcher.depth(), drain_s=drain_s)
        if self.watcher is not None:
            self.watcher.stop(timeout=WATCHER_STOP_S)  # a reload in progress is abandoned, not waited for
        self._stop_sources()
        deadline = time.monotonic() + drain_s
        if self.worker.ready.is_set() and self.worker.error is None:
            self.worker.stop(deadline, grace_s=BATCH_GRACE_S)
        dropped = self.batcher.drain("shutdown")
        dropped += self.results.stop(max(deadline, time.monotonic() + FLUSH_MIN_S))
        self.failsafe.stop(max(deadline, time.monotonic() + FLUSH_MIN_S))  # answers, before `stopped`
        for publisher in self.publishers:
            publisher.stop(timeout=max(deadline - time.monotonic(), FLUSH_MIN_S))
        if self.page is not None:
            self.page.stop()  # its open streams end, then the HTTP server stops
        self.health.stop()
        self.journal.close()
        frames = self.ledger.snapshot().as_dict()
        log.info("stopped", dropped_at_shutdown=dropped, frames=frames, answered=self.failsafe.answered)
        self.line_lock.release()

    def _stop_sources(self) -> None:
        """Cameras stop before the batcher closes, so a frame a camera is handing over as the stop comes is
        queued and scored, not dropped. A paused 'block' camera waits in `put` until the batcher closes, so
        with a camera paused it closes first (that waiting frame is dropped as 'shutdown', counted)."""
        for source in self.sources.values():
            source.request_stop()
        if self.batcher.paused():
            self.batcher.close()
        sources_by = time.monotonic() + SOURCES_STOP_S
        for source in self.sources.values():
            source.stop(timeout=max(0.0, sources_by - time.monotonic()))
        self.batcher.close()  # what is queued is still scored; a source still waiting in `put` is let go

    # --- fail-safe answers (agent/failsafe.py) -------------------------------------------------------------
    def _model_fields(self) -> dict[str, str]:
        """The `model` object of a result: backbone, weights, prompt version."""
        return {**self._model_info, "prompt_version": self._prompt_version()}

    # --- engine set-up (on the worker thread) ---------------------------------------------------------------
    def _build_engine(self) -> Engine:
        from model import Engine
        from model.threads import set_torch_threads

        threads = set_torch_threads(self.config.engine.threads, self.config.engine.interop_threads)
        log.info("torch threads", **threads)
        untrained = self.config.model.model_copy(update={"checkpoint": None})
        engine = Engine(untrained, max_batch=self.config.engine.batch_size)  # the backbone: the slow part
        candidates = checkpoint_candidates(self.config.agent.prompt_dir, self.config.model.checkpoint)
        self._newest_at_start = checkpoint_signature(self.checkpoint_target)  # what start() compares with
        if not candidates and self.checkpoint_target is not None:
            log.warning("no checkpoint published yet; running untrained prompts", folder=str(self.checkpoint_target))
        refused = engine.load_first_usable(candidates)
        if refused:
            self.last_reload_error = "; ".join(refused)
        return engine

    def _catch_up_on_checkpoints(self, target: Path) -> None:
        """A checkpoint published while the engine loaded (minutes, on a big model) came before the watcher
        did: load it now, off the start-up path."""
        newest = checkpoint_signature(target)
        if newest is not None and newest != self._newest_at_start:
            log.info("a prompt checkpoint was published while the engine loaded", path=str(newest[0]))
            threading.Thread(target=self._on_checkpoint, args=(newest[0],), name="catch-up", daemon=True).start()

    def _setup_classes(self, engine: Engine) -> None:
        engine.classes.set_thresholds(self.thresholds, {k: "command" for k in self.commanded})
        for name in self.config.product_classes():
            folder = self.config.references.get(name)
            try:
                loader = reference_loader(folder, self.config.model.max_frame_pixels) if folder else ()
                profile = engine.classes.setup(name, loader)
                log.info(
                    "class ready",
                    product_class=name,
                    class_word=profile.class_word,
                    class_word_source=profile.class_word_source,
                    threshold_source=engine.classes.threshold(name).source,
                )
            except Exception as exc:  # one class that cannot be set up must not stop the others
                self.class_errors[name] = str(exc)
                log.error("class cannot be set up; its cameras stay off", product_class=name, error=str(exc))

    # --- frames in and out --------------------------------------------------------------------------------
    def _emitter(self, camera: str) -> Callable[[Frame], None]:
        captured = self.metrics.frames_captured.labels(camera=camera)
        put = self.batcher.emitter(camera)
        journal = self.journal

        def emit(frame: Frame) -> None:
            captured.inc()
            journal.opened(frame)
            put(frame)

        return emit

    def take_trigger(self, camera: str, payload: bytes, retained: bool) -> None:
        """A PLC trigger for `camera` (paho's network thread: never blocks). Accepted, it is journaled and queued
        for the camera (agent/triggers.py); refused, it is logged and counted, and the PLC rejects the part on
        silence past its deadline (there is no part id to answer for)."""
        try:
            if retained:
                raise TriggerRefusedError("retained", "a retained trigger is ignored: it would fire at every reconnect")
            part_id = parse_trigger(payload)
        except TriggerRefusedError as exc:
            self._refused(camera, exc)
            return
        with contextlib.suppress(TriggerRefusedError):  # counted and logged by accept_trigger
            self.accept_trigger(camera, part_id)

    def opcua_trigger(self, camera: str, part_id: str | None) -> Trigger:
        """The OPC UA method Trigger(partId) (an asyncua worker thread): an MQTT trigger's path and refusals,
        with the part id checked like a plain-text MQTT payload; raises TriggerRefusedError, which the caller
        gets as a bad status code."""
        try:
            checked = None if part_id is None else checked_part_id(part_id)
        except TriggerRefusedError as exc:
            self._refused(camera, exc)
            raise
        return self.accept_trigger(camera, checked)

    def accept_trigger(self, camera: str, part_id: str | None) -> Trigger:
        """Journal and queue a trigger for `camera` (never blocks); a refusal is logged, counted and raised."""
        try:
            source = self._trigger_target(camera)
            opened = partial(self.journal.opened_part, camera)
            return source.accept_trigger(part_id, lambda trigger: opened(trigger.part_id))
        except TriggerRefusedError as exc:
            self._refused(camera, exc)
            raise

    def _refused(self, camera: str, exc: TriggerRefusedError) -> None:
        label = camera if camera in self.sources else "unknown"
        self.metrics.triggers_refused.labels(camera=label, reason=exc.reason).inc()
        log.warning("trigger refused", camera=camera[:64], reason=exc.reason, error=str(exc))

    def _trigger_target(self, camera: str) -> FrameSource:
        """The running source a trigger is for; TriggerRefusedError with the reason when there is none."""
        source = self.sources.get(camera)
        if source is not None and self._running.is_set() and not self._stop.is_set():
            return source
        if camera not in {c.id for c in self.config.cameras}:
            raise TriggerRefusedError("unknown_camera", f"no camera {camera!r} on line {self.line}")
        raise TriggerRefusedError("not_running", f"camera {camera} is not running (starting, stopping, or off)")

    def publish(self, frame: Frame, outcome: Outcome) -> Inspection:
        """Build one frame's Inspection and hand it to every publisher (which never block)."""
        inspection = self._inspection(frame, outcome)
        if self.config.agent.confirm_good and isinstance(outcome, Prediction):
            self.recent_parts.add(frame.part_id, frame.product_class, frame.image)
        frame.decided.claim()  # from here on a drop of this frame is not answered: one decision per part
        self.journal.closed(frame)
        for publisher in self.publishers:
            publisher.publish_inspection(inspection)
        if frame.not_inspected is None:
            self.metrics.frames_processed.labels(camera=frame.camera).inc()
        if not isinstance(outcome, Prediction) and frame.not_inspected is None:
            self.metrics.frame_errors.labels(camera=frame.camera).inc()
            log.warning("frame not scored", camera=frame.camera, seq=frame.seq, reason=outcome.reason)
        self.metrics.results_published.labels(camera=frame.camera, verdict=inspection.verdict).inc()
        if self.page is not None:
            self.page.feed.offer(frame, outcome, inspection)  # references only: the page encodes on its own thread
        latency = time.monotonic() - frame.captured_mono
        self.metrics.capture_to_publish_seconds.labels(kind="result").observe(latency)
        if inspection.rejects:
            self.metrics.capture_to_publish_seconds.labels(kind="reject").observe(latency)
        self.ledger.published(frame)  # last: a failure above counts the frame as invalid, once
        return inspection

    def _inspection(self, frame: Frame, outcome: Outcome) -> Inspection:
        """A frame's Inspection: scored (or unreadable), or a part answered without a picture (a missed trigger)."""
        cfg = self.config
        window_s = cfg.mqtt.decision_window_ms / 1000.0
        if frame.not_inspected is not None:
            reason, reject, line = frame.not_inspected, cfg.mqtt.reject_uninspected, self.line
            model = self._model_fields()
            return build_uninspected(frame, reason, line=line, window_s=window_s, model=model, signal_reject=reject)
        return build_inspection(
            frame,
            outcome,
            line=self.line,
            window_s=window_s,
            maps=cfg.redis.maps,
            map_size=cfg.redis.map_size,
            model=self._model_fields(),
        )

    def _prompt_version(self) -> str:
        engine = self.worker.engine
        return engine.prompt_version if engine is not None else "unknown"

    # --- prompts ------------------------------------------------------------------------------------------
    def _on_checkpoint(self, path: Path) -> None:
        try:
            self.reload(path)
        except Exception as exc:
            log.warning("new checkpoint refused; the running prompts keep serving", path=str(path), error=str(exc))

    def reload(self, path: Path | None = None, timeout: float = 300.0) -> str:
        """Validate a checkpoint (the newest one when None) and install it between batches; returns the version.

        A bad checkpoint raises with the reason; the running prompts keep serving.
        """
        from model import CheckpointError

        with self._reload_lock:
            target = path or self.checkpoint_target
            resolved = resolve_checkpoint(target) if target is not None else None
            if resolved is None:
                raise CheckpointError(f"no checkpoint to load (looked in {target or '[model].checkpoint'})")
            self.notifier.reloading()
            try:
                engine = self.worker.engine
                if engine is None:
                    raise CheckpointError("the engine is still loading; reload once the line reports online")
                prepared = engine.prepare_prompts(resolved)  # host work, on this thread
                version = self.worker.submit(lambda engine: engine.install_prompts(prepared)).result(timeout)
            except Exception as exc:
                self.last_reload_error = str(exc) if str(resolved) in str(exc) else f"{resolved}: {exc}"
                self.metrics.prompt_reloads.labels(outcome="refused").inc()
                self.publish_info()
                raise
            finally:
                self.notifier.ready()
            self.last_reload_error = None
            self.metrics.prompt_reloads.labels(outcome="ok").inc()
            self.metrics.set_prompt(version, self._model_info.get("backbone", ""), str(resolved))
            log.info("prompts reloaded", version=version, path=str(resolved))
            self.publish_info()
            return version

    # --- commands -----------------------------------------------------------------------------------------
    def handle_command(self, command: Command) -> Answer:
        """Run a validated MQTT command (the table in agent/commands.py); the answer's fields (errors raise)."""
        if not self.worker.ready.is_set() or self.worker.error is not None:  # loading, classes, warm-up
            raise ValueError(ENGINE_LOADING)
        return dispatch(self, command)

    # --- info and health ----------------------------------------------------------------------------------
    def info(self) -> JsonObject:
        """The line's retained info (the MQTT `info` topic, the Redis info key): model, cameras, classes."""
        engine = self.worker.engine
        classes: JsonObject = {}
        if engine is not None:
            classes.update({name: info_entry(engine.classes.status(name)) for name in engine.classes.names()})
        classes.update({name: {"error": error} for name, error in self.class_errors.items()})
        paused = set(self.batcher.paused())
        return {
            "schema": 1,
            "line": self.line,
            "name": self.config.line.name,
            "version": __version__,
            "started_at": iso(self.started_at),
            "run_id": self.run_id,
            "profile_reload": self.profile_reload,
            "model": {
                **self._model_info,
                "prompt_version": self._prompt_version(),
                "device": str(engine.device) if engine is not None else None,
                "precision": engine.precision if engine is not None else None,
                "last_reload_error": self.last_reload_error,
            },
            "cameras": [
                {
                    "id": c.id,
                    "product_class": c.product_class,
                    "kind": c.resolved_kind,
                    **self._source_info(c.id),
                    "paused": c.id in paused,
                    **self._trigger_info(c.id),
                }
                for c in self.config.cameras
            ],
            "classes": classes,
            "status": self.status.current.as_json(),
            "operator_overrides": self.operator.info(  # restored at start, or reset ([agent].keep_operator_changes)
                {name: self.thresholds[name] for name in sorted(self.commanded) if name in self.thresholds}, paused
            ),
        }

    def _source_info(self, camera_id: str) -> JsonObject:
        """A camera's state in info, and its detail (why it is down; a folder's sub-folders it does not read);
        a GenICam camera's device (vendor, model, serial; null until opened) and its broken frames by kind."""
        source = self.sources.get(camera_id)
        if source is None:
            return {"state": "off", "detail": ""}
        status = source.status()
        grab_errors = source.grab_errors()
        if grab_errors is None:
            return {"state": status.state, "detail": status.detail}
        return {"state": status.state, "detail": status.detail, "device": source.device(), "grab_errors": grab_errors}

    def _trigger_info(self, camera_id: str) -> JsonObject:
        """A camera's acquisition in info: mode, trigger source, triggers accepted and missed (MQTT-triggered)."""
        camera = next(c for c in self.config.cameras if c.id == camera_id)
        source = self.sources.get(camera_id)
        counts = source.triggers.counts() if source is not None and source.triggers is not None else None
        return {
            "acquisition": camera.acquisition,
            "trigger": camera.trigger if camera.acquisition == "triggered" else None,
            "triggers": counts[0] if counts else None,
            "missed_triggers": counts[1] if counts else None,
        }

    def publish_info(self) -> JsonObject:
        info = self.info()
        for publisher in self.publishers:
            publisher.publish_info(info)
        return info

    # --- what the live page reads (agent/page/views.py LinePort) ------------------------------------------
    def class_statuses(self) -> list[ClassStatus]:
        engine = self.worker.engine
        return [] if engine is None else [engine.classes.status(name) for name in engine.classes.names()]

    def sink_health(self) -> list[tuple[str, bool, str]]:
        return [(publisher.sink, *publisher.health()) for publisher in self.publishers]

    def record_review(self, fields: dict[str, str]) -> str:
        return self.redis.record_review(fields)

    def health_reasons(self) -> list[str]:
        """Why the line is unhealthy (empty when it is not); reads only, changes nothing (the camera_up and
        broker_up gauges read the same states at scrape time). Until the line runs: STARTING_REASON first."""
        return self.checks.health()

    def metrics_results_by_verdict(self) -> dict[str, int]:
        """Results published so far, by verdict (OK, NG, ERROR), over all cameras."""
        totals: dict[str, int] = {}
        for metric in self.metrics.results_published.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    verdict = sample.labels["verdict"]
                    totals[verdict] = totals.get(verdict, 0) + int(sample.value)
        return totals

    def hang_reason(self) -> str | None:
        """Why the engine or result thread looks hung (a hung device, a stuck publish), or None.

        A batch may run `[agent].stall_timeout_s`; a prompt reload or recalibration TASK_STALL_S; the
        worker may wait for room in the result queue as long as the result thread keeps finishing batches.
        """
        if not self.worker.ready.is_set() or self._stop.is_set():
            return None
        limit = self.config.agent.stall_timeout_s
        if not self.worker.alive:
            return "engine worker stopped"
        if not self.results.alive:
            return "result thread stopped"
        what, seconds = self.worker.busy()
        if what == "batch" and seconds > limit:
            return f"engine worker stalled: one batch has run for {seconds:.0f} s"
        if what == "task" and seconds > TASK_STALL_S:
            return f"engine worker stalled: a prompt reload or recalibration has run for {seconds:.0f} s"
        if what == "deliver" and seconds > limit and self.results.quiet_for() > limit:
            return f"result thread stalled: no batch published for {self.results.quiet_for():.0f} s"
        quiet = time.monotonic() - self.worker.heartbeat
        if what is None and quiet > limit:
            return f"engine worker stalled: its loop has not turned for {quiet:.0f} s"
        return None

    def _watchdog_loop(self) -> None:
        """WATCHDOG=1 while nothing hangs; a hung device stops the pings and systemd restarts us."""
        interval = SystemdNotifier.watchdog_interval() or 5.0
        while not self._stop.wait(min(interval, 5.0)):
            if self.hang_reason() is None:
                self.notifier.watchdog()
            snap = self.ledger.snapshot()
            self.notifier.status(
                f"{len(self.sources)} camera(s), {snap.published} published, {snap.in_flight} in flight, "
                f"prompts {self._prompt_version()}"
            )


def grab_errors_of(source: FrameSource) -> dict[str, int]:
    """A source's broken frames by kind, for the metrics (empty for a source without grabs)."""
    return source.grab_errors() or {}
