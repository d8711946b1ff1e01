"""Any vendor's GenICam camera through its GenTL producer and harvesters (kind "genicam", the `[genicam]` extra).

`genicam.cti` names the producer (the vendor's .cti for GigE Vision or USB3 Vision). A producer is a shared
library loaded once per process, so the cameras of one .cti share one `Harvester` (`PRODUCERS`); its device
list is read again only while none of its cameras is open (harvesters' `update` invalidates the open ones),
so a camera that reconnects while another camera of the same producer runs is looked for in the list read
when the first of them opened. The camera is found among the producer's devices by serial number, else by
user-defined name, else by the producer's device id. A buffer's first component is the image, laid out by
its `data_format` (the pixel format); `frame_id` is the camera's frame id and the timestamp (ns where the
producer gives it) is kept when not 0. harvesters discards an incomplete buffer itself and says so through
its INCOMPLETE_BUFFER callback: the loop hears it as a broken grab (no frame id: the buffer is gone).
The `genicam` wheel ships a simulator producer, `genicam/viky.cti`: three devices (serials 0, 1, 2), Mono8
and RGBa8, 400x400 by default, free-run only (no trigger features), no timestamps.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import numpy as np

from agent.sources.base import SourceError
from agent.sources.genicam_config import FeatureValue
from agent.sources.genicam_setup import FeatureError, Features, first_line
from agent.sources.grabbing import Device, GenICamSource, Grab, grabbed_now
from agent.sources.pixels import PixelFormatError, channels

MIN_WAIT_S = 0.001  # harvesters waits for ever on a timeout of 0


class HarvesterFeatures:
    """A remote device's node map (genicam.genapi) as `Features`."""

    def __init__(self, nodemap: Any) -> None:
        from genicam import genapi

        self._nodemap = nodemap
        self._usable = (genapi.EAccessMode.RO, genapi.EAccessMode.WO, genapi.EAccessMode.RW)

    def _node(self, name: str) -> Any:
        if not self._nodemap.has_node(name):
            raise FeatureError(f"the camera has no {name} feature")
        return self._nodemap.get_node(name)

    def available(self, name: str) -> bool:
        return bool(self._nodemap.has_node(name)) and self._nodemap.get_node(name).get_access_mode() in self._usable

    def get(self, name: str) -> str:
        return str(self._node(name).to_string())

    def set(self, name: str, value: FeatureValue) -> None:
        node = self._node(name)
        try:
            if isinstance(value, str):
                node.from_string(value)
            else:
                node.value = value
        except Exception as exc:
            raise FeatureError(f"{name} = {value!r}: {first_line(exc)}") from None

    def execute(self, name: str) -> None:
        try:
            self._node(name).execute()
        except FeatureError:
            raise
        except Exception as exc:
            raise FeatureError(f"{name}: {first_line(exc)}") from None

    def entries(self, name: str) -> tuple[str, ...]:
        return tuple(self._node(name).symbolics)


class HarvesterDevice:
    """An open harvesters `ImageAcquirer` and the `Harvester` that loaded its producer."""

    def __init__(self, cti: Path, acquirer: Any, name: str) -> None:
        from harvesters.core import Callback, ImageAcquirer

        self._cti = cti
        self._acquirer = acquirer
        self.name = name
        self.features: Features = HarvesterFeatures(acquirer.remote_device.node_map)
        self._incomplete = 0
        self._reported = 0
        device = self

        class CountIncomplete(Callback):
            def emit(self, context: object = None) -> None:
                device._incomplete += 1

        acquirer.add_callback(ImageAcquirer.Events.INCOMPLETE_BUFFER, CountIncomplete())

    def start(self, *, newest_only: bool) -> None:
        self._acquirer.start()

    def grab(self, timeout_s: float) -> Grab | None:
        buffer = self._acquirer.try_fetch(timeout=max(timeout_s, MIN_WAIT_S))
        if buffer is None:
            if self._incomplete > self._reported:
                self._reported += 1
                why = "incomplete buffer discarded by the GenTL producer"
                return Grab(None, "", None, None, grabbed_now(), error=why, error_kind="incomplete")
            return None
        with buffer:
            grabbed = grabbed_now()
            component = buffer.payload.components[0]
            pixel_format = str(component.data_format)
            frame_id, timestamp = int(buffer.frame_id), int(buffer.timestamp) or None
            try:
                data = _shaped(component, pixel_format)
            except (PixelFormatError, ValueError) as exc:
                return Grab(None, pixel_format, frame_id, timestamp, grabbed, error=str(exc))
            return Grab(data, pixel_format, frame_id, timestamp, grabbed)

    def software_trigger(self) -> None:
        self.features.execute("TriggerSoftware")

    def removed(self) -> bool:
        return False  # a producer reports a lost device by failing the fetch (an exception: reconnect)

    def close(self) -> None:
        for step in (self._acquirer.stop, self._acquirer.destroy):
            with contextlib.suppress(Exception):  # a lost device refuses to stop: release what can be released
                step()
        PRODUCERS.release(self._cti)


