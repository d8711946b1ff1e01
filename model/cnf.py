"""Class Name Filtering: keep a product's name in the prompts only if CLIP knows it.

CLIP knows "bottle" but not "pcb4". With the frozen CLIP, reference images of the
class are scored against "a photo of a <class>." and against generic names; if
the class prompt does not beat the best generic one on average by `margin`, the
name is replaced by "object". (Our rule: the paper's exact rule was not found.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

FALLBACK_NAME = "object"
TEMPLATE = "a photo of a {}."


@dataclass(frozen=True)
class CnfDecision:
    """Why a class name was kept or replaced; logged and reported by `ClassRegistry.status`."""

    class_name: str
    used_name: str
    kept: bool
    class_similarity: float
    generic_similarities: dict[str, float]
    margin: float
    reference_images: int
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def decide(
    class_name: str,
    image_embeddings: torch.Tensor,
    class_text: torch.Tensor,
    generic_text: torch.Tensor,
    generic_names: list[str],
    margin: float = 0.0,
) -> CnfDecision:
    """Compare mean cosine similarity of normalised image embeddings [N, D] to the class and generic prompts."""
    images = image_embeddings.float()
    class_sim = float((images @ class_text.float().view(-1)).mean())
    generic = (images @ generic_text.float().t()).mean(dim=0)
    generic_sims = {name: float(s) for name, s in zip(generic_names, generic, strict=True)}
    best_name = max(generic_sims, key=generic_sims.__getitem__)
    best = generic_sims[best_name]
    kept = class_sim - best > margin
    reason = (
        f"'{class_name}' scores {class_sim:.4f}, best generic '{best_name}' {best:.4f}: "
        + ("kept" if kept else f"replaced by '{FALLBACK_NAME}'")
        + f" (margin {margin})"
    )
    return CnfDecision(
        class_name=class_name,
        used_name=class_name if kept else FALLBACK_NAME,
        kept=kept,
        class_similarity=class_sim,
        generic_similarities=generic_sims,
        margin=margin,
        reference_images=int(images.shape[0]),
        reason=reason,
    )


def not_filtered(class_name: str, reason: str) -> CnfDecision:
    """The decision when CNF is off (or the name is already generic)."""
    return CnfDecision(class_name, class_name, True, float("nan"), {}, 0.0, 0, reason)
