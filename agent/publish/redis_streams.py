"""Results to a Redis stream for dashboards, with anomaly-map PNGs beside them.

Every inspection is appended to `genclip:<line>:results` (XADD, MAXLEN ~) with
plain fields a dashboard can filter on without parsing JSON; its map PNG, when
there is one, goes to `result["map_key"]` with a TTL. A background thread
writes in pipelined batches; during an outage results wait in a bounded outbox
and are written in order once Redis answers again. A batch that fails midway is
written again in full, so a dashboard may see an entry twice, never miss one.
"""

from __future__ import annotations

import json
import threading
import time

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError, AuthorizationError, NoPermissionError
from redis.retry import Retry
from redis.typing import EncodableT, FieldT

from agent.logs import get_logger
from agent.publish.config import RedisConfig
from agent.publish.outbox import DeliveryStats, Outbox, link_health
from agent.results import Inspection, JsonObject, results_stream, reviews_stream

log = get_logger(__name__)

KINDS = ("result", "map", "info")
BATCH = 256
IDLE_PING_S = 5.0  # how often an idle publisher checks that Redis still answers, for health()
SOCKET_TIMEOUT_S = 5.0


def stream_fields(inspection: Inspection) -> dict[FieldT, EncodableT]:
    """The stream entry: the result JSON plus plain copies of what dashboards filter on."""
    return {
        "payload": json.dumps(inspection.result, separators=(",", ":"), ensure_ascii=False, default=str),
        "camera": inspection.camera,
        "verdict": inspection.verdict,
        "score": "" if inspection.score is None else str(float(inspection.score)),
    }


