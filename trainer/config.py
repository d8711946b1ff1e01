"""The `[trainer]` section: how prompts are learned (defaults follow AnomalyCLIP's train.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATASET_KINDS = ("mvtec", "visa", "synthetic")
"""The KIND of a `KIND:PATH[@split]` data set spec (`--data`, `[trainer].data`)."""
SPLITS = ("train", "test", "all")


class TrainerConfig(BaseModel):
    """Training hyper-parameters; every field can also be given as a `genclip train` flag."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    epochs: int = Field(15, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=1024)
    lr: float = Field(1e-3, gt=0, le=1)
    betas: tuple[float, float] = (0.5, 0.999)
    seed: int = 111
    image_size: int | None = Field(None, ge=32, le=1536, description="Overrides [model].image_size for training.")
    holdout_classes: int = Field(
        1,
        ge=0,
        le=100,
        description="Product classes held out of training and used only to validate (leave-classes-out); "
        "0: no validation, the last epoch is kept.",
    )
    holdout_class_names: list[str] = Field(
        default_factory=list, description="Hold out these classes instead of ones picked by the seed."
    )
    min_validation_images: int = Field(
        10,
        ge=1,
        le=100_000,
        description="Good and defective images (each) the held-out classes need for validation to choose `best`.",
    )
    bootstrap_rounds: int = Field(200, ge=0, le=10_000, description="Resamples for validation's 95 % interval.")
    calibrate_min_images: int = Field(
        20, ge=1, le=1_000_000, description="`genclip calibrate` refuses fewer good images than this."
    )
    workers: int = Field(2, ge=0, le=64, description="Data loader processes.")
    amp: bool = Field(True, description="bf16 autocast on CUDA (ignored on CPU).")
    image_loss_weight: float = Field(1.0, ge=0)
    defect_loss_weight: float = Field(1.0, ge=0)
    focal_gamma: float = Field(2.0, ge=0)
    data: list[str] = Field(
        default_factory=list,
        description="Training data as KIND:PATH[@split] specs (the syntax of --data); used when no --data is given.",
    )
    out_dir: Path = Field(
        Path("runs"), description="Where `genclip train` writes its run folders (<out_dir>/<UTC time> without --out)."
    )
    publish_dir: Path | None = Field(None, description="Where the best checkpoint is published for the agent.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, value: Any) -> Any:
        if isinstance(value, dict) and "val_fraction" in value:
            raise ValueError(
                "val_fraction was replaced by holdout_classes: validation now holds whole product classes out "
                "(leave-classes-out), not a share of images"
            )
        return value

    @field_validator("data")
    @classmethod
    def _data_specs(cls, value: list[str]) -> list[str]:
        # Only the form is checked here: the agent loads the same file, and the paths may live
        # elsewhere; `genclip train` opens them and names a missing one.
        for spec in value:
            kind, sep, rest = spec.partition(":")
            if not sep or not rest.strip() or kind.strip().lower() not in DATASET_KINDS:
                raise ValueError(f"{spec!r}: expected KIND:PATH[@split] with KIND one of {', '.join(DATASET_KINDS)}")
        return value
