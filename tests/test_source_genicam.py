"""GenICam cameras (agent/sources/grabbing.py, pylon.py, gentl.py, pixels.py, genicam_setup.py): pixel formats
to the engine's 8-bit gray/BGR, the `[cameras.genicam]` config and its extras, and real cameras of the pylon
emulator (PYLON_CAMEMU) and of the `genicam` wheel's simulator producer (viky.cti) driven by the sources.

The emulator is pylon's own (pypylon's runtime, in this process): software triggers, its frame ids (BlockID,
from 0), image files delivered in name order (ImageFileMode), ForceFailedBuffer (incomplete buffers)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("PYLON_CAMEMU", "2")  # before pypylon loads: two emulated cameras, 0815-0000 and 0815-0001

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from agent.sources import CameraConfig, open_source
from agent.sources.genicam_config import missing_extra
from agent.sources.pixels import PixelFormatError, to_engine_image
from tests.source_fixtures import Collector, stop_promptly, wait_until

pytest.importorskip("pypylon", reason="the [pylon] extra (make setup installs it)")
pytest.importorskip("harvesters", reason="the [genicam] extra (make setup installs it)")
REPO = Path(__file__).resolve().parents[1]


# --- pixel formats --------------------------------------------------------------------------------------------
def test_mono_formats_are_scaled_to_8_bit_full_scale():
    levels = np.array([[0, 1, 512, 1023]], np.uint16)
    assert to_engine_image(levels, "Mono10").tolist() == [[0, 0, 128, 255]]
    assert to_engine_image(np.array([[0, 2048, 4095, 65535]], np.uint16), "Mono12").tolist() == [[0, 128, 255, 255]]
    assert to_engine_image(np.array([[0, 32768, 65535]], np.uint16), "Mono16").tolist() == [[0, 128, 255]]
    mono8 = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(to_engine_image(mono8, "Mono8"), mono8)


@pytest.mark.parametrize(
    ("fmt", "pattern"),
    [("BayerRG8", "RGGB"), ("BayerGR8", "GRBG"), ("BayerGB8", "GBRG"), ("BayerBG8", "BGGR")],
)
def test_bayer_is_demosaiced_to_the_colour_the_sensor_saw(fmt, pattern):
    """A sensor under an orange light (R 200, G 120, B 40): every pattern gives that colour back, in BGR."""
    colour = {"R": 200, "G": 120, "B": 40}
    mosaic = np.zeros((16, 16), np.uint8)
    for i, letter in enumerate(pattern):
        mosaic[i // 2 :: 2, i % 2 :: 2] = colour[letter]
    bgr = to_engine_image(mosaic, fmt)
    assert bgr.shape == (16, 16, 3) and bgr.dtype == np.uint8
    assert bgr[8, 8].tolist() == [40, 120, 200]


def test_colour_formats_come_out_bgr_and_bad_buffers_are_refused():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255  # red
    assert to_engine_image(rgb, "RGB8")[0, 0].tolist() == [0, 0, 255]
    assert to_engine_image(rgb, "RGB8Packed")[0, 0].tolist() == [0, 0, 255]  # Basler's older name
    assert to_engine_image(rgb, "BGR8")[0, 0].tolist() == [255, 0, 0]
    rgba = np.dstack([rgb, np.full((4, 4), 9, np.uint8)])
    assert to_engine_image(rgba, "RGBa8").shape == (4, 4, 3) and to_engine_image(rgba, "RGBa8")[0, 0, 2] == 255
    assert to_engine_image(rgba, "BGRa8")[0, 0].tolist() == [255, 0, 0]
    with pytest.raises(PixelFormatError, match="Mono12p is not supported"):
        to_engine_image(np.zeros((4, 4), np.uint8), "Mono12p")
    with pytest.raises(PixelFormatError, match="expected 3 value"):
        to_engine_image(np.zeros((4, 4), np.uint8), "RGB8")
    with pytest.raises(PixelFormatError, match="16-bit"):
        to_engine_image(np.zeros((4, 4), np.uint8), "Mono12")


# --- configuration ---------------------------------------------------------------------------------------------
def viky_cti() -> Path:
    import genicam

    return Path(genicam.__file__).with_name("viky.cti")


def test_genicam_settings_are_checked(tmp_path):
    cam = CameraConfig(
        id="c",
        source="0815-0000",
        product_class="w",
        kind="pylon",
        acquisition="triggered",
        trigger="camera",
        genicam={"pixel_format": "BayerRG8", "line": "Line2", "activation": "falling", "delay_us": 50},
    )
    assert cam.resolved_kind == "pylon" and cam.is_live and cam.resolved_queue_policy == "drop_oldest"
    with pytest.raises(ValidationError, match=r"kind genicam needs genicam\.cti"):
        CameraConfig(id="c", source="0", product_class="w", kind="genicam")
    with pytest.raises(ValidationError, match="is not a file"):
        CameraConfig(id="c", source="0", product_class="w", kind="genicam", genicam={"cti": str(tmp_path / "x.cti")})
    dumped = CameraConfig(id="c", source="synthetic:a", product_class="w").model_dump(mode="json")
    assert CameraConfig(**dumped).genicam.error_limit == 5  # a dumped config's table of defaults loads again
    with pytest.raises(ValidationError, match="only for kinds pylon and genicam"):
        CameraConfig(id="c", source="0", product_class="w", kind="opencv", genicam={"exposure_us": 100})
    with pytest.raises(ValidationError, match="pixel_format"):
        CameraConfig(id="c", source="0", product_class="w", kind="pylon", genicam={"pixel_format": "YUV422"})
    with pytest.raises(ValidationError, match="input line"):
        CameraConfig(id="c", source="0", product_class="w", kind="pylon", genicam={"line": "Software"})
    with pytest.raises(ValidationError, match="exposure"):
        CameraConfig(id="c", source="0", product_class="w", kind="pylon", genicam={"exposure": 100})


def test_a_kind_whose_extra_is_missing_fails_config_check_with_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pypylon", None)  # as if not installed
    assert "pip install 'genclip-inspect[pylon]'" in (missing_extra("pylon") or "")
    assert missing_extra("genicam") is None
    config = tmp_path / "line.toml"
    config.write_text(
        '[model]\nbackbone = "genclip-tiny"\npretrained = "random"\ndevice = "cpu"\n'
        '[[cameras]]\nid = "cam-1"\nsource = "40012345"\nproduct_class = "widget"\nkind = "pylon"\n'
    )
    code = (
        "import sys; sys.modules['pypylon'] = None; sys.argv = ['genclip', 'config', 'check', '--config', "
        f"{str(config)!r}]; from cli.main import main; main()"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cameras.0" in done.stderr and "pip install 'genclip-inspect[pylon]'" in done.stderr, done.stderr


# --- the pylon emulator ----------------------------------------------------------------------------------------
def write_parts(folder: Path, size: tuple[int, int] = (64, 48)) -> list[np.ndarray]:
    """Three image files the emulator delivers in name order: grey levels 40, 80, 120, a red mark at (4, 4)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(3):
        image = np.full((size[1], size[0], 3), 40 * (i + 1), np.uint8)
        image[2:8, 2:8] = (0, 0, 255)  # BGR red
        cv2.imwrite(str(folder / f"part-{i}.png"), image)
        images.append(image)
    return images


