"""What synthetic parts can be: the defect kinds drawn and the texture families rendered.

Plain constants (no OpenCV), so configs can name them: `[cameras.synthetic]` and `genclip synth`.
"""

from __future__ import annotations

# The procedural surfaces `synthetic/textures.py` renders.
TEXTURE_FAMILIES = ("woven", "grain", "metal", "dots", "tiles", "leather")
DEFECT_KINDS = ("scratch", "crack", "hole", "stain", "missing part", "dent")
"""What `genclip synth` and synthetic cameras can draw."""


def normalise_kind(kind: str) -> str:
    """`missing_part`, `Missing Part` -> `missing part`; raises ValueError for an unknown kind."""
    name = " ".join(kind.replace("_", " ").lower().split())
    if name not in DEFECT_KINDS:
        raise ValueError(f"unknown defect kind {kind!r}; expected one of {', '.join(DEFECT_KINDS)}")
    return name
