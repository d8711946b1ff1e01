"""The `[mqtt]` and `[redis]` sections: where results go, and the credentials to get there."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from agent.section import Section


class TlsConfig(Section):
    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    insecure: bool = Field(default=False, description="Skip hostname verification (test benches only).")

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        """A missing or unreadable file is a config error now, not a TLS failure at every connect."""
        if value is not None:
            try:
                with open(os.path.expanduser(value), "rb"):
                    pass
            except OSError as exc:
                raise ValueError(f"cannot read {value}: {exc.strerror}") from None
        return value


class SecretSection(Section):
    """A section with a password that may come from the config, a file, or systemd credentials."""

    credential_name: ClassVar[str] = ""
    if TYPE_CHECKING:  # each subclass declares them, in its own field order
        password: SecretStr | None
        password_file: Path | None

    @field_validator("password_file", check_fields=False)
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        if value is not None:
            path = Path(os.path.expanduser(value))
            try:
                path.read_text()
            except OSError as exc:
                raise ValueError(f"cannot read password file {value}: {exc.strerror}") from None
        return value

    @model_validator(mode="after")
    def _resolve_password(self) -> SecretSection:
        resolved = resolve_secret(self.password, self.password_file, self.credential_name)
        if resolved is not self.password:
            object.__setattr__(self, "password", resolved)
        return self


class MqttConfig(SecretSection):
    credential_name: ClassVar[str] = "mqtt-password"

    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    username: str | None = None
    password: SecretStr | None = Field(None, description="Prefer password_file or systemd credentials.")
    password_file: Path | None = None
    topic_prefix: str = Field("genclip", description="Topics are <prefix>/<line id>/...")
    qos: int = Field(1, ge=1, le=2, description="QoS of reject, decision and command-response messages.")
    result_qos: int = Field(0, ge=0, le=2, description="QoS of result messages; 0 drops them while disconnected.")
    decisions: bool = Field(True, description="Publish a decision (reject or pass) for every part.")
    reject_uninspected: bool = Field(
        True, description="Reject a part dropped before it was inspected (its decision is ERROR either way)."
    )
    decision_window_ms: int = Field(
        2000, ge=1, le=3_600_000, description="How long a PLC waits for a decision; rejects expire after it."
    )
    send_margin_ms: int = Field(
        20,
        ge=0,
        le=60_000,
        description="A reject or decision with less than this left to its deadline is not sent (counted as expired): "
        "the time it needs to reach the PLC.",
    )
    client_id: str | None = Field(None, description="Default: genclip-<line id>.")
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_min_s: float = Field(1.0, gt=0, le=3600, description="First delay before reconnecting.")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="Longest delay between reconnect attempts.")
    outbox_size: int = Field(
        10_000,
        ge=1,
        description="Messages kept while the broker is unreachable, per lane (rejects/decisions, results).",
    )
    command_max_bytes: int = Field(4096, ge=64, le=1_048_576, description="Larger command payloads are refused.")
    heartbeat_s: float = Field(
        1.0, ge=0, le=60, description="Seconds between <prefix>/<line>/heartbeat messages; 0 turns them off."
    )

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value or any(c in value for c in "#+\0") or value.startswith("/") or value.endswith("/"):
            raise ValueError("must be a plain topic path without wildcards or leading/trailing '/'")
        return value

    @model_validator(mode="after")
    def _reconnect_order(self) -> MqttConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must not be less than reconnect_min_s")
        return self


class RedisConfig(SecretSection):
    credential_name: ClassVar[str] = "redis-password"

    url: str = Field("redis://127.0.0.1:6379/0", description="redis:// or rediss:// URL, no password in it.")
    username: str | None = Field(None, description="ACL user; default the URL's, else 'default'.")
    password: SecretStr | None = None
    password_file: Path | None = None
    stream_maxlen: int = Field(10_000, ge=1, description="Approximate length each stream is trimmed to.")
    maps: Literal["all", "ng", "none"] = Field("ng", description="Which frames get an anomaly-map PNG.")
    map_size: int | None = Field(None, ge=16, le=4096, description="PNG side in pixels; default the model's.")
    map_ttl_s: int = Field(3600, ge=1, description="How long stored anomaly maps live.")
    outbox_size: int = Field(10_000, ge=1, description="Entries kept while Redis is unreachable.")
    reconnect_min_s: float = Field(0.5, gt=0, le=3600, description="First delay before retrying Redis.")
    reconnect_max_s: float = Field(10.0, gt=0, le=3600, description="Longest delay between Redis retries.")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not re.match(r"^(redis|rediss|unix)://", value):
            raise ValueError("must start with redis://, rediss:// or unix://")
        if re.match(r"^rediss?://[^/]*:[^/@]*@", value):
            raise ValueError("must not contain a password; use redis.password_file or systemd credentials")
        return value

    @model_validator(mode="after")
    def _reconnect_order(self) -> RedisConfig:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must not be less than reconnect_min_s")
        return self


def resolve_secret(value: SecretStr | None, path: Path | None, credential: str) -> SecretStr | None:
    """A secret from the config/env, else from a file, else from systemd's credentials directory.

    An empty file or credential means "no password" (None): the installer creates the
    credential files empty, because systemd 252 refuses to start a unit whose
    `LoadCredential=` file is missing, and a line whose broker needs no password leaves them so.
    """
    if value is not None:
        return value
    if path is not None:
        return _read_secret(Path(os.path.expanduser(path)))
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / credential).is_file():
        return _read_secret(Path(cred_dir) / credential)
    return None


def _read_secret(path: Path) -> SecretStr | None:
    text = path.read_text().strip()
    return SecretStr(text) if text else None
