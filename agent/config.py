"""The root configuration: one pydantic tree that mirrors `config.toml`.

Each package owns its section (`model.config.EngineConfig` is `[model]`); this module
composes the sections the service runs on, adds the agent's own, and loads the file with
environment overrides (`GENCLIP_MQTT__HOST=...`) on top. Unknown keys are errors everywhere,
so a misspelt key is reported instead of silently ignored. `[trainer]` belongs to the trainer,
which the agent does not import: `InspectConfig` keeps its place in the file, and the command
line's file model (`cli.settings.GenclipConfig`) validates it as `trainer.config.TrainerConfig`.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.opcua.config import OpcuaConfig
from agent.opcua.nodes import clashing_cameras
from agent.page.config import PageConfig
from agent.publish.config import MqttConfig, RedisConfig
from agent.section import Section
from agent.sources.config import CameraConfig
from model.config import EngineConfig, normalise_class_name

ENV_PREFIX = "GENCLIP_"
DEFAULT_CONFIG_PATHS = (Path("config.toml"), Path("/etc/genclip/config.toml"))


def _reference_folder(value: Path) -> Path:
    """A class's good-part folder must exist when the line starts: it decides the class word and threshold."""
    folder = Path(os.path.expanduser(value))
    if not os.path.isdir(folder):  # os.path: an over-long name is 'not found', not an OSError
        raise ValueError(f"reference folder not found: {value}")
    return folder


def _state_dir(value: Path | None) -> Path | None:
    """The state directory may not exist yet (it is created at start), but must not be a file."""
    if value is None:
        return None
    folder = Path(os.path.expanduser(value))
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ValueError(f"not a directory: {value}")
    return folder


class LineConfig(Section):
    """Which production line this agent serves; the id appears in topics, streams and logs."""

    id: str = Field("line-1", description="Short id: lower-case letters, digits, '-' and '_'.")
    name: str = Field("Line 1", description="Human-readable name for dashboards.")

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", value):
            raise ValueError("must be 1-63 lower-case letters, digits, '-' or '_', starting with a letter or digit")
        return value


class BatchConfig(Section):
    """`[engine]`: how frames are grouped into batches for the engine worker."""

    batch_size: int = Field(8, ge=1, le=256, description="Largest batch sent to the engine.")
    max_wait_ms: float = Field(20.0, ge=0, le=10_000, description="Longest a frame waits for its batch to fill.")
    threads: int = Field(0, ge=0, le=512, description="torch intra-op CPU threads; 0 = torch's default (one per core).")
    interop_threads: int = Field(0, ge=0, le=64, description="torch inter-op CPU threads; 0 = torch's default.")
    pipeline: Literal["auto", "on", "off"] = Field(
        "auto",
        description="on: build a batch's results (maps, defect regions) on the result thread while the engine "
        "scores the next batch; off: on the engine thread first; auto: on with a GPU, off on the CPU.",
    )


