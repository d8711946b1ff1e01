"""The page's encoder thread: JPEGs of the cameras somebody watches, at a capped rate, off the pipeline.

Contract:
- Nothing is encoded for a camera nobody watches: a stream `open`s a view of (camera, opacity) and
  `close`s it when the browser goes away; with no view open the thread sleeps on an event and costs
  nothing. `genclip_page_viewers{camera}` counts the open views, `genclip_page_frames_encoded_total`
  the JPEGs made, so closing the browser visibly stops the encoding.
- It never slows scoring: it runs on its own thread (`page-encoder`), reads the feed's latest part of
  each camera (agent/page/live.py) and keeps one JPEG per view key; a part that arrives before the
  previous one was encoded replaces it (old frames are dropped, nothing queues). Per camera and opacity
  in use it encodes at most `[page].stream_fps` frames per second, whatever the number of viewers
  (views of the same camera and opacity share one JPEG; opacity comes in steps of 10 %).
- A picture that cannot be drawn is logged once per camera and skipped; the thread keeps running.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from agent.logs import get_logger
from agent.page import render
from agent.page.live import LiveFeed, LivePart

log = get_logger(__name__)

ViewKey = tuple[str, int]  # (camera, opacity step)
TICK_S = 0.05  # how often a watched camera is looked at for a new part


@dataclass(frozen=True, slots=True)
class Encoded:
    """A JPEG of one part of a camera, drawn at one opacity."""

    number: int  # the part's number in the feed
    jpeg: bytes


@dataclass(frozen=True, slots=True)
class StreamSettings:
    fps: float
    width: int
    quality: int


class FrameEncoder:
    """Encodes the latest part of each watched camera, at most `fps` per camera."""

    def __init__(
        self,
        feed: LiveFeed,
        settings: StreamSettings,
        on_encoded: Callable[[str], None],
        on_viewers: Callable[[str, int], None],
    ) -> None:
        self._feed = feed
        self._settings = settings
        self._on_encoded = on_encoded
        self._on_viewers = on_viewers
        self._lock = threading.Lock()
        self._views: dict[ViewKey, int] = {}
        self._encoded: dict[ViewKey, Encoded] = {}
        self._last: dict[ViewKey, float] = {}  # when the view's last part was encoded
        self._failed: set[str] = set()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="page-encoder", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(2.0)

    def open(self, camera: str, opacity: int) -> ViewKey:
        """A viewer starts watching; the thread wakes up for it."""
        key = (camera, opacity)
        with self._lock:
            self._views[key] = self._views.get(key, 0) + 1
            viewers = self._viewers(camera)
        self._on_viewers(camera, viewers)
        self._wake.set()
        return key

    def close(self, key: ViewKey) -> None:
        """A viewer went away; the camera's last view closing stops its encoding and frees its JPEGs."""
        with self._lock:
            left = self._views.get(key, 0) - 1
            if left > 0:
                self._views[key] = left
            else:
                self._views.pop(key, None)
                self._encoded.pop(key, None)
            viewers = self._viewers(key[0])
        self._on_viewers(key[0], viewers)

    def _viewers(self, camera: str) -> int:
        return sum(n for (cam, _), n in self._views.items() if cam == camera)

    def current(self, key: ViewKey) -> Encoded | None:
        """The newest JPEG for a view, or None before the first."""
        with self._lock:
            return self._encoded.get(key)

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                keys = list(self._views)
            if not keys:
                self._wake.wait()
                self._wake.clear()
                continue
            for key in keys:
                self._encode_if_due(key)
            self._stopping.wait(min(TICK_S, 1.0 / self._settings.fps))

    def _encode_if_due(self, key: ViewKey) -> None:
        camera, opacity = key
        part = self._feed.latest(camera)
        if part is None or part.image is None:
            return
        with self._lock:
            done = self._encoded.get(key)
        if done is not None and done.number == part.number:
            return
        now = time.monotonic()
        if done is not None and now - self._last.get(key, 0.0) < 1.0 / self._settings.fps:
            return  # the cap: a newer part waits (and is replaced by newer ones) until the view is due
        jpeg = self._draw(camera, part, opacity)
        if jpeg is None:
            return
        with self._lock:
            if key in self._views:
                self._encoded[key] = Encoded(part.number, jpeg)
        self._last[key] = now
        self._on_encoded(camera)

    def _draw(self, camera: str, part: LivePart, opacity: int) -> bytes | None:
        assert part.image is not None
        s = self._settings
        try:
            return render.jpeg(render.overlay(part.image, part.prediction, s.width, opacity), s.quality)
        except Exception as exc:
            if camera not in self._failed:
                self._failed.add(camera)
                log.warning("live frame cannot be drawn; skipped", camera=camera, error=str(exc))
            return None