def pylon_camera(folder: Path, **keys: object) -> CameraConfig:
    genicam = {
        "pixel_format": "RGB8",
        "width": 64,
        "height": 48,
        "error_limit": 3,
        "features": {"TestImageSelector": "Off", "ImageFileMode": "On", "ImageFilename": str(folder)},
        **keys.pop("genicam", {}),  # type: ignore[dict-item]
    }
    settings = {"reconnect_min_s": 0.05, "reconnect_max_s": 0.2, "trigger_timeout_ms": 1000, **keys}
    return CameraConfig(
        id="cam-1", source="0815-0000", product_class="w", kind="pylon", acquisition="triggered", genicam=genicam,
        **settings,  # type: ignore[arg-type]
    )  # fmt: skip


def test_software_triggers_bind_each_frame_with_its_frame_id_and_grab_errors_answer_error(tmp_path):
    folder = tmp_path / "parts"
    images = write_parts(folder)
    emit = Collector()
    source = open_source(pylon_camera(folder), emit, run_id="r1")
    source.start()
    try:
        assert wait_until(lambda: source.status().state == "running", timeout=15), source.status()
        assert source.device() == "Basler Emulation 0815-0000"
        triggers = [source.accept_trigger(f"P-{n}") for n in range(1, 5)]
        assert wait_until(lambda: len(emit) == 4, timeout=10)
        time.sleep(1.2)
        assert source.status().detail == "waiting for trigger" and source.status().healthy
        for name in os.listdir(folder):  # the emulator can no longer read its files: every grab fails
            os.rename(folder / name, tmp_path / name)
        for n in range(5, 9):
            source.accept_trigger(f"P-{n}")
        assert wait_until(lambda: source.status().state == "reconnecting", timeout=10), source.status()
        assert "3 grabs failed in a row" in source.status().detail
        for name in os.listdir(tmp_path):
            if name.endswith(".png"):
                os.rename(tmp_path / name, folder / name)
        assert wait_until(lambda: source.status().state == "running", timeout=10), source.status()
        time.sleep(0.3)
        count = len(emit)
        source.accept_trigger("P-9")
        assert wait_until(lambda: len(emit) == count + 1, timeout=10)
    finally:
        stop_promptly(source, limit=3)
    frames = emit.snapshot()
    good = frames[:4]
    assert [(f.part_id, f.seq, f.camera_frame_id) for f in good] == [(f"P-{n}", n, n - 1) for n in range(1, 5)]
    for frame, trigger in zip(good, triggers, strict=True):
        assert frame.trigger == trigger and frame.error is None and frame.camera_timestamp is None  # emulator: 0
        assert np.array_equal(frame.image, images[frame.camera_frame_id % 3])  # the file, in BGR as written
    failed = [f for f in frames if f.error is not None]
    assert [f.part_id for f in failed[:3]] == ["P-5", "P-6", "P-7"]
    assert all(f.error.startswith("grab failed: Failed to load image file") for f in failed), failed[0].error
    assert source.grab_errors() == {"failed": len(failed), "incomplete": 0}
    assert sorted(f.part_id for f in frames) == sorted(f"P-{n}" for n in range(1, 10))  # one answer each
    after = frames[-1]
    assert after.part_id == "P-9" and after.error is None and after.not_inspected is None


