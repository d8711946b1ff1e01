"""Bad input: every kind gets an error naming the problem, and nothing stops the service.

Images (empty, truncated, not images, odd sizes and depths, absurdly large), checkpoints and class
profiles that do not fit, configuration errors, malformed commands; with property-based tests for
the command parser, the result schema and the config loader. What older tests already cover is
named in each section instead of repeated.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.images import UnreadableImageError, read_frame
from model.image_files import ImageReadError, decode_image, header_size
from model.outcomes import FrameError, Prediction
from model.regions import Defect

REPO = Path(__file__).resolve().parent.parent
LIMIT = 50_000_000  # [model].max_frame_pixels' default


# --- images: the header probe ----------------------------------------------------------------------------
# (tests/test_source_folder.py: a truncated PNG and a .txt file are rejected with reasons;
#  tests/test_score_command.py: every format, a corrupt and a missing file through `genclip score`.)


def encoded(ext: str, shape: tuple[int, ...], dtype: Any = np.uint8, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    ok, data = cv2.imencode(ext, image)
    assert ok
    return data.tobytes()


SHAPES = [(1, 1), (17, 3001), (3001, 17), (17, 3001, 3), (9, 7, 4), (64, 48, 3)]


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_header_size_is_the_decoded_size(ext: str, shape: tuple[int, ...]) -> None:
    data = encoded(ext, shape)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert header_size(data) == (decoded.shape[1], decoded.shape[0]) == (shape[1], shape[0])


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_header_size_of_16_bit_images(ext: str) -> None:
    for shape in ((33, 45), (20, 30, 3)):
        assert header_size(encoded(ext, shape, np.uint16)) == (shape[1], shape[0])


def claims(ext: str, width: int, height: int) -> bytes:
    """A small real image whose header is rewritten to claim width x height (TIFF: a header alone)."""
    if ext == ".tif-le":  # II, LONG sizes
        entries = struct.pack("<HHII", 256, 4, 1, width) + struct.pack("<HHII", 257, 4, 1, height)
        return b"II*\x00" + struct.pack("<IH", 8, 2) + entries + b"\x00" * 4
    if ext == ".tif-be":  # MM, SHORT sizes (a SHORT sits in the first two bytes of the value field)
        entries = struct.pack(">HHIHH", 256, 3, 1, width, 0) + struct.pack(">HHIHH", 257, 3, 1, height, 0)
        return b"MM\x00*" + struct.pack(">IH", 8, 2) + entries + b"\x00" * 4
    data = bytearray(encoded(ext, (16, 16, 3)))
    if ext == ".png":
        data[16:24] = struct.pack(">II", width, height)
    elif ext == ".bmp":
        data[18:26] = struct.pack("<ii", width, -height)  # top-down bitmaps have a negative height
    elif ext == ".jpg":
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tif-le", ".tif-be"])
def test_a_header_over_the_limit_is_refused_without_decoding(
    ext: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    width, height = (20000, 20000) if ext != ".tif-be" else (60000, 60000)
    path = tmp_path / f"huge{ext[:4]}"
    path.write_bytes(claims(ext, width, height))
    assert header_size(path.read_bytes()) == (width, height)

    def no_decoding(*args: Any) -> None:
        raise AssertionError("an image over the limit was handed to the decoder")

    monkeypatch.setattr(cv2, "imdecode", no_decoding)
    expected = (
        f"image is {width}x{height} = {width * height} pixels, over the limit of {LIMIT} ([model].max_frame_pixels)"
    )
    with pytest.raises(ImageReadError) as refused:
        decode_image(path, max_pixels=LIMIT)
    assert refused.value.reason == expected
    with pytest.raises(UnreadableImageError) as unreadable:
        read_frame(path)  # the default limit is [model].max_frame_pixels' default
    assert str(unreadable.value) == expected
    with pytest.raises(UnreadableImageError, match=r"over the limit of 100 \(\[model\]\.max_frame_pixels\)"):
        read_frame(path, max_pixels=100)


def test_the_limit_is_inclusive_and_also_holds_after_decoding(tmp_path: Path) -> None:
    path = tmp_path / "p.png"
    path.write_bytes(encoded(".png", (30, 40, 3)))
    assert read_frame(path, max_pixels=1200).shape == (30, 40, 3)
    with pytest.raises(UnreadableImageError, match=r"^image is 40x30 = 1200 pixels, over the limit of 1199 "):
        read_frame(path, max_pixels=1199)
    # A format the probe does not read (here PPM) is measured once decoded, with the same message.
    ppm = tmp_path / "p.png"  # the decoder goes by content, not by name
    ppm.write_bytes(encoded(".ppm", (30, 40, 3)))
    assert header_size(ppm.read_bytes()) is None
    with pytest.raises(UnreadableImageError, match=r"^image is 40x30 = 1200 pixels, over the limit of 1199 "):
        read_frame(ppm, max_pixels=1199)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=64), prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8", b"BM", b"II*\x00"]))
def test_the_header_probe_never_raises(data: bytes, prefix: bytes) -> None:
    size = header_size(prefix + data)
    assert size is None or (len(size) == 2 and all(isinstance(v, int) and v >= 0 for v in size))


# --- images: a real 20000x20000 PNG, small on disk ----------------------------------------------------


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def write_zero_png(path: Path, width: int, height: int) -> Path:
    """An all-black 8-bit gray PNG, compressed row block by row block: 400 MB of pixels in ~0.4 MB."""
    compressor = zlib.compressobj(9)
    rows = (b"\x00" * (width + 1)) * 64  # filter byte 0 + the row, 64 rows at a time
    parts = [compressor.compress(rows) for _ in range(height // 64)]
    parts += [compressor.compress((b"\x00" * (width + 1)) * (height % 64)), compressor.flush()]
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = write_zero_png(tmp_path_factory.mktemp("huge") / "huge.png", 20000, 20000)
    assert path.stat().st_size < 2_000_000
    return path


def test_the_huge_png_is_real_and_refused_in_a_millisecond(huge_png: Path) -> None:
    with huge_png.open("rb") as fh:  # OpenCV would decode it: it is a valid image
        assert header_size(fh.read(64)) == (20000, 20000)
    began = time.perf_counter()
    with pytest.raises(UnreadableImageError) as refused:
        read_frame(huge_png, max_pixels=LIMIT)
    assert time.perf_counter() - began < 0.5
    assert str(refused.value) == (
        "image is 20000x20000 = 400000000 pixels, over the limit of 50000000 ([model].max_frame_pixels)"
    )


FOLDER_PROBE = textwrap.dedent(
    """
    import resource, sys, time
    from pathlib import Path
    import cv2, numpy as np
    from agent.sources import CameraConfig, open_source
    folder = Path(sys.argv[1])
    frames = []
    camera = CameraConfig(id="grabber", source=str(folder), product_class="widget", settle_ms=20)
    def emit(frame):  # as the agent does: the frame is published, so the file is cleared away
        frames.append(frame)
        frame.end("published")
    source = open_source(camera, emit, max_frame_pixels=int(sys.argv[2]))
    cv2.imdecode(cv2.imencode(".png", np.zeros((8, 8), np.uint8))[1], -1)  # OpenCV's own start-up, not counted
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    source.start()
    end = time.monotonic() + 30
    while time.monotonic() < end and not (len(frames) == 2 and (folder / "rejected" / "huge.png.reason.txt").exists()):
        time.sleep(0.02)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state = source.status().state
    source.stop()
    images = sum(frame.error is None for frame in frames)  # the huge one is reported as an error frame
    print((after - before) // 1024, images, state, flush=True)
    """
)


def test_the_folder_source_rejects_the_huge_png_without_allocating_it(huge_png: Path, tmp_path: Path) -> None:
    """In a process of its own, so its peak memory is this test's: decoding it would take 400 MB or more."""
    folder = tmp_path / "grabber"
    folder.mkdir()
    (folder / "huge.png").write_bytes(huge_png.read_bytes())
    cv2.imwrite(str(folder / "good.png"), np.full((48, 64, 3), 90, np.uint8))
    os.utime(folder / "good.png", (time.time() + 5, time.time() + 5))  # taken after the huge one
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", FOLDER_PROBE, str(folder), "10000000"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    grown_mb, emitted, state = done.stdout.splitlines()[-1].split()  # after the source's log lines
    reason = (folder / "rejected" / "huge.png.reason.txt").read_text()
    assert reason == "image is 20000x20000 = 400000000 pixels, over the limit of 10000000 ([model].max_frame_pixels)\n"
    assert int(emitted) == 1 and state == "running", done.stdout  # the next file was taken as usual
    assert int(grown_mb) < 200, f"peak memory grew by {grown_mb} MB: the image was decoded"


# --- images: whatever lands in a watched folder -------------------------------------------------------


def test_every_kind_of_bad_file_in_a_watched_folder_is_rejected_with_its_reason(tmp_path: Path) -> None:
    from agent.sources import CameraConfig, open_source
    from tests.source_fixtures import Collector, stop_promptly, wait_until

    folder = tmp_path / "grabber"
    folder.mkdir()
    rng = np.random.default_rng(1)
    bad = {
        "empty.png": b"",
        "cut.jpg": encoded(".jpg", (120, 160, 3))[:400],
        "noise.bmp": rng.bytes(3000),
        "notes.txt": b"not a picture",
        "noext": b"\x89PNG\r\n\x1a\n",
        "dot.png": encoded(".png", (1, 1)),
        "tiny.png": encoded(".png", (7, 7, 3)),
        "float.tif": cv2.imencode(".tif", np.zeros((20, 20), np.float32))[1].tobytes(),
        "wide.png": claims(".png", 20000, 20000),
    }
    good = {
        "thin.png": ((17, 3001, 3), np.uint8),
        "tall.png": ((3001, 17), np.uint8),
        "gray16.png": ((40, 50), np.uint16),
        "colour16.tif": ((24, 32, 3), np.uint16),
        "alpha.png": ((20, 30, 4), np.uint8),
        "gray.jpg": ((32, 32), np.uint8),
        "min.bmp": ((8, 8, 3), np.uint8),
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    for name, (shape, dtype) in good.items():
        (folder / name).write_bytes(encoded(Path(name).suffix, shape, dtype))
    emit = Collector()
    camera = CameraConfig(id="grabber", source=str(folder), product_class="widget", settle_ms=20, reconnect_min_s=0.05)
    source = open_source(camera, emit, max_frame_pixels=LIMIT)
    source.start()
    rejected = folder / "rejected"
    parts = len(bad) - 2  # every image file stands for a part: an unreadable one is an error frame (an ERROR result)
    try:
        assert wait_until(
            lambda: len(emit) == len(good) + parts and len(list(rejected.glob("*.reason.txt"))) == len(bad), 20
        )
        (folder / "after.png").write_bytes(encoded(".png", (48, 64, 3)))  # and the source goes on
        assert wait_until(lambda: len(emit) == len(good) + parts + 1, 10)
        assert source.status().state == "running" and source.status().errors == len(bad)
        errors = sorted(f.part_id for f in emit.snapshot() if f.error is not None)
        assert errors == sorted(Path(n).stem for n in bad if n not in ("notes.txt", "noext")), errors
    finally:
        stop_promptly(source)
    reasons = {p.name.removesuffix(".reason.txt"): p.read_text().strip() for p in rejected.glob("*.reason.txt")}
    assert reasons == {
        "empty.png": "image file is empty",
        "cut.jpg": "cannot decode: corrupt, truncated or not a supported image format",
        "noise.bmp": "cannot decode: corrupt, truncated or not a supported image format",
        "notes.txt": "not an image file name (.txt); expected .bmp, .jpeg, .jpg, .png, .tif, .tiff",
        "noext": "not an image file name (no extension); expected .bmp, .jpeg, .jpg, .png, .tif, .tiff",
        "dot.png": "frame of 1x1 px is too small",
        "tiny.png": "frame of 7x7 px is too small",
        "float.tif": "unsupported float32 pixels: need 8- or 16-bit",
        "wide.png": "image is 20000x20000 = 400000000 pixels, over the limit of 50000000 ([model].max_frame_pixels)",
    }
    assert sorted(p.name for p in rejected.iterdir() if not p.name.endswith(".txt") or p.name == "notes.txt") == sorted(
        bad
    )
    frames = {f.part_id: f.image for f in emit.snapshot() if f.error is None}
    expected_shapes = {Path(n).stem: s if len(s) < 3 or s[2] != 4 else (*s[:2], 3) for n, (s, _) in good.items()}
    assert {k: v.shape for k, v in frames.items() if k != "after"} == expected_shapes
    assert frames["gray16"].dtype == frames["colour16"].dtype == np.uint16


# --- frames of odd sizes and depths, straight to the engine ---------------------------------------------


@pytest.fixture(scope="module")
def engine() -> Any:
    from model import Engine
    from tests.factories import tiny_config

    engine = Engine(tiny_config(max_frame_pixels=4_000_000), max_batch=4)
    engine.classes.register("widget")
    return engine


ODD_FRAMES: dict[str, Any] = {
    "8x8": np.full((8, 8, 3), 200, np.uint8),
    "17x3001": np.random.default_rng(2).integers(0, 256, (17, 3001, 3), dtype=np.uint8),
    "3001x17 gray": np.random.default_rng(3).integers(0, 256, (3001, 17), dtype=np.uint8),
    "gray16 black": np.zeros((64, 80), np.uint16),
    "gray16 white": np.full((64, 80), 65535, np.uint16),
    "colour16": np.random.default_rng(4).integers(0, 65536, (50, 60, 3), dtype=np.uint16),
    "HxWx1": np.full((40, 40, 1), 7, np.uint8),
    "BGRA16": np.full((30, 30, 4), 1000, np.uint16),
    "all black": np.zeros((120, 160, 3), np.uint8),
}
REFUSED_FRAMES: dict[str, tuple[Any, str]] = {
    "1x1": (np.zeros((1, 1, 3), np.uint8), "frame of 1x1 px is too small"),
    "7x300": (np.zeros((7, 300), np.uint8), "frame of 300x7 px is too small"),
    "0x0": (np.zeros((0, 0, 3), np.uint8), "frame of 0x0 px is too small"),
    "float": (np.zeros((32, 32, 3), np.float32), "expected uint8 or uint16 pixels, got float32"),
    "int32": (np.zeros((32, 32), np.int32), "expected uint8 or uint16 pixels, got int32"),
    "2 channels": (np.zeros((32, 32, 2), np.uint8), "expected HxW gray or HxWx3 BGR, got shape (32, 32, 2)"),
    "4-D": (np.zeros((2, 32, 32, 3), np.uint8), "expected HxW gray or HxWx3 BGR, got shape (2, 32, 32, 3)"),
    "bytes": (b"\x89PNG", "expected a numpy array, got bytes"),
    "over the limit": (np.zeros((2001, 2000), np.uint8), "over the limit of 4000000 pixels ([model].max_frame_pixels)"),
}


def test_odd_frames_are_scored_or_refused_by_name_and_the_batch_goes_on(engine: Any) -> None:
    from agent.frames import Frame
    from agent.results import build_inspection

    names = [*ODD_FRAMES, *REFUSED_FRAMES]
    batch = [*ODD_FRAMES.values(), *(frame for frame, _ in REFUSED_FRAMES.values())]
    outcomes = engine.predict(batch, ["widget"] * len(batch))
    assert len(outcomes) == len(batch)
    for name, frame, outcome in zip(names, batch, outcomes, strict=True):
        if name in REFUSED_FRAMES:
            assert not outcome.ok and REFUSED_FRAMES[name][1] in outcome.reason, (name, outcome)
            continue
        assert outcome.ok, (name, outcome)
        assert 0.0 <= outcome.score <= 1.0 and outcome.frame_size == frame.shape[:2]
        assert outcome.is_anomalous == bool(outcome.defects), name
        image = frame if isinstance(frame, np.ndarray) and frame.size else np.zeros((8, 8), np.uint8)
        result = build_inspection(
            Frame("cam-1", 1, name, "widget", image, datetime.now(UTC)),
            outcome,
            line="l1",
            window_s=2.0,
            maps="all",
            map_size=None,
            model={"backbone": "genclip-tiny"},
        ).result
        json.dumps(result, allow_nan=False)
        for defect in result["defects"]:
            x, y, w, h = defect["bbox"]
            assert x >= 0 and y >= 0 and x + w <= frame.shape[1] and y + h <= frame.shape[0], (name, defect)


# --- the same refusals through `genclip score` and the running service --------------------------------


@pytest.fixture
def restore_logging() -> Any:
    """CLI verbs point logging at CliRunner's stream, which closes after the call; undo that afterwards."""
    import logging

    import structlog

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.reset_defaults()


def repo_config(tmp_path: Path, **model: Any) -> Path:
    import tomllib

    import tomli_w

    data = tomllib.loads((REPO / "config.toml").read_text())
    data["model"].update(device="cpu", **model)
    path = tmp_path / "line.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def test_genclip_score_refuses_the_huge_png_by_the_configured_limit(
    huge_png: Path, tmp_path: Path, restore_logging: None
) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    small = tmp_path / "small.png"
    small.write_bytes(encoded(".png", (48, 64, 3)))
    config = repo_config(tmp_path, max_frame_pixels=10_000_000)
    args = ["score", str(huge_png), str(small), "--class", "widget", "--config", str(config)]
    result = CliRunner().invoke(app, args)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert result.exit_code == 1, result.output  # one input failed
    assert records[0] == {
        "path": str(huge_png),
        "error": "image is 20000x20000 = 400000000 pixels, over the limit of 10000000 ([model].max_frame_pixels)",
    }
    assert records[1]["path"] == str(small) and 0.0 <= records[1]["score"] <= 1.0


def test_the_service_rejects_bad_files_and_goes_on_inspecting(
    huge_png: Path, tmp_path: Path, mosquitto: Any, redis_server: Any
) -> None:
    from agent.config import InspectConfig
    from agent.service import InspectionService
    from tests.factories import tiny_config
    from tests.source_fixtures import wait_until

    folder = tmp_path / "grabber"
    folder.mkdir()
    model = tiny_config(max_frame_pixels=1_000_000).model_dump(mode="json", exclude_none=True, by_alias=True)
    camera = {"id": "cam-1", "source": str(folder), "product_class": "widget", "settle_ms": 20, "max_age_ms": 0}
    cfg = InspectConfig(
        line={"id": "badinput"},
        model=model,
        cameras=[camera],
        mqtt={"port": mosquitto.port},
        redis={"url": redis_server.url},
        agent={"health_port": 0, "shutdown_timeout_s": 10},
    )
    service = InspectionService(cfg)
    service.start()
    try:
        files = {
            "huge.png": huge_png.read_bytes(),
            "big.png": claims(".png", 1001, 1000),
            "empty.jpg": b"",
            "cut.png": encoded(".png", (100, 100, 3))[:200],
            "readme.md": b"# not a picture",
            "dot.png": encoded(".png", (1, 1)),
        }
        for name, data in files.items():
            (folder / name).write_bytes(data)
        for i in range(3):
            (folder / f"good-{i}.png").write_bytes(encoded(".png", (60 + i, 80, 3), seed=i))
        reasons = folder / "rejected"
        assert wait_until(lambda: len(list(reasons.glob("*.reason.txt"))) == len(files), 30)
        # Each unreadable picture of a part is an ERROR result (a reject for the PLC); readme.md is no part.
        unreadable = len(files) - 1
        assert wait_until(lambda: service.metrics_results_by_verdict().get("ERROR") == unreadable, 30)
        assert wait_until(lambda: sum(service.metrics_results_by_verdict().values()) == 3 + unreadable, 30)
        assert (reasons / "huge.png.reason.txt").read_text() == (
            "image is 20000x20000 = 400000000 pixels, over the limit of 1000000 ([model].max_frame_pixels)\n"
        )
        assert (reasons / "big.png.reason.txt").read_text().startswith("image is 1001x1000 = 1001000 pixels")
        assert service.health_reasons() == [] and service.sources["cam-1"].status().state == "running"
    finally:
        service.shutdown()
    snap = service.ledger.snapshot()
    assert snap.accepted == snap.published == 3 + unreadable and snap.in_flight == 0
    import redis

    stream = redis.Redis.from_url(redis_server.url).xrange("genclip:badinput:results")
    results = [json.loads(fields[b"payload"]) for _, fields in stream]
    errors = {r["part_id"]: r["error"] for r in results if r["verdict"] == "ERROR"}
    assert set(errors) == {"huge", "big", "empty", "cut", "dot"}, errors
    assert errors["huge"].startswith("huge.png: image is 20000x20000") and errors["cut"].startswith("cut.png: cannot")


# --- checkpoints -----------------------------------------------------------------------------------------
# (tests/test_engine.py: for another backbone, weights, image size or layers; garbage, truncated,
#  another format, tensors of the wrong shape, missing: each refused naming the problem, the running
#  prompts serving on. tests/test_security.py: pickles.)


@pytest.fixture(scope="module")
def checkpoint(engine: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.factories import perturbed_checkpoint, tiny_config

    path = tmp_path_factory.mktemp("ckpt") / "good.safetensors"
    perturbed_checkpoint(path, engine.backbone, tiny_config())
    return path


def header(value: Any) -> bytes:
    """A safetensors file of only a JSON header (no tensors)."""
    text = json.dumps(value).encode()
    return struct.pack("<Q", len(text)) + text


def test_empty_and_tiny_checkpoints_are_refused(engine: Any, tmp_path: Path) -> None:
    from model import CheckpointError

    for data, message in [
        (b"", "too short"),
        (b"\x05\x00", "too short"),
        (struct.pack("<Q", 2) + b"{}", "without a GenCLIP header"),
        (struct.pack("<Q", 4) + b"null", "without a GenCLIP header"),
        (struct.pack("<Q", 2**40) + b"{}", "not a readable safetensors file"),
        (struct.pack("<Q", 2) + b"[]", "without a GenCLIP header"),
        (header({"__metadata__": ["genclip"]}), "without a GenCLIP header"),
        (header({"__metadata__": {"genclip": 7}}), "without a GenCLIP header"),
        (header({"__metadata__": {"genclip": "[1, 2]"}}), "a JSON list, not an object"),
        (header({"__metadata__": {"genclip": '"text"'}}), "a JSON str, not an object"),
    ]:
        path = tmp_path / "c.safetensors"
        path.write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            engine.prepare_prompts(path)


HEADER_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    # Small, or too large to allocate at all: a regression then fails the test instead of exhausting memory.
    st.integers(min_value=-5, max_value=100) | st.sampled_from([2**31, 2**40, -(2**40)]),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 40), max_size=6),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("query_tokens", 2**40, "header field 'query_tokens' is 1099511627776, not a length of 1 to 32"),
        ("state_tokens", 0, "header field 'state_tokens' is 0, not a length of 1 to 32"),
        ("defect_tokens", "2", "header field 'defect_tokens' is '2', not a length of 1 to 16"),
        ("defect_tokens", True, "header field 'defect_tokens' is True"),
        ("query_tokens", None, "header field 'query_tokens' is None"),
    ],
)
def test_prompt_lengths_in_the_header_are_checked_before_the_model_is_built(
    engine: Any, checkpoint: Path, tmp_path: Path, field: str, value: Any, message: str
) -> None:
    """The model is sized from these before its tensors are compared: 2**40 tokens must not be allocated."""
    from model import CheckpointError
    from model.checkpoint import read_checkpoint, save_checkpoint

    found = read_checkpoint(checkpoint)
    path = tmp_path / "edited.safetensors"
    save_checkpoint(path, found.tensors, {**found.meta, field: value})
    with pytest.raises(CheckpointError, match=re.escape(message)):
        engine.prepare_prompts(path)
    meta = {k: v for k, v in found.meta.items() if k != field}
    save_checkpoint(path, found.tensors, meta)
    with pytest.raises(CheckpointError, match=f"header lacks prompt lengths \\('{field}'\\)"):
        engine.prepare_prompts(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    changes=st.dictionaries(
        st.sampled_from(
            ["query_tokens", "state_tokens", "defect_tokens", "layers", "image_size", "backbone", "format_version"]
        ),
        HEADER_VALUES,
        min_size=1,
        max_size=3,
    )
)
def test_a_checkpoint_header_with_any_values_is_loaded_or_refused(
    engine: Any, checkpoint: Path, tmp_path: Path, changes: dict[str, Any]
) -> None:
    from model import CheckpointError
    from model.checkpoint import read_checkpoint, save_checkpoint

    found = read_checkpoint(checkpoint)
    path = tmp_path / "edited.safetensors"
    try:
        save_checkpoint(path, found.tensors, {**found.meta, **changes})
    except ValueError:  # NaN in the header: json.dumps writes it, which is fine for this test too
        return
    try:
        engine.prepare_prompts(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_checkpoint_is_loaded_or_refused(engine: Any, checkpoint: Path, data: st.DataObject) -> None:
    from model import CheckpointError
    from model.checkpoint import parse_checkpoint

    raw = bytearray(checkpoint.read_bytes())
    cut = data.draw(st.integers(0, len(raw)), label="cut")
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=4))
    for at, value in flips:
        raw[at] = value
    try:
        parse_checkpoint(bytes(raw[:cut] if cut < len(raw) else raw), "damaged.safetensors")
    except CheckpointError as exc:
        assert str(exc).startswith("damaged.safetensors: ")


