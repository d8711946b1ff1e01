"""What a batch runs on: one immutable `Snapshot` of prompts, classes and thresholds, and where it is published.

The contract (see `model/engine.py`): a batch takes `SnapshotCell.current` once at its start and uses
nothing else; a writer (a prompt swap, a class set up or recalibrated, new threshold overrides) holds
`SnapshotCell.write_lock`, builds a whole new `Snapshot` from the current one and publishes it with one
reference assignment. Nothing here is mutated once published, so a batch in flight finishes on the
state it started with.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from model.genclip import GenClip
from model.memory import ClassMemory
from model.profile import ClassProfile
from model.prompts import Suffix


class Threshold(NamedTuple):
    """A score threshold and where it comes from: "config", "option" (a verb's --threshold), "command",
    "calibration", "stale-calibration" or "default" (a tuple, so `(value, source)` compares equal to it)."""

    value: float
    source: str


@dataclass(frozen=True)
class ClassText:
    """Per class and prompt version: the frozen suffix embedding and the defect-type text features."""

    suffix: Suffix
    defect_names: tuple[str, ...]
    defect_text: torch.Tensor  # [K, D], fp32


@dataclass(frozen=True)
class PromptState:
    """One prompt version: its model view (shared frozen towers, own learned tensors) and query text."""

    model: GenClip
    version: str
    digest: str  # sha256 of the checkpoint bytes, or "untrained"
    meta: Mapping[str, Any]  # the checkpoint's JSON header
    query_text: torch.Tensor  # F_Q [2, D], fp32
    path: str | None = None


@dataclass(frozen=True)
class ClassEntry:
    """A registered class in one snapshot: its profile, text and effective threshold."""

    profile: ClassProfile
    text: ClassText
    threshold: float
    threshold_source: str
    stale_reason: str | None = None
    memory: ClassMemory | None = None  # its patch memory and fusion weight; None: scored zero-shot
    memory_error: str | None = None  # why a class with memory_weight > 0 has no memory


@dataclass(frozen=True)
class Snapshot:
    """Everything one batch uses; never mutated once published."""

    prompts: PromptState
    classes: Mapping[str, ClassEntry]
    overrides: Mapping[str, Threshold]  # class -> threshold from "config" or "command"


class SnapshotCell:
    """The one published Snapshot, and the lock its writers hold while they build the next one."""

    def __init__(self, first: Snapshot) -> None:
        self.current = first
        self.write_lock = threading.RLock()

    def publish(self, snapshot: Snapshot) -> None:
        """Call with `write_lock` held."""
        self.current = snapshot  # one reference assignment: a batch in flight keeps its own


@dataclass
class EngineStats:
    """Counters for tests, logs and metrics."""

    batches: int = 0
    frames: int = 0
    frame_errors: int = 0
    class_text_builds: int = 0
    prompt_swaps: int = 0
    oom_splits: int = 0
    last_batch_ms: float = 0.0
