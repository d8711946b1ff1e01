"""What `genclip config check` warns about a camera's source: a path that is not there, or no video.

Warnings, not errors: a camera may be plugged in later, a file or a share may appear after the
check, and the agent waits for them (a folder) or retries them (an OpenCV source). Devices by
index, stream URLs and pipelines are not opened here: the running agent may hold them.
"""

from __future__ import annotations

from agent.sources.config import CameraConfig


def source_warning(camera: CameraConfig) -> str | None:
    """Why the camera's source will not deliver as it stands, naming the camera, the path and the kind
    it is taken as; None when nothing is known to be wrong (or it cannot be checked without opening it)."""
    kind = camera.resolved_kind
    if kind in ("synthetic", "pylon", "genicam"):
        return None  # a GenICam camera is looked for when it opens (the running agent may hold it now)
    where = f"camera {camera.id}: source {camera.source!r}"
    if kind == "folder":
        problem = _folder_problem(camera)
        return None if problem is None else f"{where} {problem}"
    if camera.source_form == "device" and camera.device_index is None and not camera.folder.exists():
        return f"{where}: device not found (not plugged in?); taken as a device (kind opencv), retried until it opens"
    if camera.source_form != "path":
        return None
    from agent.sources.capture import video_problem  # OpenCV only when there is a file to look at

    problem = video_problem(camera)
    if camera.kind == "opencv":
        taken = "kind opencv"
    else:
        taken = "kind auto: an existing file" if camera.folder.exists() else "kind auto: a video file by its extension"
    return None if problem is None else f"{where}: {problem}; taken as a video file ({taken}), retried until it opens"


def _folder_problem(camera: CameraConfig) -> str | None:
    """A folder source that is not a folder now: missing (waited for), or a file."""
    path = camera.folder
    if path.is_dir():
        return None
    if path.exists():
        return "is not a folder; kind 'folder' watches a folder of images (a video file: kind = 'opencv')"
    if camera.kind == "auto":
        return (
            "does not exist; kind auto takes it as a folder of images, waited for until it appears "
            "(a video file or device that appears later: set kind = 'opencv')"
        )
    return "does not exist; taken as a folder (kind folder), waited for until it appears"
