"""Synthetic parts: a procedural surface with injected defects, at `fps`, for demos and soak tests.

Rendering a texture takes 10-100 ms, so a few good surfaces are rendered once at start,
larger than the frame; each frame is a random crop and flip of one of them, and defects come
from the shared generator (`synthetic.defects.make_part`, 1-3 ms). Frame n of a seed is the same
part every run. The truth about each emitted part (defective, kind) goes to a JSONL file,
never into the results, so detection rates can be measured against it.

Triggered over MQTT, it renders one part per trigger, bound to the trigger's part id, as soon as the
trigger comes. With `withhold_every = n` it delivers no frame for every n-th trigger, the way a camera
with a trigger counter reports a trigger it skipped: that part is answered as a missed trigger at once.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import IO

import numpy as np

from agent.sources.base import TRIGGER_POLL_S, Emit, FrameSource
from agent.sources.config import CameraConfig
from agent.triggers import Trigger, TriggerQueue
from synthetic.defects import make_part
from synthetic.textures import instance_seed, render_texture

BACKGROUNDS = 4
MARGIN = 1.25  # backgrounds are this much larger than the frame, for the random crops


class SyntheticSource(FrameSource):
    """Emits generated parts at `fps`; part ids are `<camera>-<run id>-<seq>`."""

    def __init__(self, camera: CameraConfig, emit: Emit, *, line_id: str = "", run_id: str | None = None) -> None:
        super().__init__(camera, emit, line_id=line_id, run_id=run_id)
        self.settings = self.camera.synthetic
        self._backgrounds: list[np.ndarray] = []
        self._truth: IO[str] | None = None

    def _render_backgrounds(self) -> None:
        s = self.settings
        side = int(max(s.width, s.height) * MARGIN)
        self._backgrounds = [render_texture(s.texture, instance_seed(s.seed, i), side) for i in range(BACKGROUNDS)]

    def part(self, seq: int) -> tuple[np.ndarray, str | None]:
        """The image of part `seq` and its defect kind (None: good); depends only on the seed and `seq`."""
        s = self.settings
        rng = np.random.default_rng([s.seed, 2, seq])
        background = self._backgrounds[int(rng.integers(len(self._backgrounds)))]
        top = int(rng.integers(background.shape[0] - s.height + 1))
        left = int(rng.integers(background.shape[1] - s.width + 1))
        good = background[top : top + s.height, left : left + s.width]
        flip = int(rng.integers(4))
        if flip & 1:
            good = good[::-1]
        if flip & 2:
            good = good[:, ::-1]
        part = make_part(rng, np.ascontiguousarray(good), s.defect_rate, s.kinds)
        return part.image, part.kind

    def _run(self) -> None:
        self._prepare()
        if self.triggers is not None:
            self._run_triggered(self.triggers)
            return
        period = 1.0 / self.camera.fps
        due = time.monotonic()
        while not self._stopping.is_set():
            self._make_part(self._next_seq())
            due = max(due + period, time.monotonic() - period)  # behind by more than a frame: do not burst
            if self._wait(due - time.monotonic()):
                return

    def _run_triggered(self, triggers: TriggerQueue) -> None:
        """One part per trigger, in trigger order; every n-th withheld when `withhold_every` says so."""
        every = self.settings.withhold_every
        while not self._stopping.is_set():
            self._answer_overdue()
            trigger = triggers.next(TRIGGER_POLL_S)
            if trigger is not None:
                self._make_part(trigger.count, trigger, withheld=bool(every) and trigger.count % every == 0)

    def _prepare(self) -> None:
        if not self._backgrounds:
            self._render_backgrounds()
        if self.settings.ground_truth is not None and self._truth is None:
            self.settings.ground_truth.parent.mkdir(parents=True, exist_ok=True)
            self._truth = self.settings.ground_truth.open("a", encoding="utf-8")
        self._set_state("running")
        self.backoff.reset()

    def _make_part(self, seq: int, trigger: Trigger | None = None, *, withheld: bool = False) -> None:
        """Render part `seq`, emit it (bound to `trigger` when given; answered as missed when `withheld`)
        and note the truth about it (a withheld part too: it is on the belt, only its picture is missing)."""
        image, kind = self.part(seq)
        self._heartbeat()
        if trigger is not None and withheld:
            assert self.triggers is not None
            self.triggers.missed_one()
            self._answer_missed(trigger, "missed trigger: the camera delivered no frame (withheld on purpose)")
            self._note_truth(self.camera.id, seq, trigger.part_id, kind, datetime.now(UTC), withheld=True)
            return
        frame = self._emit_frame(image, trigger.part_id if trigger else None, seq, trigger=trigger)
        if frame is not None:
            self._note_truth(frame.camera, frame.seq, frame.part_id, kind, frame.captured_at)

    def _note_truth(
        self, camera: str, seq: int, part_id: str, kind: str | None, at: datetime, *, withheld: bool = False
    ) -> None:
        if self._truth is None:
            return
        record = {
            "camera": camera,
            "seq": seq,
            "part_id": part_id,
            "defective": kind is not None,
            "type": kind,
            "withheld": withheld,
            "captured_at": at.isoformat(),
        }
        self._truth.write(json.dumps(record) + "\n")
        self._truth.flush()

    def _cleanup(self) -> None:
        if self._truth is not None:
            self._truth.close()
            self._truth = None