class AgentConfig(Section):
    health_host: str = "127.0.0.1"
    health_port: int = Field(
        8321, ge=0, le=65535, description="HTTP port for /healthz, /metrics and the live page; 0 = any free port."
    )
    publish_queue: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Scored frames waiting for their results to be built and published (whole batches, at least "
        "two); when it is full the engine waits and frames wait, or expire, in their camera queues.",
    )
    prompt_dir: Path | None = Field(None, description="Folder watched for new prompt checkpoints.")
    shutdown_timeout_s: float = Field(
        10.0,
        ge=0,
        le=50,
        description="On stop: time to score and publish what is queued and flush the brokers (at most 50 s, so the "
        "whole stop stays inside the unit's TimeoutStopSec=90s).",
    )
    stall_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="A batch running longer than this, or no results published for this long while the engine "
        "waits on them, marks the agent hung: /healthz fails and the systemd watchdog pings stop.",
    )
    reload_debounce_s: float = Field(
        0.5, ge=0, le=60, description="Quiet time after a checkpoint is published before it is loaded (bursts: once)."
    )
    state_dir: Annotated[Path | None, AfterValidator(_state_dir)] = Field(
        None,
        description="The line's state: the lock that keeps a second agent for the line from starting, the "
        "fail-safe journal and the operator's changes (operator.json). Default: "
        "$STATE_DIRECTORY/<line> under systemd (/var/lib/genclip/<line>), else $XDG_STATE_HOME/genclip/<line>.",
    )
    keep_operator_changes: bool = Field(
        True,
        description="Thresholds and pauses set by MQTT command are kept in <state_dir>/operator.json and restored "
        "at start (a commanded threshold yields to a [thresholds] value changed since); false: every start "
        "resets them.",
    )
    confirm_good: bool = Field(
        False,
        description="Accept the confirm-good command: parts an operator confirms good (by part id) grow their "
        "class's patch memory ([model].memory_weight > 0), kept beside the class profile ([model].profile_dir).",
    )
    confirm_good_parts: int = Field(
        256,
        ge=1,
        le=100_000,
        description="Pictures of the last scored parts kept in memory for confirm-good (only while it is on).",
    )


class LoggingConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "json", "console"] = Field("auto", description="auto: console on a terminal, else JSON.")


class InspectConfig(BaseSettings):
    """The whole configuration of one production line."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
        nested_model_default_partial_update=True,
    )

    line: LineConfig = Field(default_factory=LineConfig)
    model: EngineConfig = Field(default_factory=dict, validate_default=True)
    engine: BatchConfig = Field(default_factory=BatchConfig)
    cameras: list[CameraConfig] = Field(default_factory=list)
    thresholds: dict[str, float] = Field(default_factory=dict, description="Image-score threshold per class.")
    references: dict[str, Annotated[Path, AfterValidator(_reference_folder)]] = Field(
        default_factory=dict,
        description="Per class: a folder of good-part images that decides its class word and threshold at start "
        "and recalibrates it on every new prompt version.",
    )
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    redis: RedisConfig = Field(default_factory=RedisConfig)
    opcua: OpcuaConfig = Field(default_factory=OpcuaConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    page: PageConfig = Field(default_factory=PageConfig)
    trainer: object = Field(
        default_factory=dict,
        description="The trainer's section: kept as written, read by nothing in agent/; "
        "cli.settings.GenclipConfig validates it.",
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings)

    @field_validator("thresholds")
    @classmethod
    def _thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for name, t in value.items():
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"{name}: {t} is outside 0..1")
        return value

    @field_validator("cameras")
    @classmethod
    def _unique_cameras(cls, value: list[CameraConfig]) -> list[CameraConfig]:
        ids = [c.id for c in value]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"camera ids must be unique; repeated: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _classes_on_this_line(self) -> InspectConfig:
        """A threshold or reference folder for a class no camera inspects is a typo until proven otherwise:
        silently ignored, the line would run on the default threshold instead of the one meant."""
        if not self.cameras:  # a config for `genclip score` or the trainer only
            return self
        classes = {normalise_class_name(c.product_class) for c in self.cameras}
        problems = [
            f"{section}.{name}: no camera on this line inspects class {name!r} "
            f"(its cameras' classes: {', '.join(sorted(classes))})"
            for section, keys in (("thresholds", self.thresholds), ("references", self.references))
            for name in keys
            if normalise_class_name(name) not in classes
        ]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _opcua_node_ids(self) -> InspectConfig:
        """A camera's OPC UA node id `<line>.<camera>` must not be one of the line's own (`<line>.Status`, ...)."""
        clash = clashing_cameras([c.id for c in self.cameras]) if self.opcua.enabled else []
        if clash:
            raise ValueError(
                f"cameras: id {', '.join(clash)} is the name of an OPC UA line variable; rename the camera"
            )
        return self

    @model_validator(mode="after")
    def _confirm_good_kept(self) -> InspectConfig:
        """A memory grown over MQTT must survive a restart: it is kept beside the class profiles."""
        if self.agent.confirm_good and self.model.profile_dir is None:
            raise ValueError(
                "agent.confirm_good: needs [model].profile_dir, where the grown patch memories are kept across restarts"
            )
        return self

    def product_classes(self) -> list[str]:
        """Every product class this line inspects, in camera order."""
        return list(dict.fromkeys(c.product_class for c in self.cameras))


class ConfigError(Exception):
    """The configuration cannot be used; `errors` lists every problem as 'section.key: what is wrong'."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))


