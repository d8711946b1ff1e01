"""The `[model]` section: which CLIP, which prompts, how scores are made.

Owned by the engine; the agent's root config embeds it unchanged and the trainer
reads it to build the same model it trains.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_DEFECT_TYPES = (
    "scratch",
    "crack",
    "hole",
    "dent",
    "stain",
    "contamination",
    "missing part",
    "deformation",
)
GENERIC_CLASS_NAMES = ("object", "part", "component", "product", "item")
MAX_CLASS_NAME_CHARS = 64


def normalise_class_name(name: object) -> str:
    """'  metal   nut ' -> 'metal nut'; raises ValueError for what cannot be a class name."""
    if not isinstance(name, str):
        raise ValueError(f"product class must be a string, got {type(name).__name__}")
    cleaned = " ".join(name.split())
    if not cleaned:
        raise ValueError("product class is empty")
    if len(cleaned) > MAX_CLASS_NAME_CHARS:
        raise ValueError(
            f"product class name of {len(cleaned)} characters is too long (at most {MAX_CLASS_NAME_CHARS})"
        )
    return cleaned


class EngineConfig(BaseModel):
    """Everything the engine needs to build GenCLIP and score frames."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    backbone: str = Field(
        "genclip-tiny",
        description="open_clip model name (ViT-L-14-336, ViT-B-16, ...) or genclip-tiny for tests.",
    )
    pretrained: str = Field(
        ...,
        description="open_clip pretrained tag (e.g. 'openai'), a local weights file, or 'random' / 'random:SEED' "
        "for seeded random weights (tests and demos only: their scores mean nothing).",
    )
    model_config_file: Path | None = Field(
        None,
        alias="model_config",
        description="An open_clip model-config JSON for an architecture open_clip does not ship; "
        "its file name (without .json) must equal `backbone`.",
    )
    allow_download: bool = Field(
        False, description="Let open_clip download weights from the hub when they are not on this machine."
    )
    cache_dir: Path | None = Field(None, description="Hugging Face cache folder to look in for tagged weights.")
    checkpoint: Path | None = Field(None, description="Learned prompts (.safetensors) from `genclip train`.")
    image_size: int = Field(224, ge=32, le=1536, description="Model input size in pixels (square).")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="Autocast precision of the towers (the head stays fp32): bf16 on CUDA and on CPUs with native "
        "bf16 (AMX, AVX512-BF16), fp16 on CUDA; fp32 with a warning where the device lacks it.",
    )
    compile: bool = Field(False, description="torch.compile the image path (CUDA graphs on CUDA).")
    layers: list[int] | None = Field(
        None, description="Transformer blocks (1-based) whose patch tokens are used; default depth/4 .. depth."
    )
    vv_attention: bool = Field(True, description="Value-value attention stream for patch tokens (AnomalyCLIP).")
    vv_from_layer: int | None = Field(None, ge=1, description="First V-V block (1-based); default first used layer.")
    query_tokens: int = Field(4, ge=1, le=32, description="Length m of the shared query prompt Q.")
    state_tokens: int = Field(4, ge=1, le=32, description="Length n of the normal (N) and abnormal (A) tokens.")
    defect_tokens: int = Field(2, ge=1, le=16, description="Length of the shared defect-type tokens W.")
    temperature: float = Field(0.07, gt=0, le=1)
    branch_weight: float = Field(0.5, ge=0, le=1, description="w: vision-enhanced vs query-only map.")
    score_alpha: float = Field(0.5, ge=0, le=1, description="Image score = alpha*global + (1-alpha)*max(map).")
    blur_sigma: float = Field(4.0, ge=0, description="Gaussian sigma in pixels at 518 px, scaled with size.")
    default_threshold: float = Field(0.5, ge=0, le=1, description="Used when neither config nor checkpoint sets one.")
    min_defect_area: int = Field(16, ge=1, description="Smallest defect region, in model-input pixels.")
    cnf: bool = Field(True, description="Class Name Filtering: replace names CLIP does not know by 'object'.")
    cnf_margin: float = Field(0.0, description="How much the class name must beat generic names by.")
    cnf_generic_names: list[str] = Field(default_factory=lambda: list(GENERIC_CLASS_NAMES))
    defect_types: list[str] = Field(default_factory=lambda: list(DEFAULT_DEFECT_TYPES))
    class_defect_types: dict[str, list[str]] = Field(
        default_factory=dict, description="Per product class defect vocabulary; overrides defect_types."
    )
    class_words: dict[str, str] = Field(
        default_factory=dict, description="Per product class: the word used in prompts, skipping CNF."
    )
    profile_dir: Path | None = Field(None, description="Folder of class profiles (<class>.json) from calibration.")
    min_reference_images: int = Field(8, ge=1, description="Fewest good-part images that may decide a class word.")
    calibration_quantile: float = Field(
        0.995, ge=0.5, lt=1.0, description="Share of good parts a calibrated threshold passes."
    )
    calibration_margin: float = Field(
        0.1,
        ge=0.0,
        le=10.0,
        description="Too few good images to resolve the quantile: threshold = max + margin x (max - median).",
    )
    memory_weight: float = Field(
        0.0,
        ge=0,
        le=1,
        description="b: weight of the few-shot branch (a memory of good parts' patches) in the map; 0 = off, "
        "scores exactly zero-shot. A class needs good parts ([references], `genclip calibrate`) for a memory.",
    )
    class_memory_weights: dict[str, float] = Field(
        default_factory=dict, description="Per product class: b, overriding memory_weight."
    )
    memory_fusion: Literal["linear", "harmonic"] = Field(
        "harmonic", description="How the normalised branches mix: (1-b)*zero_shot + b*few_shot, or a harmonic mean."
    )
    memory_features: Literal["tokens", "adapted"] = Field(
        "tokens",
        description="Patch features the memory keeps: the map layers' tokens before the adapters (independent of "
        "the prompts) or after them (rebuilt for every prompt version).",
    )
    memory_coreset: int = Field(
        0, ge=0, le=10_000_000, description="Patches a memory keeps (PatchCore greedy coreset); 0 = all."
    )
    memory_max_images: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Most images a memory holds; parts confirmed good beyond it replace the "
        "oldest confirmed ones (references stay).",
    )
    max_frame_pixels: int = Field(
        50_000_000, ge=64, description="Frames with more pixels are refused (a guard against absurd inputs)."
    )

    @field_validator("pretrained")
    @classmethod
    def _pretrained(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError(
                "must name the CLIP weights: an open_clip tag ('openai'), a weights file, "
                "or 'random' for seeded random weights (tests and demos only)"
            )
        if value.startswith("random") and not re.fullmatch(r"random(:\d+)?", value):
            raise ValueError("random weights are written 'random' or 'random:SEED'")
        return value

    @field_validator("class_words")
    @classmethod
    def _class_word_values(cls, value: dict[str, str]) -> dict[str, str]:
        cleaned = {" ".join(k.split()): " ".join(v.split()) for k, v in value.items()}
        if any(not v for v in cleaned.values()):
            raise ValueError("class words must not be empty")
        return cleaned

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return value

    @field_validator("defect_types", "cnf_generic_names")
    @classmethod
    def _words(cls, value: list[str]) -> list[str]:
        cleaned = [w.strip() for w in value]
        if not cleaned or any(not w for w in cleaned):
            raise ValueError("must be a non-empty list of non-empty names")
        if len(set(cleaned)) != len(cleaned):
            raise ValueError("names must be unique")
        return cleaned

    @field_validator("class_defect_types")
    @classmethod
    def _class_words(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, words in value.items():
            if not words or any(not w.strip() for w in words):
                raise ValueError(f"{name}: must be a non-empty list of non-empty names")
        return {k: [w.strip() for w in v] for k, v in value.items()}

    @field_validator("class_memory_weights")
    @classmethod
    def _memory_weights(cls, value: dict[str, float]) -> dict[str, float]:
        for name, weight in value.items():
            if not 0.0 <= weight <= 1.0:
                raise ValueError(f"{name}: {weight} is outside 0..1")
        return {normalise_class_name(k): v for k, v in value.items()}

    @field_validator("layers")
    @classmethod
    def _layers(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value or any(i < 1 for i in value) or sorted(set(value)) != value:
            raise ValueError("must be strictly increasing block numbers, 1-based")
        return value

    @model_validator(mode="after")
    def _files_exist(self) -> EngineConfig:
        looks_like_path = "/" in self.pretrained or self.pretrained.endswith((".bin", ".pt", ".safetensors"))
        # os.path, not pathlib: a name too long for the file system is 'not found', not an OSError.
        if looks_like_path and not os.path.isfile(os.path.expanduser(self.pretrained)):
            raise ValueError(f"pretrained: weights file not found: {self.pretrained}")
        if self.checkpoint is not None and not os.path.exists(os.path.expanduser(self.checkpoint)):
            raise ValueError(f"checkpoint: prompt checkpoint (file or folder) not found: {self.checkpoint}")
        if self.model_config_file is not None:
            path = Path(os.path.expanduser(self.model_config_file))
            if not os.path.isfile(path):
                raise ValueError(f"model_config: open_clip model config not found: {path}")
            if path.stem != self.backbone:
                raise ValueError(
                    f"model_config: file {path.name} defines '{path.stem}' but backbone is '{self.backbone}'"
                )
        return self

    def random_seed(self) -> int | None:
        """The seed of random weights, or None for real weights."""
        if not self.pretrained.startswith("random"):
            return None
        return int(self.pretrained.partition(":")[2] or 0)

    def memory_weight_for(self, product_class: str) -> float:
        """b for one product class: its own weight, or memory_weight."""
        return self.class_memory_weights.get(normalise_class_name(product_class), self.memory_weight)

    def defect_vocabulary(self, product_class: str) -> list[str]:
        """Defect names for one product class: its own list, or the default one."""
        return list(self.class_defect_types.get(product_class, self.defect_types))
