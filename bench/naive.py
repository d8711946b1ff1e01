"""The baseline every speed figure is compared with: GenCLIP scored the way research code does it.

One image at a time, the full 77-token context for every prompt of every image
(the query prompts, the class's normal/abnormal prompts per layer, the defect-type
prompts), nothing cached between images, fp32, then the same defect regions. Same
weights, prompts, head and regions as the engine, so its output must equal the
engine's: the bench checks scores, maps and regions.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model.engine import Engine, normalise_class_name
from model.genclip import QUERY_CLASS_WORD, DefectGroup, GenClip, Suffix
from model.regions import Defect, find_defects, region_threshold


class NaiveLoop:
    """Scores frames one by one with nothing reused; `predict` returns (score, map at model size, regions)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _full(self, model: GenClip, suffixes: list[Suffix], head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Suffixes padded so that head + suffix fills CLIP's whole context (77 tokens)."""
        padded, lengths = model.pad_suffixes(suffixes)
        room = model.text.context_length - head
        return F.pad(padded, (0, 0, 0, room - padded.shape[1])), lengths

    def predict_one(self, frame: np.ndarray, product_class: str) -> tuple[float, np.ndarray, list[Defect]]:
        snapshot = self.engine.snapshot
        entry = snapshot.classes[normalise_class_name(product_class)]
        model = snapshot.prompts.model
        shape = model.shape
        state_head = 1 + shape.query_tokens + shape.state_tokens
        defect_head = 1 + shape.defect_tokens + shape.state_tokens
        with torch.inference_mode():
            images = self.engine.preprocess([frame]).float()
            query_suffix, query_length = self._full(model, [model.suffix(QUERY_CLASS_WORD)], state_head)
            query = model.state_text_padded(query_suffix, query_length, None, truncate=False)[0, 0]
            class_suffix, class_length = self._full(model, [model.suffix(entry.profile.class_word)], state_head)
            words = [model.suffix(f"{d} {entry.profile.class_word}") for d in entry.text.defect_names]
            groups = []
            if words:
                defect_suffix, defect_lengths = self._full(model, words, defect_head)
                prompts, eot = model.prompts.defect_prompts(model.sot, defect_suffix, defect_lengths)
                defect_text = model.text(prompts, eot, truncate=False)
                groups = [DefectGroup(torch.zeros(1, dtype=torch.long, device=images.device), defect_text)]
            out = model.score(
                images, query, class_suffix, class_length, self.engine.settings, groups, truncate_text=False
            )
        score, global_p = float(out.scores[0]), float(out.global_probability[0])
        anomaly_map = out.maps[0].float().cpu().numpy()
        types = out.type_probabilities[0][0].float().cpu().numpy() if groups else None
        config = self.engine.config
        is_ng = score >= entry.threshold
        level = region_threshold(entry.threshold, global_p, config.score_alpha, float(anomaly_map.max()), is_ng)
        names = list(entry.text.defect_names)
        defects = find_defects(
            anomaly_map, level, frame.shape[:2], types, names, config.min_defect_area, keep_peak=is_ng
        )
        return score, anomaly_map, defects

    def predict(self, frames: list[np.ndarray], classes: list[str]) -> list[tuple[float, np.ndarray, list[Defect]]]:
        return [self.predict_one(f, c) for f, c in zip(frames, classes, strict=True)]
