"""Evaluation pictures that show the story: good parts and every defect kind, spread over the data,
each row judged with its score, the threshold and the verdict, and a colour scale."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from model import Engine
from synthetic.textures import write_good_images
from tests.factories import tiny_config
from trainer.datasets import open_dataset
from trainer.evaluate import evaluate, grid_choice, write_evaluation
from trainer.report import SCALE_WIDTH, TILE, TITLE_HEIGHT, GridExample, write_sample_grid
from trainer.synth import generate

KINDS = ["scratch", "hole", "stain"]


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("grids")
    for i, family in enumerate(("woven", "metal")):
        goods = write_good_images(family, root / "goods" / family, 30, seed=i, size=96)
        generate(goods[0].parent, root / "data", 40, seed=10 + i, kinds=KINDS, class_name=family)
    return root / "data"


def test_the_grid_shows_good_parts_and_each_kind_spread_over_the_class(two_classes):
    samples = open_dataset(f"synthetic:{two_classes}")
    chosen = grid_choice(samples, good=3, per_kind=2)
    for family in ("woven", "metal"):
        of_class = [s for s in samples if s.product_class == family]
        kinds = [chosen[str(s.image_path)] for s in of_class if str(s.image_path) in chosen]
        assert sorted(kinds) == sorted(["good"] * 3 + [k for k in KINDS for _ in range(2)])
        goods = sorted(str(s.image_path) for s in of_class if s.label == 0)
        picked = [goods.index(p) for p in sorted(p for p in chosen if p in goods)]
        assert picked[0] == 0 and picked[-1] == len(goods) - 1  # spread to both ends, not the first three
    assert grid_choice(samples, good=0, per_kind=0) == {}
    many = grid_choice(samples, good=1000, per_kind=0)  # never more than there are
    assert len(many) == sum(s.label == 0 for s in samples)


def test_rows_carry_score_threshold_and_verdict_and_the_picture_is_written(two_classes, tmp_path):
    engine = Engine(tiny_config(image_size=96))
    outcome = evaluate(engine, open_dataset(f"synthetic:{two_classes}"), grid_good=2, grid_per_kind=1)
    rows = outcome.examples["woven"]
    assert [r.kind for r in rows] == ["good", "good", *sorted(KINDS)]  # good parts first, then kinds
    threshold = engine.classes.threshold("woven")[0]
    for row in rows:
        assert row.threshold == threshold and row.score is not None
        assert row.verdict == ("NG" if row.score >= threshold else "OK")
        assert f"{row.score:.3f}" in row.caption() and f"{threshold:.3f}" in row.caption()
    written = write_evaluation(tmp_path, outcome, {"checkpoint": "untrained"})
    picture = cv2.imread(str(tmp_path / "samples_woven.png"))
    assert tmp_path / "samples_woven.png" in written
    assert picture.shape[:2] == (TITLE_HEIGHT + len(rows) * TILE, 3 * TILE + SCALE_WIDTH)


def test_captions_name_false_rejects_and_misses():
    blank = np.zeros((8, 8, 3), np.uint8)
    heat = np.zeros((8, 8))
    good_rejected = GridExample(blank, None, heat, "good", 0.7, 0.5, 0)
    missed = GridExample(blank, None, heat, "hole", 0.3, 0.5, 1)
    caught = GridExample(blank, None, heat, "hole", 0.5, 0.5, 1)
    assert good_rejected.caption() == "good: 0.700 >= 0.500 NG (false reject)" and good_rejected.correct is False
    assert missed.caption() == "hole: 0.300 < 0.500 OK (miss)"
    assert caught.caption() == "hole: 0.500 >= 0.500 NG" and caught.correct is True


def test_the_scale_bar_runs_from_hot_at_the_top_to_cold_at_the_bottom(tmp_path):
    rows = [(np.full((32, 32, 3), 128, np.uint8), None, np.full((8, 8), 0.5))]
    picture = cv2.imread(str(write_sample_grid(tmp_path / "g.png", rows, "t")))
    bar = picture[:, 3 * TILE + 14]  # the middle of the colour column
    top, bottom = bar[TITLE_HEIGHT + 10].astype(int), bar[picture.shape[0] - 10].astype(int)
    assert top[2] > top[0] and bottom[0] > bottom[2]  # red (BGR) at 1.0, blue at 0.0


def test_a_long_caption_is_made_to_fit_its_tile():
    """Defect types are the line's own words ([model].class_defect_types): a long one at the grid's caption size
    runs past a tile; it is drawn smaller instead."""
    import numpy as np

    from trainer.report import TILE, _label

    tile = np.zeros((TILE, TILE, 3), np.uint8)
    _label(tile, "foreign material: 0.412 < 0.550 OK (miss)", (4, TILE - 8), scale=0.36)
    inked = np.flatnonzero(tile.any(axis=(0, 2)))
    assert inked.size and inked.max() < TILE - 4, inked.max()  # ends inside the tile and its 3 px frame
