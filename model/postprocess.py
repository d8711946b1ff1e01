"""Where a frame becomes a result: one row of a batch's host scores -> a `Prediction` or a `FrameError`.

Plain functions on host values (numpy), no engine and no device: the verdict (score against the class's
threshold), the non-finite check, the map level regions are cut at, and the defect regions of an NG
frame. `model.batch.PendingBatch` calls `assemble` for every scored frame, on whichever thread asks
for the batch's outcomes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from model.outcomes import FrameError, Prediction
from model.regions import find_defects, region_threshold
from model.state import ClassEntry


@dataclass(frozen=True)
class HostScores:
    """A sub-batch's scores in host memory: the numpy twin of `model.genclip.Scores`, real rows only."""

    scores: np.ndarray  # [n]
    global_probability: np.ndarray  # [n]
    maps: np.ndarray  # [n, S, S], fp32
    type_probabilities: Mapping[int, np.ndarray]  # row -> [g, g, K], for rows of classes with defect types


@dataclass(frozen=True)
class RegionSettings:
    """The [model] numbers post-processing uses: the map's share of the image score, and the smallest region."""

    score_alpha: float
    min_defect_area: int


class Assemble(Protocol):
    """The signature of `assemble` (the engine holds it as `Engine.assemble`, so a bench can time it)."""

    def __call__(
        self, entry: ClassEntry, host: HostScores, row: int, frame: np.ndarray, index: int, prompt_version: str
    ) -> Prediction | FrameError: ...


def assemble(
    settings: RegionSettings,
    entry: ClassEntry,
    host: HostScores,
    row: int,
    frame: np.ndarray,
    index: int,
    prompt_version: str,
) -> Prediction | FrameError:
    """Row `row` of `host`, scored as frame `index` of the batch with `entry`'s threshold and defect names."""
    score = float(host.scores[row])
    global_p = float(host.global_probability[row])
    anomaly_map = host.maps[row].copy()  # owned: holds no reference to the batch's buffer
    map_max = float(anomaly_map.max())
    if not (np.isfinite(score) and np.isfinite(global_p) and np.isfinite(map_max)):
        # NaN compares false with any threshold: it would pass a part as OK. Say so instead.
        name = entry.profile.product_class
        return FrameError(index, name, f"the engine produced a non-finite score ({score}, map max {map_max})")
    is_ng = score >= entry.threshold
    map_t = region_threshold(entry.threshold, global_p, settings.score_alpha, map_max, is_ng)
    defects = (  # an OK frame's map stays below map_t everywhere: no regions to look for
        find_defects(
            anomaly_map,
            map_t,
            frame.shape[:2],
            host.type_probabilities.get(row),
            list(entry.text.defect_names),
            settings.min_defect_area,
            keep_peak=True,
        )
        if is_ng
        else []
    )
    return Prediction(
        product_class=entry.profile.product_class,
        score=score,
        threshold=entry.threshold,
        threshold_source=entry.threshold_source,
        is_anomalous=is_ng,
        anomaly_map=anomaly_map,
        frame_size=(int(frame.shape[0]), int(frame.shape[1])),
        defects=defects,
        prompt_version=prompt_version,
        global_score=global_p,
        map_max=map_max,
        map_threshold=map_t,
        class_word=entry.profile.class_word,
        class_word_source=entry.profile.class_word_source,
    )