# --- class profiles from other prompts -----------------------------------------------------------------
# (tests/test_engine_service.py: register_class with a profile calibrated on other prompts or
#  settings reports stale-calibration and the default threshold.)


def good_parts(count: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    base = rng.integers(60, 200, (64, 64, 3), dtype=np.uint8)
    return [np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8) for _ in range(count)]


def test_a_saved_profile_of_other_prompts_is_stale_or_recalibrated_never_used(engine: Any, tmp_path: Path) -> None:
    import structlog.testing

    from model import Engine
    from model.profile import ClassProfile, profile_history, profile_path
    from tests.factories import perturbed_checkpoint, tiny_config

    first, second, profiles = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "profiles"
    perturbed_checkpoint(first, engine.backbone, tiny_config(), seed=1, scale=0.2)
    perturbed_checkpoint(second, engine.backbone, tiny_config(), seed=2, scale=0.2)
    old = Engine(tiny_config(checkpoint=first, profile_dir=profiles), backbone=engine.backbone)
    saved = old.classes.setup("widget", good_parts())
    assert saved.calibration is not None and old.classes.threshold("widget")[1] == "calibration"
    path = profile_path(profiles, "widget")
    assert ClassProfile.load(path).calibration.prompt_version == old.prompt_version

    new = Engine(tiny_config(checkpoint=second, profile_dir=profiles), backbone=engine.backbone)
    with structlog.testing.capture_logs() as logs:
        new.classes.setup("widget")  # no reference images: nothing to recalibrate on
    value, source = new.classes.threshold("widget")
    assert (value, source) == (new.config.default_threshold, "stale-calibration")
    assert (
        new.classes.status("widget").stale_reason == f"measured on prompts {old.prompt_version}, running other prompts"
    )
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == [
        "calibration does not hold; using the default threshold"
    ]
    prediction = new.predict(good_parts(1), ["widget"])[0]
    assert prediction.threshold_source == "stale-calibration" and prediction.threshold == value

    again = Engine(tiny_config(checkpoint=second, profile_dir=profiles), backbone=engine.backbone)
    recalibrated = again.classes.setup("widget", good_parts)  # with references: measured anew on these prompts
    assert again.classes.threshold("widget") == (recalibrated.calibration.threshold, "calibration")
    assert recalibrated.calibration.prompt_version == again.prompt_version != old.prompt_version
    assert ClassProfile.load(path).calibration.prompt_version == again.prompt_version  # saved for the next start

    # New prompts arrive while it runs (the trainer's timer): recalibrated on them, and saved, the previous
    # calibration kept in history/, so a restart scores as the running agent does.
    third = tmp_path / "c.safetensors"
    perturbed_checkpoint(third, engine.backbone, tiny_config(), seed=3, scale=0.2)
    before = len(profile_history(profiles, "widget"))
    version = again.load_prompts(third)
    assert again.classes.threshold("widget")[1] == "calibration"
    assert ClassProfile.load(path).calibration.prompt_version == version == again.prompt_version
    assert len(profile_history(profiles, "widget")) == before + 1


