"""Setting a GenICam camera up from its `[[cameras]]` entry, through the standard feature names (SFNC).

`Features` is what both kinds offer (pypylon's node map, harvesters' node map: agent/sources/pylon.py,
agent/sources/gentl.py); `configure` writes the entry's settings in the order cameras need: the trigger
off first (some features are locked while it is on), pixel format, ROI (offsets to 0, then size, then
offsets), exposure and gain with their auto modes off, then the acquisition mode:
- free-run: TriggerMode Off, AcquisitionFrameRate = `fps` (where the camera has it);
- triggered over MQTT: FrameStart trigger from Software (the source executes TriggerSoftware per trigger);
- triggered by the camera: FrameStart trigger from `genicam.line` on the `activation` edge, `delay_us` later;
then `genicam.features` in their order. Older Basler names (ExposureTimeAbs, AcquisitionFrameRateAbs,
TriggerDelayAbs) are used where the SFNC name is missing. A setting the camera refuses raises FeatureError
naming the feature, the value and the camera's reason; it returns the pixel format frames will come in.
"""

from __future__ import annotations

from typing import Protocol

from agent.sources.base import SourceError
from agent.sources.config import CameraConfig
from agent.sources.genicam_config import FeatureValue
from agent.sources.pixels import ALIASES, PixelFormatError, canonical

EDGES = {"rising": "RisingEdge", "falling": "FallingEdge"}


class FeatureError(SourceError):
    """The camera refused a setting, or lacks a feature the configuration needs."""


class Features(Protocol):
    """A camera's GenICam features by name (the device's node map)."""

    def available(self, name: str) -> bool:
        """The camera has the feature and it can be read or written now."""
        ...

    def get(self, name: str) -> str:
        """The value as text (an enumeration's entry name)."""
        ...

    def set(self, name: str, value: FeatureValue) -> None:
        """Write the value; FeatureError saying why when the camera refuses it."""
        ...

    def execute(self, name: str) -> None:
        """Run a command feature (TriggerSoftware)."""
        ...

    def entries(self, name: str) -> tuple[str, ...]:
        """An enumeration's entries the camera offers now."""
        ...


def first_line(exc: BaseException) -> str:
    """A GenICam exception's message without the node and source-file trailer."""
    return str(exc).split(" : ")[0].strip() or type(exc).__name__


def configure(features: Features, camera: CameraConfig) -> str:
    """Apply the camera's settings; the pixel format (SFNC name) its frames will come in."""
    g = camera.genicam
    if features.available("TriggerMode"):
        _select_frame_start(features)
        features.set("TriggerMode", "Off")
    if g.pixel_format is not None:
        features.set("PixelFormat", _entry_for(features, g.pixel_format))
    _roi(features, camera)
    if g.exposure_us is not None:
        _auto_off(features, "ExposureAuto")
        features.set(_named(features, "ExposureTime", "ExposureTimeAbs"), g.exposure_us)
    if g.gain_db is not None:
        _auto_off(features, "GainAuto")
        features.set(_required(features, "Gain"), g.gain_db)
    _acquisition(features, camera)
    for name, value in g.features.items():
        features.set(name, value)
    try:
        return canonical(features.get(_required(features, "PixelFormat")))
    except PixelFormatError as exc:
        raise FeatureError(str(exc)) from None


def _acquisition(features: Features, camera: CameraConfig) -> None:
    g = camera.genicam
    if camera.acquisition == "free-run":
        if features.available("AcquisitionFrameRateEnable"):
            features.set("AcquisitionFrameRateEnable", True)
        rate = _named(features, "AcquisitionFrameRate", "AcquisitionFrameRateAbs", needed=False)
        if rate:
            features.set(rate, camera.fps)
        return
    if not features.available("TriggerMode"):
        raise FeatureError(
            "the camera has no TriggerMode feature: it cannot be triggered (acquisition = 'free-run' only)"
        )
    if camera.trigger == "mqtt":
        features.set("TriggerSource", "Software")
    else:
        features.set("TriggerSource", g.line)
        if features.available("TriggerActivation"):
            features.set("TriggerActivation", EDGES[g.activation])
        elif g.activation != "rising":
            raise FeatureError("the camera has no TriggerActivation feature: only its default edge")
        delay = _named(features, "TriggerDelay", "TriggerDelayAbs", needed=g.delay_us > 0)
        if delay:
            features.set(delay, g.delay_us)
    features.set("TriggerMode", "On")


def _select_frame_start(features: Features) -> None:
    if features.available("TriggerSelector") and "FrameStart" in features.entries("TriggerSelector"):
        features.set("TriggerSelector", "FrameStart")


def _roi(features: Features, camera: CameraConfig) -> None:
    g = camera.genicam
    if g.offset_x is not None or g.width is not None:
        _zero_offset(features, "OffsetX")
    if g.offset_y is not None or g.height is not None:
        _zero_offset(features, "OffsetY")
    for name, value in (("Width", g.width), ("Height", g.height), ("OffsetX", g.offset_x), ("OffsetY", g.offset_y)):
        if value is not None:
            features.set(_required(features, name), value)


def _zero_offset(features: Features, name: str) -> None:
    """An offset back to 0 first, so a larger width or height fits the sensor."""
    if features.available(name):
        features.set(name, 0)


def _auto_off(features: Features, name: str) -> None:
    if features.available(name) and "Off" in features.entries(name):
        features.set(name, "Off")


def _entry_for(features: Features, pixel_format: str) -> str:
    """The camera's entry for `pixel_format`: the SFNC name, else Basler's older name for the same layout."""
    offered = features.entries(_required(features, "PixelFormat"))
    if pixel_format in offered:
        return pixel_format
    for old, new in ALIASES.items():
        if new == pixel_format and old in offered:
            return old
    raise FeatureError(f"PixelFormat {pixel_format}: the camera offers {', '.join(offered)}")


def _required(features: Features, name: str) -> str:
    if not features.available(name):
        raise FeatureError(f"the camera has no {name} feature (or it is not available now)")
    return name


def _named(features: Features, *names: str, needed: bool = True) -> str:
    """The first of `names` the camera has; FeatureError when none (and `needed`), else ''."""
    for name in names:
        if features.available(name):
            return name
    if needed:
        raise FeatureError(f"the camera has no {' or '.join(names)} feature")
    return ""
