"""Frame sources: one capture thread per camera (OpenCV, a watched folder, synthetic parts, GenICam cameras).

source = open_source(camera, emit, line_id="line-1")
source.start()
...
source.status()   # SourceStatus: state, detail, frames, errors, last_frame_at, healthy
source.stop()
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from agent.sources.base import Emit, FrameSource
    from agent.sources.config import CameraConfig

_LAZY = {
    "Emit": "agent.sources.base",
    "FrameSource": "agent.sources.base",
    "SourceError": "agent.sources.base",
    "SourceStatus": "agent.sources.base",
    "CameraConfig": "agent.sources.config",
    "SyntheticConfig": "agent.sources.config",
}
__all__ = [*sorted(_LAZY), "open_source"]


def __getattr__(name: str) -> Any:
    """Names are imported on first use, so the config tree does not load numpy and OpenCV."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'agent.sources' has no attribute {name!r}")


def open_source(
    camera: CameraConfig,
    emit: Emit,
    *,
    line_id: str = "",
    max_frame_pixels: int | None = None,
    run_id: str | None = None,
    paused: Callable[[], bool] | None = None,
) -> FrameSource:
    """The source for `camera.resolved_kind`, not started yet.

    Each kind's module is imported here, so a line without synthetic cameras never loads the defect drawing.
    `max_frame_pixels` ([model].max_frame_pixels): image files over it are rejected undecoded.
    `run_id`: the service's run (agent/identity.py); None: the source makes its own.
    `paused`: whether the camera is paused now (`partial(batcher.is_paused, camera.id)`); a paused folder
    camera leaves new files unread in the folder. Other kinds ignore it (the batcher drops or holds their frames).
    """
    kind = camera.resolved_kind
    if kind == "folder":
        from agent.sources.folder import FolderSource

        if max_frame_pixels is None:
            return FolderSource(camera, emit, line_id=line_id, run_id=run_id, paused=paused)
        return FolderSource(
            camera, emit, line_id=line_id, max_frame_pixels=max_frame_pixels, run_id=run_id, paused=paused
        )
    if kind == "synthetic":
        from agent.sources.synthetic import SyntheticSource

        return SyntheticSource(camera, emit, line_id=line_id, run_id=run_id)
    if kind == "pylon":
        from agent.sources.pylon import PylonSource

        return PylonSource(camera, emit, line_id=line_id, run_id=run_id)
    if kind == "genicam":
        from agent.sources.gentl import GenTLSource

        return GenTLSource(camera, emit, line_id=line_id, run_id=run_id)
    from agent.sources.capture import OpenCvSource

    return OpenCvSource(camera, emit, line_id=line_id, run_id=run_id)
