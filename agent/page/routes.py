"""The page's HTTP endpoints, mounted on the agent's HTTP port (agent/health.py).

Viewing (the anonymous part only with `[page].anonymous_view`):
- `GET /`, `/static/*`: the page itself (always served: without a login it shows the login form);
- `GET /api/session`: who is logged in and how one may log in;
- `GET /api/state`: the line's state, the latest part of each camera and the last NG parts;
- `GET /api/events`: server-sent events: `part` (each NG or ERROR part and the newest of each camera, at most
  every EVENT_TICK_S) and `state` (every STATE_S: status, brokers, cameras with counters, classes);
- `GET /stream/<camera>.mjpg?overlay=<0..100>`: the camera's frames as MJPEG, heat map blended in at that
  opacity, defect boxes labelled; encoded only while the stream is open (agent/page/encoder.py);
- `GET /snapshot/<camera>.jpg?overlay=..`: the latest part as one JPEG (tiles past the first MAX_STREAMS of
  static/page.js poll it: a browser holds only about six connections per server);
- `GET /api/parts/<n>/thumb.jpg|frame.jpg|map.jpg`: a kept part's thumbnail, full frame and heat map.

Operator actions (a login, always; `401` otherwise) run through the same command table as MQTT commands
(`service.handle_command`, agent/commands.py), so they are validated, logged, saved in operator.json and
published in the retained info exactly as an MQTT command would be:
- `POST /api/cameras/<camera>/pause|resume`, `POST /api/classes/<class>/threshold {"value": v}`;
- `POST /api/parts/<n>/review {"label": "good"|"defect", "note": "..."}`: appended to the Redis stream
  `genclip:<line>:reviews` (agent/publish/redis_streams.py) with the part's own fields and the user; a part
  marked good also goes to its class's patch memory when `[agent].confirm_good` is on (the `confirm-good`
  command), and the answer's `memory` says what that did.
Every POST must be `application/json` (a cross-site form cannot send it), and the session cookie is
SameSite=Strict. Logins: `POST /api/login`, `POST /api/logout` (agent/page/auth.py).
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from agent.control import CommandError, parse_command
from agent.logs import get_logger
from agent.page import render
from agent.page.auth import COOKIE, LoginRequest, Logins
from agent.page.config import PageConfig
from agent.page.encoder import FrameEncoder, StreamSettings
from agent.page.live import LiveFeed, LivePart
from agent.page.views import LinePort, line_json, part_json
from agent.results import JsonObject, iso

log = get_logger(__name__)

STATIC = Path(__file__).parent / "static"
EVENT_TICK_S = 0.25
STATE_S = 1.0
STREAM_POLL_S = 0.05
FAILED_LOGIN_DELAY_S = 1.0
THUMB_WIDTH = 240
FULL_WIDTH = 1920
PICTURE_CACHE = 64
DEFAULT_OPACITY = 40
NO_STORE = {"Cache-Control": "no-store"}
BOUNDARY = b"frame"


class ThresholdBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    value: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)


class ReviewBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    label: Literal["good", "defect"]
    note: str = Field("", max_length=500)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message}, status, headers=NO_STORE)


class Page:
    """The live page of one line: its feed, encoder, logins and endpoints."""

    def __init__(
        self, config: PageConfig, line: LinePort, line_id: str, cameras: list[str], grows_memory: bool = False
    ) -> None:
        self.config = config
        self.line = line
        self.grows_memory = grows_memory  # [agent].confirm_good: a part marked good joins its class's patch memory
        self.line_id = line_id
        self.cameras = cameras
        self.feed = LiveFeed(config.ng_parts)
        metrics = line.metrics
        self.encoder = FrameEncoder(
            self.feed,
            StreamSettings(config.stream_fps, config.stream_width, config.jpeg_quality),
            on_encoded=lambda camera: metrics.page_frames_encoded.labels(camera=camera).inc(),
            on_viewers=lambda camera, n: metrics.page_viewers.labels(camera=camera).set(n),
        )
        self.logins = Logins(config)
        self._closing = threading.Event()
        self._pictures: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._pictures_lock = threading.Lock()

    def start(self) -> None:
        self.encoder.start()
        if not self.config.can_log_in:
            log.warning(
                "the live page has no login configured: nobody can act on the line from it",
                fix="set [page].token_file, or username and password_file (or the page-token / page-password "
                "credentials)",
            )

    def stop(self) -> None:
        """Open streams end (before the HTTP server stops), the encoder thread ends."""
        self._closing.set()
        self.encoder.stop()

    # --- who is asking ----------------------------------------------------------------------------------
    def user(self, request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return self.logins.bearer(auth[7:].strip())
        return self.logins.user(request.cookies.get(COOKIE))

    def may_view(self, request: Request) -> bool:
        return self.config.anonymous_view or self.user(request) is not None

    # --- routes ------------------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/", self.index),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
            Route("/api/session", self.session),
            Route("/api/login", self.login, methods=["POST"]),
            Route("/api/logout", self.logout, methods=["POST"]),
            Route("/api/state", self.state),
            Route("/api/events", self.events),
            Route("/stream/{camera}.mjpg", self.stream),
            Route("/snapshot/{camera}.jpg", self.snapshot),
            Route("/api/parts/{number:int}/{kind}.jpg", self.picture),
            Route("/api/parts/{number:int}/review", self.review, methods=["POST"]),
            Route("/api/cameras/{camera}/{action}", self.camera_action, methods=["POST"]),
            Route("/api/classes/{name}/threshold", self.threshold, methods=["POST"]),
        ]

    async def index(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers=NO_STORE)

    async def session(self, request: Request) -> Response:
        user = self.user(request)
        cfg = self.config
        return JSONResponse(
            {
                "user": user,
                "can_view": cfg.anonymous_view or user is not None,
                "anonymous_view": cfg.anonymous_view,
                "login": {"token": cfg.token is not None, "password": cfg.password is not None},
                "line": self.line_id,
            },
            headers=NO_STORE,
        )

    async def login(self, request: Request) -> Response:
        body = await self._json(request)
        if isinstance(body, Response):
            return body
        try:
            login = LoginRequest.model_validate(body)
        except ValidationError:
            return error(400, 'send {"token": ...} or {"username": ..., "password": ...}')
        user = self.logins.check(login)
        if user is None:
            log.warning("page login refused", client=_client(request))
            await asyncio.sleep(FAILED_LOGIN_DELAY_S)  # slows guessing down
            return error(401, "wrong token, or wrong user name or password")
        log.info("page login", user=user, client=_client(request))
        response = JSONResponse({"ok": True, "user": user}, headers=NO_STORE)
        response.set_cookie(
            COOKIE,
            self.logins.open(user),
            max_age=int(self.config.session_hours * 3600),
            httponly=True,
            samesite="strict",
            path="/",
        )
        return response

    async def logout(self, request: Request) -> Response:
        self.logins.close(request.cookies.get(COOKIE))
        response = JSONResponse({"ok": True}, headers=NO_STORE)
        response.delete_cookie(COOKIE, path="/")
        return response

    async def state(self, request: Request) -> Response:
        if not self.may_view(request):
            return error(401, "log in to watch this line")
        return JSONResponse(await run_in_threadpool(self._state), headers=NO_STORE)

    def _state(self) -> JsonObject:
        latest = [self.feed.latest(camera) for camera in self.cameras]
        return {
            **line_json(self.line),
            "latest": [part_json(p) for p in latest if p is not None],
            "ng_parts": [part_json(p) for p in self.feed.ng_parts()],
        }

    async def events(self, request: Request) -> Response:
        if not self.may_view(request):
            return error(401, "log in to watch this line")
        return StreamingResponse(
            self._event_stream(), media_type="text/event-stream", headers={**NO_STORE, "X-Accel-Buffering": "no"}
        )

    async def _event_stream(self) -> AsyncIterator[bytes]:
        gauge = self.line.metrics.page_event_clients
        gauge.inc()
        try:
            last, _ = self.feed.since(-1)
            state_due = 0.0
            yield b"retry: 2000\n\n"
            loop = asyncio.get_running_loop()
            while not self._closing.is_set():
                if loop.time() >= state_due:
                    state_due = loop.time() + STATE_S
                    yield _event("state", await run_in_threadpool(line_json, self.line))
                last, parts = self.feed.since(last)
                for part in _coalesced(parts):
                    yield _event("part", part_json(part))
                await asyncio.sleep(EVENT_TICK_S)
        finally:
            gauge.dec()

    async def stream(self, request: Request) -> Response:
        view = self._camera_view(request)
        if isinstance(view, Response):
            return view
        camera, opacity = view
        return StreamingResponse(
            self._mjpeg(camera, opacity),
            media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY.decode()}",
            headers=NO_STORE,
        )

    def _camera_view(self, request: Request) -> tuple[str, int] | Response:
        """The camera and overlay opacity a picture request asks for, or the error answer."""
        if not self.may_view(request):
            return error(401, "log in to watch this line")
        camera = request.path_params["camera"]
        if camera not in self.cameras:
            return error(404, f"no camera {camera!r} on this line")
        try:
            opacity = render.opacity_step(float(request.query_params.get("overlay", DEFAULT_OPACITY)))
        except ValueError:
            return error(400, "overlay must be a number from 0 to 100")
        return camera, opacity

    async def _mjpeg(self, camera: str, opacity: int) -> AsyncIterator[bytes]:
        key = self.encoder.open(camera, opacity)  # in the generator: a stream never started opens nothing
        try:
            yield b"--" + BOUNDARY + b"\r\n"
            sent = -1
            while not self._closing.is_set():
                frame = self.encoder.current(key)
                if frame is not None and frame.number != sent:
                    sent = frame.number
                    head = b"Content-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % len(frame.jpeg)
                    # the boundary right after the picture: browsers show a part once the next one starts
                    yield head + frame.jpeg + b"\r\n--" + BOUNDARY + b"\r\n"
                await asyncio.sleep(STREAM_POLL_S)
        finally:
            self.encoder.close(key)

    async def snapshot(self, request: Request) -> Response:
        """The camera's latest part as one JPEG (tiles past the page's few live streams poll it)."""
        view = self._camera_view(request)
        if isinstance(view, Response):
            return view
        camera, opacity = view
        part = self.feed.latest(camera)
        if part is None or part.image is None:
            return error(404, f"no picture from camera {camera} yet")
        data = await run_in_threadpool(self._snapshot, part, opacity)
        return Response(data, media_type="image/jpeg", headers=NO_STORE)

    def _snapshot(self, part: LivePart, opacity: int) -> bytes:
        assert part.image is not None
        cfg = self.config
        data = render.jpeg(render.overlay(part.image, part.prediction, cfg.stream_width, opacity), cfg.jpeg_quality)
        self.line.metrics.page_frames_encoded.labels(camera=part.inspection.camera).inc()
        return data

    async def picture(self, request: Request) -> Response:
        if not self.may_view(request):
            return error(401, "log in to watch this line")
        number, kind = request.path_params["number"], request.path_params["kind"]
        if kind not in ("thumb", "frame", "map"):
            return error(404, "pictures: thumb.jpg, frame.jpg, map.jpg")
        part = self.feed.picture(number)
        if part is None or part.image is None or (kind == "map" and part.prediction is None):
            return error(404, f"part {number} is no longer kept (only the last NG parts and the latest of each camera)")
        data = await run_in_threadpool(self._picture, part, kind)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    def _picture(self, part: LivePart, kind: str) -> bytes:
        key = (part.number, kind)
        with self._pictures_lock:
            cached = self._pictures.get(key)
        if cached is not None:
            return cached
        assert part.image is not None
        quality = self.config.jpeg_quality
        if kind == "thumb":
            data = render.jpeg(render.overlay(part.image, part.prediction, THUMB_WIDTH, DEFAULT_OPACITY), quality)
        elif kind == "frame":
            data = render.jpeg(render.scaled(part.image, FULL_WIDTH), quality)
        else:
            assert part.prediction is not None
            data = render.jpeg(render.heat(part.prediction, FULL_WIDTH, part.image.shape), quality)
        with self._pictures_lock:
            self._pictures[key] = data
            while len(self._pictures) > PICTURE_CACHE:
                self._pictures.popitem(last=False)
        return data

    # --- operator actions --------------------------------------------------------------------------------
    async def camera_action(self, request: Request) -> Response:
        action = request.path_params["action"]
        if action not in ("pause", "resume"):
            return error(404, "camera actions: pause, resume")
        return await self._command(request, action, {"camera": request.path_params["camera"]})

    async def threshold(self, request: Request) -> Response:
        body = await self._json(request)
        if isinstance(body, Response):
            return body
        try:
            value = ThresholdBody.model_validate(body).value
        except ValidationError as exc:
            return error(400, f"threshold: {exc.errors()[0]['msg']}")
        return await self._command(request, "threshold", {"class": request.path_params["name"], "value": value})

    async def _command(self, request: Request, name: str, args: dict[str, object]) -> Response:
        user = self.user(request)
        if user is None:
            return error(401, "operator actions need a login")
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error(415, "send the action as application/json")
        try:
            command = parse_command(name, json.dumps(args).encode())
            answer = await run_in_threadpool(self.line.handle_command, command)
        except (CommandError, ValueError) as exc:
            log.warning("operator action refused", via="page", user=user, command=name, error=str(exc))
            return error(400, str(exc))
        log.info("operator action", via="page", user=user, command=name, **{k: str(v) for k, v in args.items()})
        return JSONResponse({"command": name, **answer, "ok": True, "user": user}, headers=NO_STORE)

    async def review(self, request: Request) -> Response:
        user = self.user(request)
        if user is None:
            return error(401, "operator actions need a login")
        body = await self._json(request)
        if isinstance(body, Response):
            return body
        try:
            review = ReviewBody.model_validate(body)
        except ValidationError as exc:
            return error(400, f"review: {exc.errors()[0]['msg']}")
        inspection = self.feed.recent(request.path_params["number"])
        if inspection is None:
            return error(404, "part not found among the recent parts")
        result = inspection.result
        model = result.get("model")
        fields = {
            "line": inspection.line,
            "camera": inspection.camera,
            "part_id": inspection.part_id,
            "seq": str(inspection.seq),
            "run_id": inspection.run_id,
            "product_class": inspection.product_class,
            "verdict": inspection.verdict,
            "score": "" if inspection.score is None else str(inspection.score),
            "threshold": str(result.get("threshold") or ""),
            "prompt_version": str(model.get("prompt_version", "")) if isinstance(model, dict) else "",
            "map_key": str(result.get("map_key") or ""),
            "captured_at": iso(inspection.captured_at),
            "label": review.label,
            "note": review.note,
            "user": user,
            "reviewed_at": iso(datetime.now(UTC)),
        }
        try:
            entry = await run_in_threadpool(self.line.record_review, fields)
        except Exception as exc:
            log.warning("part review not recorded", user=user, part=inspection.part_id, error=str(exc))
            return error(503, f"not recorded: Redis did not take it ({exc})")
        log.info("part reviewed", via="page", user=user, part=inspection.part_id, label=review.label, entry=entry)
        memory = await self._confirm_good(inspection.part_id) if review.label == "good" else None
        return JSONResponse({"ok": True, "entry": entry, **fields, "memory": memory}, headers=NO_STORE)

    async def _confirm_good(self, part_id: str) -> str | None:
        """A part marked good joins its class's patch memory when the line grows memories ([agent].confirm_good)."""
        if not self.grows_memory:
            return None
        try:
            command = parse_command("confirm-good", json.dumps({"parts": [part_id]}).encode())
            answer = await run_in_threadpool(self.line.handle_command, command)
        except (CommandError, ValueError) as exc:
            return f"not added to the patch memory: {exc}"
        return f"added to the patch memory: {json.dumps(answer, default=str)}"

    async def _json(self, request: Request) -> dict[str, object] | Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return error(415, "send application/json")
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object")
        return body


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _event(name: str, data: JsonObject) -> bytes:
    body = json.dumps(data, separators=(",", ":"), default=str)
    return f"event: {name}\ndata: {body}\n\n".encode()


def _coalesced(parts: list[LivePart]) -> list[LivePart]:
    """Every NG part, and the newest part of each camera; in order."""
    newest = {p.inspection.camera: p.number for p in parts}
    return [p for p in parts if p.inspection.verdict != "OK" or newest[p.inspection.camera] == p.number]
