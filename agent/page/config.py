"""The `[page]` section: the live page on the agent's HTTP port, who may use it, and what it may cost.

Operator actions (pause/resume, thresholds, marking parts) always need a login: a token, or a user name
and password. Secrets come from the config or the environment (`GENCLIP_PAGE__TOKEN`), a file
(`token_file`, `password_file`), or systemd credentials (`page-token`, `page-password` in
`$CREDENTIALS_DIRECTORY`), as the brokers' passwords do (agent/publish/config.py); they are never
printed or logged. Viewing is anonymous only with `anonymous_view = true`.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator, model_validator

from agent.publish.config import resolve_secret
from agent.section import Section

TOKEN_CREDENTIAL = "page-token"
PASSWORD_CREDENTIAL = "page-password"
MIN_SECRET_CHARS = 8


class PageConfig(Section):
    """`[page]`: the live page served beside /healthz and /metrics."""

    enabled: bool = Field(True, description="Serve the live page at / on [agent].health_host:health_port.")
    anonymous_view: bool = Field(
        False, description="Anyone who reaches the port may watch (never act) without logging in."
    )
    username: str | None = Field(None, min_length=1, max_length=64, description="Operator login with password.")
    password: SecretStr | None = Field(None, description="Prefer password_file or the page-password credential.")
    password_file: Path | None = None
    token: SecretStr | None = Field(None, description="Prefer token_file or the page-token credential.")
    token_file: Path | None = None
    session_hours: float = Field(12.0, gt=0, le=24 * 30, description="A login lasts this long.")
    stream_fps: float = Field(2.0, gt=0, le=30, description="Most frames per second encoded per watched camera.")
    stream_width: int = Field(640, ge=64, le=4096, description="Streamed frames are scaled down to this width.")
    jpeg_quality: int = Field(75, ge=10, le=100)
    ng_parts: int = Field(12, ge=1, le=200, description="NG parts kept for the page's thumbnails (with pictures).")

    @field_validator("password_file", "token_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                Path(os.path.expanduser(value)).read_text()
            except OSError as exc:
                raise ValueError(f"cannot read {value}: {exc.strerror}") from None
        return value

    @model_validator(mode="after")
    def _resolve_secrets(self) -> PageConfig:
        password = resolve_secret(self.password, self.password_file, PASSWORD_CREDENTIAL)
        token = resolve_secret(self.token, self.token_file, TOKEN_CREDENTIAL)
        for name, secret in (("password", password), ("token", token)):
            if secret is not None and len(secret.get_secret_value()) < MIN_SECRET_CHARS:
                raise ValueError(f"page {name} is shorter than {MIN_SECRET_CHARS} characters")
        if password is not None and self.username is None:
            raise ValueError("a page password needs [page].username")
        object.__setattr__(self, "password", password)
        object.__setattr__(self, "token", token)
        return self

    @property
    def can_log_in(self) -> bool:
        """Whether any login is configured (without one, nobody can act on the line from the page)."""
        return self.token is not None or (self.username is not None and self.password is not None)
