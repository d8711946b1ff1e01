"""Basler cameras through pypylon (kind "pylon", the `[pylon]` extra): GigE, USB3 and the pylon camera emulator.

pypylon brings the pylon runtime with its transport layers, so nothing else is installed. The camera is
found among the devices pylon enumerates by serial number, else by user-defined name (DeviceUserID). Frames
come as pylon delivers them: `BlockID` is the camera's frame id, `TimeStamp` its tick count (0, as the
emulator gives it, means none). A grab result that did not succeed (an incomplete buffer, a failed
transfer) is handed on with pylon's error description. `IsCameraDeviceRemoved` tells a device that went.
The emulator (`PYLON_CAMEMU=<n>` in the environment before pypylon loads) offers n cameras, serials
0815-0000, 0815-0001, ..., with software and line triggers, and with ImageFileMode = On and ImageFilename = a
folder it delivers the folder's images in name order (see docs/cameras.md).
"""

from __future__ import annotations

import contextlib
from typing import Any

from agent.sources.base import SourceError
from agent.sources.genicam_config import FeatureValue
from agent.sources.genicam_setup import FeatureError, Features, first_line
from agent.sources.grabbing import Device, GenICamSource, Grab, GrabError, grabbed_now

TRIGGER_READY_MS = 500  # how long a software trigger waits for the camera to be ready for it


class PylonFeatures:
    """A pylon camera's node map as `Features`."""

    def __init__(self, nodemap: Any) -> None:
        self._nodemap = nodemap

    def _node(self, name: str) -> Any:
        node = self._nodemap.GetNode(name)
        if node is None or not node.IsValid():
            raise FeatureError(f"the camera has no {name} feature")
        return node

    def available(self, name: str) -> bool:
        node = self._nodemap.GetNode(name)
        return node is not None and node.IsValid() and (node.IsReadable() or node.IsWritable())

    def get(self, name: str) -> str:
        return str(self._node(name).ToString())

    def set(self, name: str, value: FeatureValue) -> None:
        node = self._node(name)
        try:
            if isinstance(value, str):
                node.FromString(value)
            else:
                node.SetValue(value)
        except Exception as exc:
            raise FeatureError(f"{name} = {value!r}: {first_line(exc)}") from None

    def execute(self, name: str) -> None:
        try:
            self._node(name).Execute()
        except FeatureError:
            raise
        except Exception as exc:
            raise FeatureError(f"{name}: {first_line(exc)}") from None

    def entries(self, name: str) -> tuple[str, ...]:
        return tuple(self._node(name).Symbolics)


class PylonDevice:
    """An open pylon `InstantCamera`."""

    def __init__(self, camera: Any, name: str) -> None:
        from pypylon import pylon

        self._pylon = pylon
        self._camera = camera
        self.name = name
        self.features: Features = PylonFeatures(camera.GetNodeMap())
        self._pixel_format = ""

    def start(self, *, newest_only: bool) -> None:
        pylon = self._pylon
        self._pixel_format = self.features.get("PixelFormat")
        strategy = pylon.GrabStrategy_LatestImageOnly if newest_only else pylon.GrabStrategy_OneByOne
        self._camera.StartGrabbing(strategy)

    def grab(self, timeout_s: float) -> Grab | None:
        result = self._camera.RetrieveResult(max(0, int(timeout_s * 1000)), self._pylon.TimeoutHandling_Return)
        if not result.IsValid():
            return None
        try:
            grabbed = grabbed_now()
            frame_id, timestamp = int(result.BlockID), int(result.TimeStamp) or None
            if result.GrabSucceeded():
                return Grab(result.GetArray(), self._pixel_format, frame_id, timestamp, grabbed)
            why = str(result.ErrorDescription).strip() or f"error code {result.ErrorCode:#x}"
            kind: GrabError = "incomplete" if "incomplete" in why.lower() else "failed"
            return Grab(None, self._pixel_format, frame_id, timestamp, grabbed, error=why, error_kind=kind)
        finally:
            result.Release()

    def software_trigger(self) -> None:
        self._camera.WaitForFrameTriggerReady(TRIGGER_READY_MS, self._pylon.TimeoutHandling_ThrowException)
        self._camera.ExecuteSoftwareTrigger()

    def removed(self) -> bool:
        return bool(self._camera.IsCameraDeviceRemoved())

    def close(self) -> None:
        for step in (self._camera.StopGrabbing, self._camera.Close, self._camera.DestroyDevice):
            with contextlib.suppress(Exception):  # a removed device refuses to stop: release what can be released
                step()


class PylonSource(GenICamSource):
    """A Basler camera through pypylon."""

    def _open_device(self) -> Device:
        from pypylon import pylon

        factory = pylon.TlFactory.GetInstance()
        wanted = self.camera.source
        found = list(factory.EnumerateDevices())
        match = [d for d in found if d.GetSerialNumber() == wanted] or [
            d for d in found if d.GetUserDefinedName() == wanted
        ]
        if not match:
            seen = ", ".join(f"{d.GetSerialNumber()} ({d.GetUserDefinedName() or d.GetModelName()})" for d in found)
            raise SourceError(f"camera {wanted} not found; pylon sees {seen or 'no camera'}")
        info = match[0]
        try:
            camera = pylon.InstantCamera(factory.CreateDevice(info))
            camera.Open()
        except Exception as exc:
            why = first_line(exc)
            raise SourceError(f"camera {wanted} cannot be opened (in use by another program?): {why}") from None
        name = f"{info.GetVendorName()} {info.GetModelName()} {info.GetSerialNumber()}"
        return PylonDevice(camera, name)
