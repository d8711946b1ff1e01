"""Frame sources: one capture thread per camera (OpenCV, a watched folder, synthetic parts).

source = open_source(camera, emit, line_id="line-1")
source.start()
...
source.status()   # SourceStatus: state, detail, frames, errors, last_frame_at, healthy
source.stop()
"""

from __future__ import annotations

from agent.sources.base import Emit, FrameSource, SourceError, SourceStatus
from agent.sources.config import CameraConfig, SyntheticConfig

__all__ = ["CameraConfig", "Emit", "FrameSource", "SourceError", "SourceStatus", "SyntheticConfig", "open_source"]


def open_source(camera: CameraConfig, emit: Emit, *, line_id: str = "") -> FrameSource:
    """The source for `camera.resolved_kind`, not started yet.

    Each kind's module is imported here, so a line without synthetic cameras never loads the trainer.
    """
    kind = camera.resolved_kind
    if kind == "folder":
        from agent.sources.folder import FolderSource

        return FolderSource(camera, emit, line_id=line_id)
    if kind == "synthetic":
        from agent.sources.synthetic import SyntheticSource

        return SyntheticSource(camera, emit, line_id=line_id)
    from agent.sources.capture import OpenCvSource

    return OpenCvSource(camera, emit, line_id=line_id)