def test_a_stale_calibration_shows_in_health(engine: Any, tmp_path: Path, mosquitto: Any, redis_server: Any) -> None:
    """Calibrated by hand, then retrained without [references]: the class falls back to default_threshold,
    which may reject every part; /healthz says so instead of staying green."""
    from agent.config import InspectConfig
    from agent.service import InspectionService
    from model import Engine
    from tests.factories import perturbed_checkpoint, tiny_config

    first, second, profiles = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "profiles"
    perturbed_checkpoint(first, engine.backbone, tiny_config(), seed=1, scale=0.2)
    perturbed_checkpoint(second, engine.backbone, tiny_config(), seed=2, scale=0.2)
    Engine(tiny_config(checkpoint=first, profile_dir=profiles), backbone=engine.backbone).classes.setup(
        "widget", good_parts()
    )
    model = tiny_config(checkpoint=second, profile_dir=profiles).model_dump(mode="json", exclude_none=True)
    camera = {"id": "cam-1", "source": "synthetic:1", "product_class": "widget", "fps": 2}
    cfg = InspectConfig(
        line={"id": "stale"}, model=model, cameras=[camera], mqtt={"port": mosquitto.port},
        redis={"url": redis_server.url}, agent={"health_port": 0},
    )  # fmt: skip
    service = InspectionService(cfg)
    try:
        service.start()
        [reason] = [r for r in service.health_reasons() if r.startswith("class widget")]
        assert "measured on prompts a@" in reason and "scoring against default_threshold (0.5)" in reason
    finally:
        service.shutdown()


