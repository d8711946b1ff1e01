"""Who is using the page: logins checked against the `[page]` credentials, and sessions held in memory.

A login is the token (user "token") or the configured user name and password; secrets are compared in
constant time. A successful login gets a random session id (an HttpOnly, SameSite=Strict cookie) that
lasts `[page].session_hours`; sessions live in the agent's memory, so a restart logs everyone out. API
clients may send `Authorization: Bearer <token>` instead of a cookie. At most `MAX_SESSIONS` are kept
(the oldest goes first). No login is ever anonymous.
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from agent.page.config import PageConfig

COOKIE = "genclip_session"
MAX_SESSIONS = 256
TOKEN_USER = "token"


class LoginRequest(BaseModel):
    """What the login form sends: the token, or a user name and password."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: str | None = Field(None, max_length=1024)
    username: str | None = Field(None, max_length=64)
    password: str | None = Field(None, max_length=1024)


@dataclass(frozen=True, slots=True)
class Session:
    user: str
    expires_mono: float


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


class Logins:
    """Checks logins and keeps their sessions; thread-safe."""

    def __init__(self, config: PageConfig) -> None:
        self.config = config
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, login: LoginRequest) -> str | None:
        """The user a login is for, or None when it is wrong (or nothing is configured to log in with)."""
        cfg = self.config
        if login.token is not None and cfg.token is not None:
            return TOKEN_USER if _same(login.token, cfg.token.get_secret_value()) else None
        if login.username is not None and login.password is not None and cfg.password is not None:
            user_ok = cfg.username is not None and _same(login.username, cfg.username)
            password_ok = _same(login.password, cfg.password.get_secret_value())
            return login.username if user_ok and password_ok else None
        return None

    def bearer(self, token: str) -> str | None:
        """The user of an `Authorization: Bearer` token, or None."""
        configured = self.config.token
        return TOKEN_USER if configured is not None and _same(token, configured.get_secret_value()) else None

    def open(self, user: str) -> str:
        """A new session for `user`; its id (the cookie's value)."""
        session_id = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[session_id] = Session(user, time.monotonic() + self.config.session_hours * 3600.0)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return session_id

    def user(self, session_id: str | None) -> str | None:
        """Who a session belongs to, or None (no such session, or expired)."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None:
                return None
            if session.expires_mono < time.monotonic():
                del self._sessions[session_id]
                return None
            return session.user

    def close(self, session_id: str | None) -> None:
        if session_id:
            with self._lock:
                self._sessions.pop(session_id, None)
