"""`[cameras.genicam]`: how a GenICam camera (kind "pylon" or "genicam") is set up when it is opened.

The camera itself is named by the `[[cameras]]` entry's `source`: its serial number or its user-defined
name (DeviceUserID). Its trigger follows the entry's acquisition mode (agent/sources/genicam_setup.py):
free-run (the camera paces itself at `fps`), triggered over MQTT (TriggerSource Software: each PLC trigger
executes TriggerSoftware) or triggered by the camera (`trigger = "camera"`: a hardware line, `line`,
`activation`, `delay_us` below). Unset values are left as the camera has them (its saved user set).

Which extra a kind needs and the pip command that installs it are here too (`missing_extra`), so a config
naming a kind whose library is not installed fails at `genclip config check` and at start.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from agent.section import Section

GenICamKind = Literal["pylon", "genicam"]
PixelFormat = Literal[
    "Mono8", "Mono10", "Mono12", "Mono16", "BayerRG8", "BayerGR8", "BayerGB8", "BayerBG8",
    "RGB8", "BGR8", "RGBa8", "BGRa8",
]  # fmt: skip
Activation = Literal["rising", "falling"]
FeatureValue = bool | int | float | str
EXTRAS: dict[GenICamKind, tuple[str, tuple[str, ...]]] = {
    "pylon": ("pylon", ("pypylon",)),
    "genicam": ("genicam", ("harvesters", "genicam")),
}


def missing_extra(kind: GenICamKind) -> str | None:
    """Why a camera of `kind` cannot run here (its library is not installed, with the pip command), or None."""
    extra, modules = EXTRAS[kind]
    missing = [name for name in modules if not _importable(name)]
    if not missing:
        return None
    return (
        f"kind {kind!r} needs the Python package(s) {', '.join(missing)}, not installed: "
        f"pip install 'genclip-inspect[{extra}]' (in the agent's environment, e.g. /opt/genclip/venv/bin/pip)"
    )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing; a module blocked in sys.modules
        return False


class GenICamConfig(Section):
    """`[cameras.genicam]`: image format, exposure, ROI and trigger line of a GenICam camera."""

    cti: Path | None = Field(
        None, description="kind genicam: the GenTL producer (.cti file) of the camera's vendor or transport."
    )
    pixel_format: PixelFormat | None = Field(
        None,
        description="Mono8 | Mono10 | Mono12 | Mono16 (scaled to 8 bit) | BayerRG8/GR8/GB8/BG8 (demosaiced) | "
        "RGB8 | BGR8 | RGBa8 | BGRa8; unset: as the camera is set (one of these).",
    )
    exposure_us: float | None = Field(None, gt=0, description="ExposureTime in microseconds (auto exposure off).")
    gain_db: float | None = Field(None, ge=0, description="Gain in dB (auto gain off).")
    width: int | None = Field(None, ge=1, description="ROI width in pixels; unset: as set on the camera.")
    height: int | None = Field(None, ge=1, description="ROI height in pixels.")
    offset_x: int | None = Field(None, ge=0, description="ROI left edge in pixels.")
    offset_y: int | None = Field(None, ge=0, description="ROI top edge in pixels.")
    line: str = Field("Line1", description="trigger = 'camera': the input line that triggers (Line1, Line2, ...).")
    activation: Activation = Field("rising", description="trigger = 'camera': the edge that triggers.")
    delay_us: float = Field(0.0, ge=0, description="trigger = 'camera': TriggerDelay in microseconds.")
    error_limit: int = Field(
        5, ge=1, le=1000, description="Grabs failing in a row before the camera is closed and opened again."
    )
    features: dict[str, FeatureValue] = Field(
        default_factory=dict,
        description="Other camera features, set in the given order after the ones above (e.g. "
        "BalanceWhiteAuto = 'Continuous'); a name the camera lacks is an error when it opens.",
    )

    @field_validator("line")
    @classmethod
    def _line(cls, value: str) -> str:
        if not value.startswith("Line") or not value[4:].isdigit():
            raise ValueError("must name an input line: Line1, Line2, ...")
        return value

    @field_validator("features")
    @classmethod
    def _feature_names(cls, value: dict[str, FeatureValue]) -> dict[str, FeatureValue]:
        for name in value:
            if not name.isidentifier():
                raise ValueError(f"{name!r} is not a GenICam feature name (letters, digits, '_')")
        return value
