"""Synthetic parts: a procedural surface with injected defects, at `fps`, for demos and soak tests.

Rendering a texture takes 10-100 ms, so a few good surfaces are rendered once at start,
larger than the frame; each frame is a random crop and flip of one of them, and defects come
from the shared generator (`synthetic.defects.make_part`, 1-3 ms). Frame n of a seed is the same
part every run. The truth about each emitted part (defective, kind) goes to a JSONL file,
never into the results, so detection rates can be measured against it.
"""

from __future__ import annotations

import json
import time
from typing import IO

import numpy as np

from agent.sources.base import Emit, FrameSource
from agent.sources.config import CameraConfig
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
        if not self._backgrounds:
            self._render_backgrounds()
        if self.settings.ground_truth is not None and self._truth is None:
            self.settings.ground_truth.parent.mkdir(parents=True, exist_ok=True)
            self._truth = self.settings.ground_truth.open("a", encoding="utf-8")
        self._set_state("running")
        self.backoff.reset()
        period = 1.0 / self.camera.fps
        due = time.monotonic()
        while not self._stopping.is_set():
            seq = self._next_seq()
            image, kind = self.part(seq)
            self._heartbeat()
            frame = self._emit_frame(image, seq=seq)
            if frame is not None and self._truth is not None:
                record = {
                    "camera": frame.camera,
                    "seq": frame.seq,
                    "part_id": frame.part_id,
                    "defective": kind is not None,
                    "type": kind,
                    "captured_at": frame.captured_at.isoformat(),
                }
                self._truth.write(json.dumps(record) + "\n")
                self._truth.flush()
            due = max(due + period, time.monotonic() - period)  # behind by more than a frame: do not burst
            if self._wait(due - time.monotonic()):
                return

    def _cleanup(self) -> None:
        if self._truth is not None:
            self._truth.close()
            self._truth = None