def find_config(path: Path | None) -> Path | None:
    """The config file to use: the one given, $GENCLIP_CONFIG, ./config.toml, /etc/genclip/config.toml."""
    if path is not None:
        return path
    env = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if env:
        return Path(env)
    return next((p for p in DEFAULT_CONFIG_PATHS if p.is_file()), None)


ConfigT = TypeVar("ConfigT", bound=InspectConfig)


def load_config(path: Path | None = None) -> InspectConfig:
    """Read, merge with the environment, validate. Raises ConfigError listing every problem."""
    return load_as(InspectConfig, path)


def load_as(model: type[ConfigT], path: Path | None = None) -> ConfigT:
    """`load_config` into `model`: InspectConfig, or a file model that adds sections' schemas to it."""
    path = find_config(path)
    source = str(path) if path else "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(source, ["file not found"]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(source, [f"cannot read: {exc}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    settings = environment_settings()
    problems = [unknown_variable(var, loc) for var, loc in settings.items() if loc[0] not in model.model_fields]
    try:
        config = model(**data)
    except ValidationError as exc:
        raise ConfigError(source, problems + format_errors(exc, settings)) from None
    if problems:
        raise ConfigError(source, problems)
    return config


NOT_SETTINGS = ("CONFIG", "STATE_DIR")  # GENCLIP_CONFIG (which file), GENCLIP_STATE_DIR (deploy/services.sh)


def unknown_variable(var: str, loc: tuple[str, ...]) -> str:
    """Why a GENCLIP_* variable sets nothing (pydantic-settings would ignore it silently)."""
    if len(loc) == 1:
        return (
            f"environment variable {var}: not a setting; a section and its key are joined by two underscores "
            f"({ENV_PREFIX}{var[len(ENV_PREFIX) :].replace('_', '__', 1).upper()})"
        )
    return f"environment variable {var}: no section '{loc[0]}' (sections: {', '.join(InspectConfig.model_fields)})"


def environment_settings() -> dict[str, tuple[str, ...]]:
    """GENCLIP_* variables that set config keys, with the key path each sets, e.g. ('engine', 'batch_size')."""
    found = {}
    for var in os.environ:
        name = var.upper().removeprefix(ENV_PREFIX)
        if var.upper().startswith(ENV_PREFIX) and name not in NOT_SETTINGS:
            found[var] = tuple(name.lower().split("__"))
    return found


def format_errors(exc: ValidationError, settings: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """pydantic's errors as 'section.key: message' lines a line engineer can act on; a key set from the
    environment names its variable (the file is not where to look then)."""
    from_env = {loc: var for var, loc in (settings or {}).items()}
    lines = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        var = next((from_env[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in from_env), None)
        where = ".".join(loc) + (f" (from {var})" if var else "")
        message = err["msg"].removeprefix("Value error, ")
        if not where:  # a check across sections: its message names the keys
            lines.extend(message.split("; "))
            continue
        if err["type"] == "extra_forbidden":
            message = "unknown key (misspelt, or not in this section)"
        elif err["type"] == "missing":
            message = "required key is missing"
        lines.append(f"{where}: {message}")
    return lines


def masked_dict(config: InspectConfig) -> dict[str, Any]:
    """The effective config as plain data, secrets masked, paths as strings, no None values (TOML has none)."""

    def clean(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return "********"
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return clean(config.model_dump(mode="python"))