def test_an_unreadable_profile_is_set_up_again_with_a_warning(engine: Any, tmp_path: Path) -> None:
    import structlog.testing

    from model import Engine
    from model.profile import profile_path
    from tests.factories import tiny_config

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for text in ("{not json", '{"format": "genclip-class-profile", "format_version": 1}', "[1, 2]", '"x"', "\xff"):
        profile_path(profiles, "widget").write_text(text)
        fresh = Engine(tiny_config(profile_dir=profiles), backbone=engine.backbone)
        with structlog.testing.capture_logs() as logs:
            profile = fresh.classes.setup("widget")
        assert profile.class_word_source == "unfiltered" and fresh.classes.threshold("widget")[1] == "default"
        [warning] = [e for e in logs if e["event"] == "class profile unusable; setting the class up again"]
        assert str(profile_path(profiles, "widget")) in warning["error"]


# --- configuration ---------------------------------------------------------------------------------------
# (tests/test_config.py: unknown keys in four sections, eight bad values, every error at once, a missing
#  checkpoint, an unreadable password_file, broken TOML, config show masks secrets.)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("GENCLIP_") or key == "CREDENTIALS_DIRECTORY":
            monkeypatch.delenv(key)


BROKEN = """
[line]
id = "line-1"
colour = "red"
[model]
backbone = "genclip-tiny"
pretrained = "random"
checkpoint = "/nonexistent/prompts.safetensors"
[engine]
batch_size = "eight"
max_wait_ms = [20]
[[cameras]]
id = "cam-1"
source = "/srv/grabber"
product_class = "widget"
fps = "fast"
[thresholds]
widget = "high"
[references]
widget = "/nonexistent/good-parts"
[mqtt]
port = "1883"
qos = 1.5
username = 7
password_file = "/nonexistent/mqtt-password"
hots = "10.0.0.5"
[mqtt.tls]
enabled = "maybe"
ca_file = "/nonexistent/ca.crt"
[redis]
url = "http://127.0.0.1:6379"
password_file = "~no-such-user-here/redis-password"
[agent]
health_port = 70000
[logging]
level = "LOUD"
"""

