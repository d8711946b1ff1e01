"""What the result stage gets for one frame: the engine's outcome, or the agent's own batch failure.

The engine gives a `Prediction` (scored) or a `FrameError` (this frame could not be scored, the
rest of its batch was) per frame. A frame the engine gave nothing for gets a `BatchFailure`:
its whole batch failed (launch, device or building its results), or its picture could not be
read and it never reached the engine. All three carry `ok`; the two failures carry `reason`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from model.outcomes import FrameError, Prediction


@dataclass(frozen=True, slots=True)
class BatchFailure:
    """A frame without an outcome from the engine, and why (published as an ERROR result)."""

    product_class: str
    reason: str
    ok: Literal[False] = False


Outcome = Prediction | FrameError | BatchFailure

__all__ = ["BatchFailure", "FrameError", "Outcome", "Prediction"]
