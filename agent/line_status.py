"""What the line reports about its product classes, read from the engine in one place.

`service.info()` (the retained info) and `service.health_reasons()` (/healthz) both take a
class's word, threshold and their sources from `class_summary`, the one call into the
engine's class status.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.engine import Engine


@dataclass(frozen=True, slots=True)
class ClassSummary:
    """A registered class as the line reports it."""

    class_word: str | None  # the word the prompts use for it
    class_word_source: str | None
    threshold: float
    threshold_source: str  # "config", "command", "calibration", "stale-calibration" or "default"
    stale_reason: str | None  # why a calibration no longer applies

    def info_entry(self) -> dict[str, object]:
        """The class's entry under "classes" in the retained info."""
        return {
            "class_word": self.class_word,
            "class_word_source": self.class_word_source,
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
        }

    def health_reason(self, name: str) -> str | None:
        """Why the class is scored against default_threshold, or None when it is not."""
        if self.threshold_source != "stale-calibration":  # e.g. hand-calibrated, then retrained
            return None
        return (
            f"class {name}: {self.stale_reason}; scoring against default_threshold "
            f"({self.threshold}) until it is recalibrated (set [references] so every new prompt "
            "version is recalibrated, run `genclip calibrate`, or set [thresholds])"
        )


SUMMARY_FIELDS = tuple(f.name for f in fields(ClassSummary))


def class_summary(engine: Engine, name: str) -> ClassSummary:
    """A registered class's summary: the agent's one read of the engine's class status."""
    status = engine.class_info(name)  # with a typed status: dataclasses.asdict(engine.class_status(name))
    return ClassSummary(**{key: status[key] for key in SUMMARY_FIELDS})