EXPECTED_ERRORS = {
    "line.colour": "unknown key",
    "model": "checkpoint: prompt checkpoint (file or folder) not found: /nonexistent/prompts.safetensors",
    "engine.batch_size": "valid integer",
    "engine.max_wait_ms": "valid number",
    "cameras.0.fps": "valid number",
    "thresholds.widget": "valid number",
    "references.widget": "reference folder not found: /nonexistent/good-parts",
    "mqtt.qos": "valid integer",
    "mqtt.username": "valid string",
    "mqtt.password_file": "cannot read password file /nonexistent/mqtt-password: No such file or directory",
    "mqtt.hots": "unknown key",
    "mqtt.tls.enabled": "valid boolean",
    "mqtt.tls.ca_file": "cannot read /nonexistent/ca.crt: No such file or directory",
    "redis.url": "must start with redis://",
    "redis.password_file": "cannot read password file ~no-such-user-here/redis-password",
    "agent.health_port": "less than or equal to 65535",
    "logging.level": "'DEBUG', 'INFO', 'WARNING' or 'ERROR'",
}


def test_config_check_names_every_bad_key_and_exits_2(tmp_path: Path, clean_env: None) -> None:
    from typer.testing import CliRunner

    from cli.main import app

    path = tmp_path / "line.toml"
    path.write_text(BROKEN)
    result = CliRunner().invoke(app, ["config", "check", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"config error in {path}:\n")
    lines = [line.strip() for line in result.output.splitlines()[1:]]
    for key, message in EXPECTED_ERRORS.items():
        assert any(line.startswith(f"{key}: ") and message in line for line in lines), (key, result.output)
    named = {line.split(":")[0] for line in lines}
    assert named == set(EXPECTED_ERRORS), named  # port = "1883" is read as 1883, like the environment's strings
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "path",
    ["~no-such-user-here/p.safetensors", "x" * 300 + ".safetensors", "/nonexistent/" + "y" * 300],
    ids=["unknown user", "name too long", "folder name too long"],
)
def test_odd_paths_are_config_errors_not_crashes(tmp_path: Path, clean_env: None, path: str) -> None:
    """pathlib raises on '~user' of an unknown user and on names over NAME_MAX; both used to escape as tracebacks."""
    from typer.testing import CliRunner

    from cli.main import app

    config = tmp_path / "line.toml"
    config.write_text(f'[model]\npretrained = "random"\ncheckpoint = "{path}"\n[references]\nwidget = "{path}"\n')
    result = CliRunner().invoke(app, ["config", "check", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert f"checkpoint: prompt checkpoint (file or folder) not found: {path}" in result.output
    assert f"references.widget: reference folder not found: {path}" in result.output


SECTIONS: dict[str, list[str]] = {
    "line": ["id", "name"],
    "model": ["pretrained", "checkpoint", "model_config", "image_size", "device", "layers", "profile_dir"],
    "engine": ["batch_size", "max_wait_ms"],
    "mqtt": ["port", "password", "password_file", "qos", "topic_prefix", "tls"],
    "redis": ["url", "password_file", "maps"],
    "agent": ["health_port", "prompt_dir", "shutdown_timeout_s"],
    "logging": ["level", "format"],
    "thresholds": ["widget", "gadget"],
    "references": ["widget"],
}
SCALARS = (
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(
        ["", "random", "genclip-tiny", "~", "~nobody-at-all/x", "/nonexistent/x", "redis://h:1/0", "a\0b"]
    )
    | st.text(max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


PATHS = st.sampled_from(["~", "~nobody-at-all/x", "/nonexistent/x", "/", "/dev/null", ".", "a\0b", "x" * 300])


def section(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), PATHS | VALUES, max_size=4)


CONFIGS = st.fixed_dictionaries(
    {"model": st.fixed_dictionaries({"pretrained": st.just("random")})},
    optional={name: section(keys) for name, keys in SECTIONS.items() if name != "model"}
    | {"cameras": st.lists(section(["id", "source", "product_class", "fps", "kind"]), max_size=2), "x": VALUES},
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=CONFIGS, model_extra=section(SECTIONS["model"]))
def test_any_config_file_is_loaded_or_refused_with_a_list_of_errors(
    data: dict[str, Any], model_extra: dict[str, Any], tmp_path: Path, clean_env: None
) -> None:
    import tomli_w

    from agent.config import ConfigError, InspectConfig, load_config

    data["model"] = {**data["model"], **model_extra}
    try:
        text = tomli_w.dumps(data)
    except (TypeError, ValueError):  # not representable in TOML (NUL in a key...): not a config file
        return
    path = tmp_path / "any.toml"
    path.write_text(text, encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert exc.errors and all(isinstance(e, str) and ": " in e for e in exc.errors), exc.errors
    else:
        assert isinstance(config, InspectConfig)


# --- commands --------------------------------------------------------------------------------------------
# (tests/test_control.py: valid and invalid payloads, size limit, arbitrary names and payloads never raise
#  anything but CommandError; tests/test_publish_mqtt.py: malformed, oversized, wrongly typed and unknown
#  commands answered with an error over MQTT, the handler never called; tests/test_security.py: only this
#  line's cmd/<name> topics are listened to.)

CLASS_NAMES = st.text(min_size=1, max_size=200)
CAMERA_NAMES = st.none() | st.text(min_size=1, max_size=200)
VALID_COMMANDS = st.one_of(
    st.tuples(st.sampled_from(["reload", "snapshot"]), st.just({})),
    st.tuples(
        st.just("threshold"),
        st.fixed_dictionaries({"class": CLASS_NAMES, "value": st.floats(0.0, 1.0) | st.integers(0, 1)}),
    ),
    st.tuples(st.sampled_from(["pause", "resume"]), st.fixed_dictionaries({}, optional={"camera": CAMERA_NAMES})),
)


@settings(max_examples=200, deadline=None)
@given(command=VALID_COMMANDS, correlation=st.none() | st.binary(max_size=16), spaces=st.booleans())
def test_every_valid_command_round_trips(command: tuple[str, dict[str, Any]], correlation: Any, spaces: bool) -> None:
    from agent.control import parse_command

    name, args = command
    payload = json.dumps(args, indent=2 if spaces else None).encode()
    if len(payload) > 4096:
        return
    parsed = parse_command(name, payload, correlation=correlation)
    assert parsed.name == name and parsed.correlation == correlation
    dumped = parsed.args.model_dump(by_alias=True, exclude_unset=True)
    expected = {k: float(v) if k == "value" else v for k, v in args.items()}
    assert dumped == expected and json.loads(json.dumps(dumped)) == expected
    assert parse_command(name, json.dumps(dumped).encode()).args == parsed.args  # and back again


# --- the result schema -----------------------------------------------------------------------------------

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"
RESULT_KEYS = {
    "schema", "line", "camera", "seq", "run_id", "part_id", "product_class", "captured_at", "published_at",
    "latency_ms", "trigger", "missed_triggers", "camera_frame_id", "camera_timestamp", "score", "threshold",
    "threshold_source", "verdict", "defects", "model", "map_key",
}  # fmt: skip
UNIT = st.floats(0.0, 1.0)


@st.composite
def outcomes(draw: st.DrawFn) -> Any:
    """What the engine returns for one frame: a FrameError, or a Prediction with NG iff regions."""
    if draw(st.integers(0, 3)) == 0:
        return FrameError(0, "widget", draw(st.text(min_size=1, max_size=80)))
    score, threshold = draw(UNIT), draw(UNIT)
    ng = score >= threshold
    height, width = draw(st.integers(8, 4000)), draw(st.integers(8, 4000))
    defect = st.builds(
        Defect,
        type=st.sampled_from(["scratch", "hole", "stain", "missing part"]),
        type_probability=UNIT | st.just(float("nan")),
        score=UNIT,
        area=st.integers(1, height * width),
        bbox=st.tuples(st.integers(0, width - 1), st.integers(0, height - 1), st.integers(1, 50), st.integers(1, 50)),
    )
    defects = draw(st.lists(defect, min_size=1, max_size=4)) if ng else []
    source = draw(st.sampled_from(["config", "command", "calibration", "stale-calibration", "default"]))
    level = draw(UNIT)
    return Prediction(
        "widget", score, threshold, source, ng, np.full((16, 16), level, np.float32), (height, width), defects,
        "prompts@0123456789ab", draw(UNIT), level, draw(UNIT), "widget", "unfiltered",
    )  # fmt: skip


@settings(max_examples=150, deadline=None)
@given(
    outcome=outcomes(),
    seq=st.integers(1, 2**53),
    camera=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True),
    part=st.text(min_size=1, max_size=40),
    maps=st.sampled_from(["all", "ng", "none"]),
    window_s=st.floats(0.001, 3600),
)
def test_every_result_has_the_documented_fields_and_types(
    outcome: Any, seq: int, camera: str, part: str, maps: str, window_s: float
) -> None:
    from agent.frames import Frame
    from agent.publish.redis_streams import stream_fields
    from agent.results import build_inspection

    frame = Frame(camera, seq, part, "widget", np.zeros((8, 8), np.uint8), datetime.now(UTC))
    model = {"backbone": "genclip-tiny", "weights": "random-init:seed=0", "prompt_version": "untrained"}
    inspection = build_inspection(frame, outcome, line="l1", window_s=window_s, maps=maps, map_size=None, model=model)
    result = json.loads(json.dumps(inspection.result, allow_nan=False))  # JSON, finite numbers only
    verdict = result["verdict"]
    assert set(result) >= RESULT_KEYS and result["schema"] == 1
    assert (result["line"], result["camera"], result["seq"], result["part_id"]) == ("l1", camera, seq, part)
    assert re.fullmatch(ISO, result["captured_at"]) and re.fullmatch(ISO, result["published_at"])
    assert isinstance(result["latency_ms"], float) and math.isfinite(result["latency_ms"])
    assert set(result["model"]) == {"backbone", "weights", "prompt_version"}
    if verdict == "ERROR":
        assert set(result) == RESULT_KEYS | {"error"} and result["error"] == outcome.reason
        assert result["score"] is result["threshold"] is result["threshold_source"] is result["map_key"] is None
        assert result["defects"] == [] and inspection.defect_types == ["inspection-error"]
    else:
        assert set(result) == RESULT_KEYS | {"class_word"} and result["class_word"] == "widget"
        assert verdict == ("NG" if outcome.is_anomalous else "OK")
        assert 0.0 <= result["score"] <= 1.0 and 0.0 <= result["threshold"] <= 1.0
        assert result["threshold_source"] in ("config", "command", "calibration", "stale-calibration", "default")
        assert (len(result["defects"]) > 0) == (verdict == "NG"), "NG has regions, OK has none"
        stored = maps == "all" or (maps == "ng" and verdict == "NG")
        assert (result["map_key"] == f"genclip:l1:map:{camera}:{seq}") == stored == (inspection.map_png is not None)
        assert inspection.defect_types == list(dict.fromkeys(d["type"] for d in result["defects"]))
    for defect in result["defects"]:
        assert set(defect) == {"type", "type_probability", "score", "area_px", "bbox"}
        p = defect["type_probability"]
        assert p is None or 0.0 <= p <= 1.0
        assert isinstance(defect["area_px"], int) and [type(v) for v in defect["bbox"]] == [int] * 4
    for payload in (inspection.reject_payload(), inspection.decision_payload()):
        signal = json.loads(json.dumps(payload, allow_nan=False))
        assert signal["verdict"] == verdict and signal["part_id"] == part and re.fullmatch(ISO, signal["deadline"])
    assert inspection.decision_payload()["reject"] is (verdict != "OK") is inspection.rejects
    fields = stream_fields(inspection)
    assert json.loads(fields["payload"]) == result and fields["verdict"] == verdict
    assert fields["score"] == ("" if result["score"] is None else str(result["score"]))
