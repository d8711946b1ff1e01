"""The baseline every speed figure is compared with: GenCLIP scored the way research code does it.

One image at a time, the full 77-token context for every prompt of every image
(the query prompts, the class's normal/abnormal prompts per layer, the defect-type
prompts), nothing cached between images, fp32. Same weights, same prompts and same
head as the engine, so its scores must equal the engine's: the bench checks that.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from model.engine import Engine, normalise_class_name
from model.genclip import QUERY_CLASS_WORD, DefectGroup, GenClip, Suffix


class NaiveLoop:
    """Scores frames one by one with nothing reused; `predict` returns (score, map at model size) per frame."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def _full(self, model: GenClip, suffixes: list[Suffix], head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Suffixes padded so that head + suffix fills CLIP's whole context (77 tokens)."""
        padded, lengths = model.pad_suffixes(suffixes)
        room = model.text.context_length - head
        return F.pad(padded, (0, 0, 0, room - padded.shape[1])), lengths

    def predict_one(self, frame: np.ndarray, product_class: str) -> tuple[float, np.ndarray]:
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
        return float(out.scores[0]), out.maps[0].float().cpu().numpy()

    def predict(self, frames: list[np.ndarray], classes: list[str]) -> list[tuple[float, np.ndarray]]:
        return [self.predict_one(f, c) for f, c in zip(frames, classes, strict=True)]