def test_incomplete_buffers_are_counted_and_answered_error(tmp_path):
    folder = tmp_path / "parts"
    write_parts(folder)
    emit = Collector()
    source = open_source(pylon_camera(folder, genicam={"error_limit": 10}), emit, run_id="r1")
    source.start()
    try:
        assert wait_until(lambda: source.device_in_use is not None and source.status().state == "running", 15)
        features = source.device_in_use.features
        features.set("ForceFailedBufferCount", 2)
        features.execute("ForceFailedBuffer")  # the next two buffers arrive incomplete
        for n in range(1, 5):
            source.accept_trigger(f"P-{n}")
        assert wait_until(lambda: len(emit) == 4, timeout=10)
    finally:
        stop_promptly(source, limit=3)
    frames = emit.snapshot()
    assert [f.error for f in frames[:2]] == ["grab incomplete: The buffer was incompletely grabbed."] * 2
    assert [f.camera_frame_id for f in frames] == [0, 1, 2, 3]
    assert frames[2].error is None and frames[3].error is None
    assert source.grab_errors() == {"failed": 0, "incomplete": 2}
    assert source.status().state == "ended"


def test_a_hardware_line_trigger_is_set_up_and_an_idle_line_is_waiting_not_stalled(tmp_path):
    folder = tmp_path / "parts"
    write_parts(folder)
    keys = {"line": "Line2", "activation": "falling", "delay_us": 25.0, "exposure_us": 500.0, "gain_db": 1.5}
    camera = pylon_camera(folder, trigger="camera", stall_timeout_s=0.5, genicam=keys)
    emit = Collector()
    source = open_source(camera, emit, run_id="r1")
    source.start()
    try:
        assert wait_until(lambda: source.device_in_use is not None and source.status().state == "running", 15)
        features = source.device_in_use.features
        time.sleep(1.3)  # longer than stall_timeout_s: no line signal is not a stall
        status = source.status()
        assert (status.state, status.detail, len(emit)) == ("running", "waiting for trigger", 0)
        got = {name: features.get(name) for name in ("TriggerMode", "TriggerSource", "TriggerActivation")}
        assert got == {"TriggerMode": "On", "TriggerSource": "Line2", "TriggerActivation": "FallingEdge"}
        assert float(features.get("TriggerDelay")) == 25.0 and float(features.get("ExposureTime")) == 500.0
        assert float(features.get("Gain")) == 1.5 and features.get("PixelFormat") in ("RGB8", "RGB8Packed")
    finally:
        stop_promptly(source, limit=3)


