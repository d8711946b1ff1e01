"""A trainer a user can trust: model selection on held-out classes, runs that never clobber,
calibration that says what it knows, clear errors, quiet logs, files the service can read."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import stat
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from agent.logs import configure_logging
from cli.main import app
from model import Engine
from model.profile import (
    Calibration,
    CalibrationSettings,
    ClassProfile,
    images_to_resolve,
    profile_history,
    profile_path,
    resolvable_quantile,
    threshold_from_good,
)
from synthetic.textures import write_good_images
from tests.factories import frames, tiny_config
from tests.test_trainer import synthetic_set
from trainer.config import TrainerConfig
from trainer.datasets import DatasetError, open_dataset
from trainer.training import PromptTrainer, RunFolderError
from trainer.validation import ValidationRecords, bootstrap_interval, plan_validation

FOUR = ("woven", "grain", "metal", "dots")
runner = CliRunner()


def settings(**overrides) -> TrainerConfig:
    values = {"epochs": 2, "batch_size": 8, "workers": 0, "image_size": 96, "min_validation_images": 5}
    return TrainerConfig(**(values | overrides))


@pytest.fixture(scope="module")
def four_classes(tmp_path_factory) -> Path:
    return synthetic_set(tmp_path_factory.mktemp("four") / "data", FOUR, 30, seed=5, size=96)


@pytest.fixture(scope="module")
def one_class(tmp_path_factory) -> Path:
    return synthetic_set(tmp_path_factory.mktemp("one") / "data", ("woven",), 12, seed=6, size=96)


# --- model selection -------------------------------------------------------------------------------
def test_leave_classes_out_holds_whole_classes_out_and_validates_on_them(four_classes, tmp_path):
    samples = open_dataset(f"synthetic:{four_classes}@all")
    plan = plan_validation(samples, settings())
    assert plan.rule == "held-out classes" and len(plan.held_out) == 1
    assert {s.product_class for s in plan.val} == set(plan.held_out)
    assert not {s.product_class for s in plan.train} & set(plan.held_out)
    assert len(plan.train) + len(plan.val) == len(samples)
    assert plan.good == sum(s.label == 0 for s in plan.val) and plan.defective == len(plan.val) - plan.good
    assert plan_validation(samples, settings()).held_out == plan.held_out  # the seed decides, reproducibly
    named = plan_validation(samples, settings(holdout_class_names=["metal", "dots"]))
    assert named.held_out == ("dots", "metal")
    with pytest.raises(ValueError, match="bottle not in the data"):
        plan_validation(samples, settings(holdout_class_names=["bottle"]))

    summary = PromptTrainer(
        tiny_config(), settings(), [f"synthetic:{four_classes}@all"], tmp_path / "run", show_progress=False
    ).run()
    assert summary.validation["held_out_classes"] == list(plan.held_out)
    assert summary.train_images == len(plan.train) and summary.val_images == len(plan.val)
    assert "held-out class(es)" in summary.selection
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    for record in log:
        interval = record["val"]["interval"]
        held = plan.held_out[0]
        assert interval["counts"] == {held: {"good": plan.good, "defective": plan.defective}}
        for key in ("image_auroc", "pixel_auroc"):
            low, high = interval[key]
            value = record["val"]["results"]["mean"][key]
            assert 0.0 <= low <= high <= 1.0 and low - 1e-9 <= value <= high + 0.05
    scores = {
        r["epoch"]: np.mean([r["val"]["results"]["mean"][k] for k in ("image_auroc", "pixel_auroc")]) for r in log
    }
    assert summary.best_epoch == max((1, 2), key=lambda e: (scores[e], -e))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["selection"] == summary.selection


def test_too_little_validation_data_is_said_at_start_and_best_is_the_last_epoch(one_class, tmp_path, capsys):
    samples = open_dataset(f"synthetic:{one_class}@all")
    plan = plan_validation(samples, settings())
    assert plan.rule == "last epoch" and plan.val == [] and len(plan.train) == len(samples)
    assert "1 product class(es)" in plan.reason and "at least 3" in plan.reason

    four = [
        dataclasses.replace(s, product_class=f"c{i % 4}") for i, s in enumerate(samples)
    ]  # 4 classes, 3 images each
    few = plan_validation(four, settings(min_validation_images=10))
    assert few.rule == "last epoch" and "validation needs at least 10 of each" in few.reason
    assert plan_validation(four, settings(holdout_classes=0)).reason.startswith("validation is off")

    result = runner.invoke(
        app,
        [
            *("train", "--data", f"synthetic:{one_class}@all", "--out", str(tmp_path / "run")),
            *("--epochs", "2", "--workers", "0", "--image-size", "96", "--no-progress"),
        ],
    )
    assert result.exit_code == 0, result.output
    warning = result.output.index("no validation; the last epoch will be kept")
    assert warning < result.output.index("epoch done")  # said at the start, before any training
    assert "selection: best = last epoch: the data has 1 product class(es)" in result.output
    assert "best epoch 2 (the last)" in result.output
    meta = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert meta["best_epoch"] == 2 and meta["validation"]["rule"] == "last epoch"


def test_bootstrap_interval_narrows_with_more_images():
    rng = np.random.default_rng(0)

    def records(n: int) -> ValidationRecords:
        out = ValidationRecords()
        for label in (0, 1):
            for score in rng.normal(0.4 + 0.2 * label, 0.15, n):
                out.add("a", label, float(score), np.zeros((4, 4)), None)
        return out

    small = bootstrap_interval(records(10), 300, seed=1)
    large = bootstrap_interval(records(400), 300, seed=1)
    assert small["counts"] == {"a": {"good": 10, "defective": 10}}
    width = lambda r: r["image_auroc"][1] - r["image_auroc"][0]  # noqa: E731
    assert width(large) < width(small) / 2
    assert "pixel_auroc" not in small  # no masks: no pixel interval is made up


# --- runs never clobber ----------------------------------------------------------------------------
def test_a_second_train_into_a_used_folder_fails_without_force(one_class, tmp_path):
    out = tmp_path / "run"
    args = [
        *("train", "--data", f"synthetic:{one_class}@all", "--out", str(out)),
        *("--epochs", "1", "--workers", "0", "--image-size", "96", "--no-progress"),
    ]
    assert runner.invoke(app, args).exit_code == 0
    best = (out / "best.safetensors").read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 2
    assert "is not empty" in again.output and "--resume" in again.output and "--force" in again.output
    assert (out / "best.safetensors").read_bytes() == best
    assert runner.invoke(app, [*args, "--resume", "--force"]).exit_code == 2

    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    epochs = [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert epochs == [1]  # one run's history, not two runs appended

    with pytest.raises(RunFolderError, match="--resume"):
        PromptTrainer(tiny_config(), settings(), [f"synthetic:{one_class}@all"], out, show_progress=False).run()


# --- calibration -----------------------------------------------------------------------------------
def test_resolvable_quantile_and_the_rule_that_replaces_it():
    assert images_to_resolve(0.995) == 200 and images_to_resolve(0.99) == 100 and images_to_resolve(0.9) == 10
    assert resolvable_quantile(24) == pytest.approx(0.9583, abs=1e-4)
    scores = np.linspace(0.1, 0.5, 24)
    threshold, rule = threshold_from_good(scores, 0.995, 0.1)
    assert rule == "max+margin" and threshold == pytest.approx(0.5 + 0.1 * (0.5 - 0.3))
    many = np.linspace(0.0, 1.0, 1001)
    threshold, rule = threshold_from_good(many, 0.995, 0.1)
    assert rule == "quantile" and threshold == pytest.approx(0.995)
    settings = CalibrationSettings("b", "w", 224, (2, 4), None, 0.5, 0.5, 4.0, 0.07, "fp32", "part")
    c = Calibration.from_scores(scores, 0.995, "v", "d", settings, margin=0.1)
    assert c.false_reject_rate == 0.0 and "needs 200 images, 24 resolve at most 0.958" in c.describe()


def calibrate_config(tmp_path: Path) -> Path:
    path = tmp_path / "line.toml"
    path.write_text((Path(__file__).resolve().parent.parent / "config.toml").read_text())
    return path


def test_calibrate_refuses_two_images_and_reports_the_resolvable_quantile_on_24(tmp_path):
    config = calibrate_config(tmp_path)
    profiles = tmp_path / "profiles"
    two = tmp_path / "two"
    write_good_images("tiles", two, 2, seed=1, size=96)
    result = runner.invoke(
        app, ["calibrate", "--class", "tiles", "--good", str(two), "--profiles", str(profiles), "-c", str(config)]
    )
    assert result.exit_code == 2
    assert "2 image file(s)" in result.output and "needs at least 20 good images" in result.output
    assert not profiles.exists()

    good = tmp_path / "good"
    write_good_images("tiles", good, 24, seed=2, size=96)
    write_good_images("tiles", good / "nested", 5, seed=3, size=96)  # not read without --recursive
    cv2.imwrite(str(good / "grid.png"), np.zeros((40, 300, 3), np.uint8))  # another size: not this class
    args = ["calibrate", "--class", "tiles", "--good", str(good), "--profiles", str(profiles), "-c", str(config)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # one image left out (the grid), said on stderr
    assert "grid.png: 300x40 pixels, unlike the other 96x96" in result.output
    assert "24 good image(s)" in result.output  # not the nested 5, not the grid
    assert "quantile 0.995 needs 200 images, 24 resolve at most 0.958" in result.output
    assert "max + 0.1 x (max - median)" in result.output and "rejects 0.0% of these images" in result.output
    for word in ("min", "median", "p95", "max"):
        assert f"{word} " in result.output
    first = ClassProfile.load(profile_path(profiles, "tiles"))
    assert first.calibration.rule == "max+margin" and first.calibration.images == 24
    assert stat.S_IMODE(profile_path(profiles, "tiles").stat().st_mode) == 0o644

    again = runner.invoke(app, [*args, "--recursive", "--quantile", "0.9"])
    assert "replaces the calibration of" in again.output and "images 24 -> 29," in again.output
    history = profile_history(profiles, "tiles")
    assert len(history) == 1 and ClassProfile.load(history[0]) == first


# --- errors, logs, file modes ----------------------------------------------------------------------
def test_a_bad_split_names_the_allowed_ones(one_class):
    with pytest.raises(DatasetError, match=r"unknown split 'val'; allowed splits: train, test, all"):
        open_dataset(f"mvtec:{one_class}@val")
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(f"mvtec:{one_class}/nope@test")


def test_val_fraction_in_a_config_says_what_replaced_it():
    with pytest.raises(ValueError, match="replaced by holdout_classes"):
        TrainerConfig(val_fraction=0.1)


def test_no_config_file_is_said_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("GENCLIP_CONFIG", raising=False)
    result = runner.invoke(app, ["config", "check"])
    assert result.output.count("no config file") == 1 and "using built-in defaults" in result.output
    missing = runner.invoke(app, ["config", "check", "--config", str(tmp_path / "nope.toml")])
    assert missing.exit_code == 2 and "file not found" in missing.output


def test_third_party_info_lines_are_debug():
    stream = io.StringIO()
    configure_logging("t", "INFO", "json", stream)
    logging.info("Parsing model identifier. Schema: None")  # how open_clip logs: the root logger
    logging.getLogger("trainer").info("ours")
    logging.getLogger("open_clip").warning("their warning")
    out = stream.getvalue()
    assert "Parsing model identifier" not in out and "ours" in out and "their warning" in out
    stream = io.StringIO()
    configure_logging("t", "DEBUG", "json", stream)
    logging.info("Parsing model identifier. Schema: None")
    assert '"level": "debug"' in stream.getvalue()
    configure_logging("t", "INFO", "json")


def test_published_and_run_checkpoints_are_readable_by_another_user(one_class, tmp_path):
    publish = tmp_path / "prompts"
    summary = PromptTrainer(
        tiny_config(image_size=96),  # the line runs at the size trained for: what it would refuse is not published
        settings(epochs=1),
        [f"synthetic:{one_class}@all"],
        tmp_path / "run",
        publish_dir=publish,
        show_progress=False,
    ).run()
    for path in (summary.published, summary.best, summary.last, tmp_path / "run" / "state.safetensors"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & stat.S_IROTH and mode & stat.S_IRGRP and not mode & (stat.S_IWOTH | stat.S_IWGRP), oct(mode)


def test_calibration_counts_only_the_images_given_not_the_batch_padding():
    """29 images are scored as 8+8+8+5 padded to 8: the 3 padding rows must not enter the statistics."""
    engine = Engine(tiny_config())
    goods = frames(29, seed=4, size=(96, 96))
    engine.classes.register("plate", goods[:8], calibrate=False)
    profile = engine.classes.calibrate("plate", goods, 0.9)
    scores = [p.score for p in engine.predict(goods, ["plate"] * len(goods))]
    assert profile.calibration.images == 29
    assert profile.calibration.score_max == pytest.approx(max(scores), abs=1e-5)
    assert profile.calibration.score_min == pytest.approx(min(scores), abs=1e-5)


def test_a_checkpoint_whose_header_length_starts_with_0x80_is_not_taken_for_a_pickle(tmp_path):
    """safetensors starts with its header length: 2944 bytes is 80 0b 00.. like a pickle's first byte.
    Training metadata grew to that size and the run failed; the '{' after the length decides."""
    import struct

    import torch

    from model.checkpoint import read_checkpoint, read_metadata, save_checkpoint

    path = tmp_path / "p.safetensors"
    for pad in range(0, 4000, 1):
        save_checkpoint(path, {"x": torch.zeros(2)}, {"pad": "#" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    head = path.read_bytes()[:9]
    assert head[0] == 0x80 and head[8:9] == b"{", struct.unpack("<Q", head[:8])
    assert read_metadata(path)["pad"].startswith("#") and read_checkpoint(path).tensors["x"].shape == (2,)
    pickled = tmp_path / "evil.safetensors"
    pickled.write_bytes(b"\x80\x04\x95" + b"\x00" * 40)
    with pytest.raises(Exception, match="it is a pickle"):
        read_metadata(pickled)
