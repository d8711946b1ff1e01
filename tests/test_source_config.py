"""`[[cameras]]` entries: kind detection, queue-policy defaults, and bad values named by key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.config import ConfigError, load_config
from agent.sources import CameraConfig, open_source
from agent.sources.capture import OpenCvSource
from agent.sources.folder import FolderSource
from agent.sources.synthetic import SyntheticSource

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "config.toml"


def camera(source: str, **keys) -> CameraConfig:
    return CameraConfig(id="cam", source=source, product_class="widget", **keys)


def test_auto_kind_and_queue_policy_follow_the_source(tmp_path):
    cases = [
        ("synthetic:demo", "synthetic", "drop_oldest", SyntheticSource),
        (str(tmp_path), "folder", "block", FolderSource),
        ("0", "opencv", "drop_oldest", OpenCvSource),
        ("rtsp://10.0.0.9/stream1", "opencv", "drop_oldest", OpenCvSource),
        ("http://127.0.0.1:8080/video.mjpg", "opencv", "drop_oldest", OpenCvSource),
        (str(tmp_path / "line.avi"), "opencv", "block", OpenCvSource),  # a file (existing or not) is not live
        (str(tmp_path / "frames_%04d.png"), "opencv", "block", OpenCvSource),  # an image sequence
        (str(tmp_path / "framez"), "folder", "block", FolderSource),  # not there yet (a typo, a share not mounted)
        ("/dev/v4l/by-id/usb-cam-not-plugged-in", "opencv", "drop_oldest", OpenCvSource),  # a device enumerating late
        ("videotestsrc ! videoconvert ! appsink", "opencv", "drop_oldest", OpenCvSource),  # a GStreamer pipeline
    ]
    (tmp_path / "clip.bin").write_bytes(b"")  # an existing file of any name: OpenCV's to open
    cases.append((str(tmp_path / "clip.bin"), "opencv", "block", OpenCvSource))
    for source, kind, policy, cls in cases:
        cam = camera(source)
        assert cam.resolved_kind == kind, source
        assert cam.resolved_queue_policy == policy, source
        assert type(open_source(cam, lambda frame: None)) is cls


def test_explicit_kind_and_policy_win(tmp_path):
    cam = camera(str(tmp_path), kind="opencv", queue_policy="drop_oldest")
    assert cam.resolved_kind == "opencv" and cam.resolved_queue_policy == "drop_oldest"
    assert camera("0", queue_policy="block").resolved_queue_policy == "block"


def test_max_age_defaults_to_none_for_folders_and_is_kept_when_given(tmp_path):
    """A folder's frames wait for the engine without expiring (every part inspected); a stream's expire."""
    assert camera(str(tmp_path)).resolved_max_age_ms == 0
    assert camera("rtsp://cam/1").resolved_max_age_ms == 2000
    assert camera(str(tmp_path), max_age_ms=500).resolved_max_age_ms == 500
    assert camera("0", max_age_ms=0).resolved_max_age_ms == 0


def test_defaults():
    cam = camera("synthetic:x")
    assert (cam.queue_size, cam.resolved_max_age_ms, cam.stall_timeout_s) == (8, 2000, 5)
    assert (cam.reconnect_min_s, cam.reconnect_max_s, cam.loop) == (0.5, 30, False)
    assert (cam.after, cam.settle_ms) == ("move", 200)
    assert cam.resolved_done_dir == Path("synthetic:x/done")
    syn = cam.synthetic
    assert (syn.defect_rate, syn.width, syn.height, syn.ground_truth) == (0.2, 320, 240, None)


@pytest.mark.parametrize(
    ("keys", "where", "what"),
    [
        ({"kind": "usb"}, "kind", "'auto', 'opencv', 'folder', 'synthetic', 'pylon' or 'genicam'"),
        ({"queue_policy": "drop_newest"}, "queue_policy", "'drop_oldest' or 'block'"),
        ({"queue_size": 0}, "queue_size", "greater than or equal to 1"),
        ({"max_age_ms": -1}, "max_age_ms", "greater than or equal to 0"),
        ({"stall_timeout_s": 0}, "stall_timeout_s", "greater than 0"),
        ({"after": "copy"}, "after", "'move' or 'delete'"),
        ({"settle_ms": -5}, "settle_ms", "greater than or equal to 0"),
        ({"reconnect_min_s": 10, "reconnect_max_s": 2}, "", "reconnect_min_s (10.0) must not exceed reconnect_max_s"),
        ({"synthetic": {"defect_rate": 1.5}}, "synthetic.defect_rate", "less than or equal to 1"),
        ({"synthetic": {"texture": "marble"}}, "synthetic.texture", "unknown texture 'marble'"),
        ({"synthetic": {"width": 8}}, "synthetic.width", "greater than or equal to 16"),
        ({"synthetic": {"colour": "red"}}, "synthetic.colour", "Extra inputs are not permitted"),
    ],
)
def test_bad_values_name_their_key(keys, where, what):
    with pytest.raises(ValidationError) as err:
        camera("synthetic:x", **keys)
    messages = [(".".join(str(p) for p in e["loc"]), e["msg"]) for e in err.value.errors()]
    assert any(loc == where and what in msg for loc, msg in messages), messages


def test_synthetic_table_only_for_synthetic_sources():
    with pytest.raises(ValidationError, match="synthetic: only for synthetic sources"):
        camera("0", synthetic={"defect_rate": 0.5})
    with pytest.raises(ValidationError, match="synthetic: only for synthetic sources"):
        camera("synthetic:x", kind="opencv", synthetic={"defect_rate": 0.5})
    assert camera("somewhere", kind="synthetic", synthetic={"seed": 3}).resolved_kind == "synthetic"


def test_repo_config_documents_every_camera_key():
    cfg = load_config(CONFIG)
    cam = cfg.cameras[0]
    assert cam.id == "cam-1" and cam.resolved_queue_policy in ("block", "drop_oldest")
    text = CONFIG.read_text()
    for key in CameraConfig.model_fields:
        assert f"{key} =" in text or f"[cameras.{key}]" in text, key
    for key in CameraConfig.model_fields["synthetic"].default_factory.model_fields:  # type: ignore[union-attr]
        assert f"{key} =" in text, key
    for key in CameraConfig.model_fields["genicam"].default_factory.model_fields:  # type: ignore[union-attr]
        assert f"{key} =" in text, key


def test_bad_camera_value_in_the_file_is_named(tmp_path):
    text = CONFIG.read_text().replace("queue_size = 8", 'queue_size = 8\nqueue_policy = "newest"', 1)
    path = tmp_path / "config.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert any(e.startswith("cameras.0.queue_policy:") for e in err.value.errors), err.value.errors
