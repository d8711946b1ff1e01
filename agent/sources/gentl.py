"""Any vendor's GenICam camera through its GenTL producer and harvesters (kind "genicam", the `[genicam]` extra).

`genicam.cti` names the producer (the vendor's .cti for GigE Vision or USB3 Vision); each source loads it
into its own `Harvester`. The camera is found among the producer's devices by serial number, else by
user-defined name, else by the producer's device id. A buffer's first component is the image, laid out by
its `data_format` (the pixel format); `frame_id` is the camera's frame id and the timestamp (ns where the
producer gives it) is kept when not 0. harvesters discards an incomplete buffer itself and says so through
its INCOMPLETE_BUFFER callback: the loop hears it as a broken grab (no frame id: the buffer is gone).
The `genicam` wheel ships a simulator producer, `genicam/viky.cti`: three devices (serials 0, 1, 2), Mono8
and RGBa8, 400x400 by default, free-run only (no trigger features), no timestamps.
"""

from __future__ import annotations

import contextlib
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

    def __init__(self, harvester: Any, acquirer: Any, name: str) -> None:
        from harvesters.core import Callback, ImageAcquirer

        self._harvester = harvester
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
        for step in (self._acquirer.stop, self._acquirer.destroy, self._harvester.reset):
            with contextlib.suppress(Exception):  # a lost device refuses to stop: release what can be released
                step()


def _shaped(component: Any, pixel_format: str) -> np.ndarray:
    """The component's pixels as HxW or HxWxC (a copy: the buffer goes back to the producer)."""
    per_pixel = channels(pixel_format)
    shape = (component.height, component.width) if per_pixel == 1 else (component.height, component.width, per_pixel)
    return np.array(component.data, copy=True).reshape(shape)


class GenTLSource(GenICamSource):
    """A GenICam camera through a GenTL producer (.cti) and harvesters."""

    def _open_device(self) -> Device:
        from harvesters.core import Harvester

        cti = self.camera.genicam.cti
        assert cti is not None  # the config requires it for kind genicam
        harvester = Harvester()
        try:
            harvester.add_file(str(cti), check_existence=True, check_validity=True)
            harvester.update()
            return self._open_in(harvester)
        except SourceError:
            harvester.reset()
            raise
        except Exception as exc:
            harvester.reset()
            raise SourceError(f"GenTL producer {cti}: {first_line(exc)}") from None

    def _open_in(self, harvester: Any) -> Device:
        wanted = self.camera.source
        found = list(harvester.device_info_list)
        for key in ("serial_number", "user_defined_name", "id_"):
            match = [i for i, d in enumerate(found) if d.property_dict.get(key) == wanted]
            if match:
                break
        else:
            seen = ", ".join(f"{d.serial_number} ({d.user_defined_name or d.model})" for d in found)
            raise SourceError(f"camera {wanted} not found; the producer sees {seen or 'no camera'}")
        info = found[match[0]]
        try:
            acquirer = harvester.create(match[0])
        except Exception as exc:
            why = first_line(exc)
            raise SourceError(f"camera {wanted} cannot be opened (in use by another program?): {why}") from None
        return HarvesterDevice(harvester, acquirer, f"{info.vendor} {info.model} {info.serial_number}")
