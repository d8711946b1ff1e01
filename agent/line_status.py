"""What the line reports about its product classes, from the engine's typed `ClassStatus`.

`service.info()` (the retained info) and `service.health_reasons()` (/healthz) both read a
class's word, threshold and their sources through these two functions.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.classes import ClassStatus


def info_entry(status: ClassStatus) -> dict[str, object]:
    """The class's entry under "classes" in the retained info."""
    return {
        "class_word": status.class_word,
        "class_word_source": status.class_word_source,
        "threshold": status.threshold,
        "threshold_source": status.threshold_source,
        "memory": None if status.memory is None else asdict(status.memory),  # size, last update (patch memory)
        "memory_error": status.memory_error,
    }


def stale_calibration_reason(status: ClassStatus) -> str | None:
    """Why the class is scored against default_threshold, or None when it is not."""
    if status.threshold_source != "stale-calibration":  # e.g. hand-calibrated, then retrained
        return None
    return (
        f"class {status.product_class}: {status.stale_reason}; scoring against default_threshold "
        f"({status.threshold}) until it is recalibrated (set [references] so every new prompt "
        "version is recalibrated, run `genclip calibrate` then `reload`, or set [thresholds])"
    )