def _shaped(component: Any, pixel_format: str) -> np.ndarray:
    """The component's pixels as HxW or HxWxC (a copy: the buffer goes back to the producer)."""
    per_pixel = channels(pixel_format)
    shape = (component.height, component.width) if per_pixel == 1 else (component.height, component.width, per_pixel)
    return np.array(component.data, copy=True).reshape(shape)


class Producers:
    """The process's loaded GenTL producers: one `Harvester` per .cti, shared by its open cameras."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loaded: dict[Path, tuple[Any, int]] = {}  # cti -> (harvester, cameras open)

    def open(self, cti: Path, wanted: str) -> tuple[Any, Any]:
        """Open the camera `wanted` (serial, user-defined name or device id) through `cti`: (acquirer, info)."""
        with self._lock:
            harvester, users = self._loaded.get(cti, (None, 0))
            try:
                if harvester is None:
                    harvester = _load(cti)
                elif users == 0:
                    harvester.update()  # nothing open: the device list can be read again
                acquirer, info = _create(harvester, wanted)
            except Exception:
                if users == 0 and harvester is not None:
                    harvester.reset()
                    self._loaded.pop(cti, None)
                raise
            self._loaded[cti] = (harvester, users + 1)
            return acquirer, info

    def release(self, cti: Path) -> None:
        """One camera of `cti` closed; the producer is unloaded with its last camera."""
        with self._lock:
            harvester, users = self._loaded.get(cti, (None, 0))
            if harvester is None:
                return
            if users <= 1:
                del self._loaded[cti]
                with contextlib.suppress(Exception):
                    harvester.reset()
            else:
                self._loaded[cti] = (harvester, users - 1)


PRODUCERS = Producers()


def _load(cti: Path) -> Any:
    from harvesters.core import Harvester

    harvester = Harvester()
    try:
        harvester.add_file(str(cti), check_existence=True, check_validity=True)
        harvester.update()
    except Exception as exc:
        harvester.reset()
        raise SourceError(f"GenTL producer {cti} cannot be loaded: {first_line(exc)}") from None
    return harvester


def _create(harvester: Any, wanted: str) -> tuple[Any, Any]:
    """The acquirer of the producer's device named `wanted`; SourceError when not there or not openable."""
    found = list(harvester.device_info_list)
    for key in ("serial_number", "user_defined_name", "id_"):
        match = [i for i, d in enumerate(found) if d.property_dict.get(key) == wanted]
        if match:
            break
    else:
        seen = ", ".join(f"{d.serial_number} ({d.user_defined_name or d.model})" for d in found)
        raise SourceError(f"camera {wanted} not found; the producer sees {seen or 'no camera'}")
    try:
        return harvester.create(match[0]), found[match[0]]
    except Exception as exc:
        why = first_line(exc)
        raise SourceError(f"camera {wanted} cannot be opened (in use by another program?): {why}") from None


class GenTLSource(GenICamSource):
    """A GenICam camera through a GenTL producer (.cti) and harvesters."""

    def _open_device(self) -> Device:
        cti = self.camera.genicam.cti
        assert cti is not None  # the config requires it for kind genicam
        acquirer, info = PRODUCERS.open(cti.resolve(), self.camera.source)
        return HarvesterDevice(cti.resolve(), acquirer, f"{info.vendor} {info.model} {info.serial_number}")
