"""The `[[cameras]]` entries: one frame source each, with the product class it sees.

`kind = "auto"` is resolved from `source` when the source starts (a folder may be created
after the config is checked), so `resolved_kind` and `resolved_queue_policy` are properties.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.section import Section
from agent.sources.genicam_config import GenICamConfig, missing_extra
from synthetic.kinds import DEFECT_KINDS, normalise_kind
from synthetic.kinds import TEXTURE_FAMILIES as FAMILIES

SYNTHETIC_PREFIX = "synthetic:"
TEMP_SUFFIXES = (".tmp", ".part")

SourceKind = Literal["opencv", "folder", "synthetic", "pylon", "genicam"]
GENICAM_KINDS = ("pylon", "genicam")
QueuePolicy = Literal["drop_oldest", "block"]
Acquisition = Literal["free-run", "triggered"]
TriggerSource = Literal["mqtt", "camera"]
SourceForm = Literal["device", "stream", "pipeline", "sequence", "path"]
LIVE_MAX_AGE_MS = 2000.0
VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv", ".ts", ".mjpg", ".mjpeg")


class SyntheticConfig(Section):
    """`[cameras.synthetic]`: generated parts for demos, soak tests and measuring detection rates."""

    defect_rate: float = Field(0.2, ge=0, le=1, description="Share of parts with one injected defect.")
    texture: str = Field("metal", description=f"Surface family: {', '.join(FAMILIES)}.")
    width: int = Field(320, ge=16, le=8192)
    height: int = Field(240, ge=16, le=8192)
    seed: int = Field(0, ge=0, description="Same seed, same images (frame n is the same part every run).")
    kinds: list[str] = Field(
        list(DEFECT_KINDS), min_length=1, description=f"Defect kinds injected: any of {', '.join(DEFECT_KINDS)}."
    )
    ground_truth: Path | None = Field(None, description="JSONL file: one line per emitted part, defective or not.")
    withhold_every: int = Field(
        0,
        ge=0,
        description="Triggered cameras: no frame for every n-th trigger (missed triggers, for tests); 0 = never.",
    )

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        try:
            return [normalise_kind(k) for k in value]
        except ValueError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("texture")
    @classmethod
    def _family(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"unknown texture {value!r}; expected one of {', '.join(FAMILIES)}")
        return value


class CameraConfig(Section):
    id: str = Field(..., description="Camera id, unique on this line.")
    source: str = Field(
        ...,
        description="Device index ('0'), URL (rtsp://, http://), video file, image folder, or 'synthetic:<name>'; "
        "kinds pylon and genicam: the camera's serial number or user-defined name (DeviceUserID).",
    )
    product_class: str = Field(..., description="What this camera sees, e.g. 'bottle' or 'pcb1'.")
    kind: Literal["auto", "opencv", "folder", "synthetic", "pylon", "genicam"] = Field(
        "auto",
        description="auto: 'synthetic:...' -> synthetic; a device index, URL or existing or video file -> opencv; "
        "else folder (one that does not exist yet is waited for). pylon (Basler, pypylon) and genicam (any GenTL "
        "producer, harvesters) are never chosen by auto.",
    )
    fps: float = Field(
        5.0,
        gt=0,
        le=1000,
        description="Frames per second to take (opencv, synthetic; a free-run GenICam camera's AcquisitionFrameRate).",
    )
    acquisition: Acquisition = Field(
        "free-run",
        description="free-run: frames at `fps`. triggered: one part per trigger, every frame the camera "
        "delivers is a part (none discarded by rate), idle is 'waiting for trigger', not stalled.",
    )
    trigger: TriggerSource = Field(
        "mqtt",
        description="Triggered cameras: mqtt (the PLC publishes <prefix>/<line>/<camera>/trigger with the part id; "
        "the next frame is bound to it) or camera (the camera triggers itself, e.g. a hardware line).",
    )
    trigger_timeout_ms: float = Field(
        1000.0, gt=0, le=600_000, description="A trigger with no frame this long after it came is a missed trigger."
    )
    queue_policy: QueuePolicy | None = Field(
        None, description="When the pipeline is full. None: drop_oldest for live streams, block for files/folders."
    )
    queue_size: int = Field(8, ge=1, le=10_000, description="Frames of this camera waiting for the engine.")
    max_age_ms: float | None = Field(
        None,
        ge=0,
        description="Frames older than this are dropped; 0 = no limit. None: 2000 for live streams, 0 for folders.",
    )
    stall_timeout_s: float = Field(5.0, gt=0, le=3600, description="No frame for this long: stalled, reconnect.")
    reconnect_min_s: float = Field(0.5, gt=0, le=3600, description="First wait before reconnecting or retrying.")
    reconnect_max_s: float = Field(30.0, gt=0, le=3600, description="Longest wait (the wait doubles up to it).")
    loop: bool = Field(False, description="Video files: start again at the end instead of ending.")
    after: Literal["move", "delete"] = Field("move", description="Folders: what to do with a file once emitted.")
    done_dir: Path | None = Field(None, description="Folders: where emitted files go; default <source>/done.")
    rejected_dir: Path | None = Field(None, description="Folders: unreadable files; default <source>/rejected.")
    settle_ms: float = Field(200.0, ge=0, le=600_000, description="Folders: a file's size must hold this long.")
    recursive: bool = Field(
        False,
        description="Folders: also take images in sub-folders (part id: the path below the folder without its "
        "extension, e.g. 'lot-7/part-000'; done/ and rejected/ keep the sub-folder). false: images in sub-folders "
        "are not read, and reported (a warning per sub-folder and the camera's status detail).",
    )
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    genicam: GenICamConfig = Field(default_factory=GenICamConfig)

    @field_validator("id")
    @classmethod
    def _id(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}", value):
            raise ValueError("must be letters, digits, '-' or '_'")
        return value

    @field_validator("product_class", "source")
    @classmethod
    def _non_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()

    @model_validator(mode="after")
    def _consistent(self) -> CameraConfig:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError(
                f"reconnect_min_s ({self.reconnect_min_s}) must not exceed reconnect_max_s ({self.reconnect_max_s})"
            )
        if self.acquisition == "triggered" and self.kind == "folder":
            raise ValueError(
                "acquisition: a folder camera is triggered by its files (each file is one part); remove "
                "acquisition = 'triggered'"
            )
        tuned = bool(self.synthetic.model_fields_set)  # an empty [cameras.synthetic] table is harmless
        if tuned and self.kind not in ("auto", "synthetic"):
            raise ValueError(
                f"synthetic: only for synthetic sources, not kind {self.kind!r} (remove the [cameras.synthetic] table)"
            )
        if tuned and self.kind == "auto" and not self.is_synthetic_source:
            raise ValueError(
                f"synthetic: only for synthetic sources (source starting {SYNTHETIC_PREFIX!r}); this camera's "
                f"source is {self.source!r}: remove its [cameras.synthetic] table"
            )
        self._check_genicam()
        return self

    def _check_genicam(self) -> None:
        """A [cameras.genicam] table only for GenICam kinds; their extra installed; a .cti for kind genicam."""
        if self.kind not in GENICAM_KINDS:
            if self.genicam != GenICamConfig():  # a table of defaults (a dumped config) is harmless
                raise ValueError(f"genicam: only for kinds pylon and genicam, not {self.kind!r}")
            return
        problem = missing_extra(self.kind)  # type: ignore[arg-type]
        if problem is not None:
            raise ValueError(problem)
        cti = self.genicam.cti
        if self.kind == "pylon" and cti is not None:
            raise ValueError("genicam.cti: only for kind genicam (pylon brings its own transport layers)")
        if self.kind == "genicam":
            if cti is None:
                raise ValueError("kind genicam needs genicam.cti: the GenTL producer (.cti file) of the camera")
            if not cti.is_file():
                raise ValueError(f"genicam.cti: {cti} is not a file (the vendor's GenTL producer, *.cti)")

    @property
    def mqtt_triggered(self) -> bool:
        """Whether the PLC triggers this camera over MQTT (one frame per trigger, bound to its part id)."""
        return self.acquisition == "triggered" and self.trigger == "mqtt"

    @property
    def is_synthetic_source(self) -> bool:
        return self.source.startswith(SYNTHETIC_PREFIX)

    @property
    def resolved_kind(self) -> SourceKind:
        """The source type `kind = "auto"` stands for, looking at the file system now."""
        if self.kind != "auto":
            return self.kind
        if self.is_synthetic_source:
            return "synthetic"
        path = os.path.expanduser(self.source)
        if os.path.isdir(path):
            return "folder"
        if self.device_index is not None or "://" in self.source or os.path.exists(path):
            return "opencv"  # a device index, a stream URL, a video file
        if path.startswith("/dev/") or any(c in self.source for c in "%!"):
            return "opencv"  # a device not enumerated yet, an image sequence pattern, a GStreamer pipeline
        if Path(path).suffix.lower() in VIDEO_SUFFIXES:
            return "opencv"  # a video file not there yet: retried until it is
        return (
            "folder"  # not there yet (a share mounted after boot, a typo): watched once it appears, else 'reconnecting'
        )

    @property
    def source_form(self) -> SourceForm:
        """What `source` names for OpenCV: a device (an index, a /dev node), a stream URL, a GStreamer pipeline,
        an image sequence pattern ('%04d'), or a path (a video file; a folder for kind folder)."""
        if self.device_index is not None or self.folder.as_posix().startswith("/dev/"):
            return "device"
        if "://" in self.source:
            return "stream"
        if "!" in self.source:
            return "pipeline"
        return "sequence" if "%" in self.source else "path"

    @property
    def device_index(self) -> int | None:
        """The camera index for a source like '0', else None."""
        return int(self.source) if self.source.isdigit() else None

    @property
    def is_live(self) -> bool:
        """Frames come whether or not we take them (a device or a stream), so old ones are worth dropping."""
        kind = self.resolved_kind
        if kind in ("synthetic", *GENICAM_KINDS):
            return True
        if kind == "folder":
            return False
        return (
            self.device_index is not None
            or "://" in self.source
            or os.path.expanduser(self.source).startswith("/dev/")
            or "!" in self.source  # a GStreamer pipeline: a camera
        )

    @property
    def resolved_queue_policy(self) -> QueuePolicy:
        """`queue_policy`, or the default for this source: drop_oldest for live streams, block for files."""
        if self.queue_policy is not None:
            return self.queue_policy
        return "drop_oldest" if self.is_live else "block"

    @property
    def resolved_max_age_ms(self) -> float:
        """`max_age_ms`, or the default: 2000 ms for live streams (a late result misses the reject), none
        for files and folders (every part is inspected; a file whose frame is dropped is tried again)."""
        if self.max_age_ms is not None:
            return self.max_age_ms
        return LIVE_MAX_AGE_MS if self.is_live else 0.0

    @property
    def folder(self) -> Path:
        return Path(os.path.expanduser(self.source))

    @property
    def resolved_done_dir(self) -> Path:
        return self.done_dir if self.done_dir is not None else self.folder / "done"

    @property
    def resolved_rejected_dir(self) -> Path:
        return self.rejected_dir if self.rejected_dir is not None else self.folder / "rejected"


def video_path_problem(path: Path) -> str | None:
    """What keeps `path` from being a video file, as the file system tells: None when it is a file."""
    if path.is_file():
        return None
    if path.is_dir():
        return "is a folder, not a video file (a folder of images: kind = 'folder' or 'auto')"
    return "file not found" if not path.exists() else "is not a regular file"