class RedisStreamPublisher:
    """Appends every inspection of a line to its Redis stream; never blocks the pipeline."""

    sink = "redis"

    def __init__(self, config: RedisConfig, line_id: str) -> None:
        self.config = config
        self.line_id = line_id
        self.stream = results_stream(line_id)
        self.info_key = f"genclip:{line_id}:info"
        self.review_stream = reviews_stream(line_id)
        self._cv = threading.Condition()
        self._outbox: Outbox[Inspection] = Outbox(config.outbox_size, on_drop=self._overflow, cond=self._cv)
        self.stats = DeliveryStats(KINDS, depth=lambda: len(self._outbox))
        self._info: str | None = None  # waiting to be written
        self._started = False
        self._closing = False
        self._closed = False
        self._stop_by = 0.0
        self._problem = "connecting"
        self._fatal: str | None = None  # a refusal no retry fixes: wrong password, user without rights
        self._attempted = threading.Event()  # set once the first PING has an answer (or none)
        self._client = redis.Redis.from_url(
            config.url,
            username=config.username,
            password=config.password.get_secret_value() if config.password is not None else None,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),  # our loop retries, with backoff, without blocking anyone
        )
        self._thread = threading.Thread(target=self._run, name=f"redis-writer-{line_id}", daemon=True)

    def start(self) -> None:
        """Start the writer thread; returns at once whether or not Redis is up."""
        if not self._started:
            self._started = True
            self._thread.start()

    def publish_inspection(self, inspection: Inspection) -> None:
        """Queue one inspection for the stream (and its map); never waits for Redis."""
        with self._cv:
            if self._closing or self._closed:
                self.stats.count("result", "dropped")
                return
            self._outbox.put(inspection)

    def publish_info(self, info: JsonObject) -> None:
        """SET genclip:<line>:info to this JSON (no TTL); the latest call wins."""
        with self._cv:
            self._info = json.dumps(info, separators=(",", ":"), ensure_ascii=False, default=str)
            self._cv.notify_all()

    def record_review(self, fields: dict[str, str]) -> str:
        """XADD an operator's review of a part (the live page's good/defect mark) to `genclip:<line>:reviews`,
        now, on the caller's thread; the entry id. Raises redis.RedisError or OSError when Redis does not take
        it: the operator is told, nothing is queued (a review is worth a person's attention, not a retry)."""
        entry = self._client.xadd(
            self.review_stream, dict(fields.items()), maxlen=self.config.stream_maxlen, approximate=True
        )
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued within timeout, then close; what is left is counted as dropped."""
        if not self._started or self._closed:
            return
        with self._cv:
            self._closing = True
            self._stop_by = time.monotonic() + timeout
            self._cv.notify_all()
        self._thread.join(timeout + SOCKET_TIMEOUT_S)
        with self._cv:
            self._closed = True
            self.stats.connected = False
            left = self._outbox.clear()
        if left:
            self.stats.count("result", "dropped", len(left))
            log.warning("redis stopped with results unwritten", unwritten=len(left))
        self._client.close()

    def health(self) -> tuple[bool, str]:
        """(True, "connected") or (False, why not)."""
        with self._cv:
            return link_health(self._closed, self._started, self.stats.connected, self._problem)

    def startup_problem(self, timeout: float) -> str | None:
        """Wait up to `timeout` s for the first answer from Redis; why it refuses us for good (a wrong
        password, an ACL user that may not connect), or None: connected, still trying, or unreachable
        (retried in the background)."""
        self._attempted.wait(timeout)
        with self._cv:
            return self._fatal

    # --- writer thread --------------------------------------------------------------------------

    def _overflow(self, inspection: Inspection) -> None:
        self.stats.count("result", "dropped")
        log.warning("redis outbox full, oldest result dropped", part=inspection.part_id, camera=inspection.camera)

    def _has_work(self) -> bool:
        return bool(self._outbox) or self._info is not None

    def _run(self) -> None:
        delay = self.config.reconnect_min_s
        self._check()
        while True:
            with self._cv:
                if not self._closing:
                    self._cv.wait_for(lambda: self._closing or self._has_work(), IDLE_PING_S)
                if self._closing and (not self._has_work() or time.monotonic() >= self._stop_by):
                    return
                batch = self._outbox.pop_batch(BATCH)
                info, self._info = self._info, None
            if not batch and info is None:
                ok = self._check()  # idle: keep health() true to the server's state
            else:
                ok = self._write(batch, info)
                if not ok:
                    with self._cv:
                        self._outbox.put_front(batch)
                        if self._info is None:
                            self._info = info
            if ok:
                delay = self.config.reconnect_min_s
                continue
            with self._cv:  # back off, but wake for stop(); once closing, until the stop's time is up at most
                if not self._closing:
                    self._cv.wait_for(lambda: self._closing, delay)
                else:
                    left = self._stop_by - time.monotonic()
                    if left <= 0:
                        return
                    self._cv.wait(min(delay, left))
            delay = min(delay * 2, self.config.reconnect_max_s)

    def _check(self) -> bool:
        try:
            self._client.ping()
        except (redis.RedisError, OSError) as exc:
            self._down(exc)
            return False
        self._up()
        return True

    def _write(self, batch: list[Inspection], info: str | None) -> bool:
        """One pipelined round trip; False (nothing counted) when Redis could not be reached."""
        pipe = self._client.pipeline(transaction=False)
        kinds: list[tuple[str, Inspection | None]] = []
        insp: Inspection | None
        for insp in batch:
            pipe.xadd(self.stream, stream_fields(insp), maxlen=self.config.stream_maxlen, approximate=True)
            kinds.append(("result", insp))
            if insp.map_png is not None:
                pipe.set(insp.stored_map_key, insp.map_png, ex=self.config.map_ttl_s)
                kinds.append(("map", insp))
        if info is not None:
            pipe.set(self.info_key, info)
            kinds.append(("info", None))
        try:
            replies = pipe.execute(raise_on_error=False)
        except (redis.RedisError, OSError) as exc:
            self._down(exc)
            return False
        finally:
            pipe.reset()
        self._up()
        for (kind, insp), reply in zip(kinds, replies, strict=True):
            if isinstance(reply, Exception):
                self.stats.count(kind, "dropped")
                part = insp.part_id if insp is not None else None
                log.error("redis refused a write", kind=kind, part=part, error=str(reply))
            else:
                self.stats.count(kind, "sent")
        return True

    def _up(self) -> None:
        with self._cv:
            was = self.stats.connected
            self.stats.connected = True
            self._problem = "connected"
            self._fatal = None
        self._attempted.set()
        if not was:
            log.info("redis connected", url=self.config.url, queued=len(self._outbox))

    def _down(self, exc: Exception) -> None:
        """Remember why Redis is not usable; log once per change. We retry in every case, to lose nothing."""
        permanent = isinstance(exc, AuthenticationError | AuthorizationError) or not isinstance(
            exc, redis.ConnectionError | redis.TimeoutError | OSError
        )
        problem = f"{'redis refused' if permanent else 'redis unreachable'}: {exc}"
        fatal = None
        if isinstance(exc, AuthenticationError | AuthorizationError | NoPermissionError):
            user = self.config.username or "default"
            where = "password_file, GENCLIP_REDIS__PASSWORD or the redis-password credential"
            if self.config.password is None:
                hint = f"no password is configured: set [redis].username and its password ({where})"
            else:
                hint = f"check [redis].username and its password ({where}), and the user's ACL"
            fatal = f"Redis at {self.config.url} refused the login for user {user!r}: {exc} ({hint})"
        with self._cv:
            changed = problem != self._problem
            self.stats.connected = False
            self._problem = problem
            self._fatal = fatal
        self._attempted.set()
        if changed:
            level = log.error if permanent else log.warning
            level("redis not available", reason=problem, url=self.config.url, queued=len(self._outbox))