def test_a_camera_not_found_or_refusing_a_setting_reconnects_and_says_why(tmp_path):
    folder = tmp_path / "parts"
    write_parts(folder)
    missing = open_source(pylon_camera(folder).model_copy(update={"source": "4711"}), Collector())
    refused = open_source(pylon_camera(folder, genicam={"width": 99_999}), Collector())
    for source in (missing, refused):
        source.start()
    try:
        for source in (missing, refused):
            assert wait_until(lambda s=source: s.status().state == "reconnecting" and s.status().errors, 15)
        assert "camera 4711 not found; pylon sees 0815-0000" in missing.status().detail
        assert "Width = 99999" in refused.status().detail and "Max" in refused.status().detail
    finally:
        for source in (missing, refused):
            stop_promptly(source, limit=3)


# --- the GenTL simulator (viky.cti) ----------------------------------------------------------------------------
@pytest.mark.parametrize(("pixel_format", "shape"), [("Mono8", (400, 400)), ("RGBa8", (400, 400, 3))])
def test_a_gentl_camera_free_runs_at_its_rate_with_frame_ids(pixel_format, shape):
    camera = CameraConfig(
        id="cam-g", source="1", product_class="w", kind="genicam", fps=10,
        genicam={"cti": str(viky_cti()), "pixel_format": pixel_format},
    )  # fmt: skip
    emit = Collector()
    source = open_source(camera, emit, run_id="r1")
    source.start()
    try:
        assert wait_until(lambda: len(emit) >= 5, timeout=15), source.status()
        assert source.device() == "Machine Vision Games Ltd. Viky 1"
    finally:
        stop_promptly(source, limit=3)
    frames = emit.snapshot()
    ids = [f.camera_frame_id for f in frames]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # the camera's own count, none skipped
    assert all(f.image.shape == shape and f.image.dtype == np.uint8 and f.error is None for f in frames)
    span = (frames[-1].captured_mono - frames[0].captured_mono) / (len(frames) - 1)
    print(f"{pixel_format}: {len(frames)} frames, one every {span * 1000:.0f} ms (AcquisitionFrameRate 10)")
    assert source.grab_errors() == {"failed": 0, "incomplete": 0}


def test_a_gentl_camera_without_trigger_features_cannot_be_triggered():
    camera = CameraConfig(
        id="cam-g", source="2", product_class="w", kind="genicam", acquisition="triggered",
        reconnect_min_s=0.05, reconnect_max_s=0.2, genicam={"cti": str(viky_cti())},
    )  # fmt: skip
    source = open_source(camera, Collector())
    source.start()
    try:
        assert wait_until(lambda: source.status().state == "reconnecting" and source.status().errors, 15)
        assert "no TriggerMode feature: it cannot be triggered" in source.status().detail
    finally:
        stop_promptly(source, limit=3)
