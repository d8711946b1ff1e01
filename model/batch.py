"""A launched batch on its way to the host: `HostTransfer` (one sub-batch's outputs copied to host memory)
and `PendingBatch` (a batch's sub-batches and per-frame errors, turned into outcomes on demand).

`Engine.launch` queues the device work and returns a `PendingBatch` at once; `outcomes()` may run on
another thread (the agent's result thread) while the device thread launches the next batch. A
`PendingBatch` holds the `Snapshot` its batch was launched on, so its results use that snapshot's
thresholds and prompt version whatever has been published since.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

from model.genclip import Scores
from model.outcomes import FrameError, Prediction
from model.postprocess import Assemble, HostScores
from model.state import EngineStats, Snapshot

Item = tuple[int, np.ndarray, str]  # index in the batch, checked frame, normalised class name


class HostTransfer:
    """The real (unpadded) rows of every output of a sub-batch, on their way to host memory.

    On a GPU: one asynchronous device-to-host copy into pinned memory, with an event to wait on, so
    nothing syncs until the results are wanted (one sync per batch). On a CPU: views, no copy.
    """

    def __init__(self, out: Scores, groups: list[list[int]], n: int) -> None:
        self._types_rows = [[(k, i) for k, i in enumerate(indices) if i < n] for indices in groups]
        parts = [out.scores[:n], out.global_probability[:n], out.maps[:n]]
        for rows, probs in zip(self._types_rows, out.type_probabilities, strict=True):
            parts.append(probs[[k for k, _ in rows]] if len(rows) < probs.shape[0] else probs)
        self._shapes = [tuple(p.shape) for p in parts]
        self._lock = threading.Lock()
        self._pieces: list[np.ndarray] | None = None
        self._staging: torch.Tensor | None = None
        self._event: torch.cuda.Event | None = None
        if parts[0].device.type == "cuda":
            flat = torch.cat([p.float().reshape(-1) for p in parts])
            self._staging = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            self._staging.copy_(flat, non_blocking=True)  # the pinned block comes from torch's cache
            self._event = torch.cuda.Event()
            self._event.record(torch.cuda.current_stream(flat.device))
        else:  # already in host memory
            self._pieces = [p.float().numpy() for p in parts]

    def wait(self) -> list[np.ndarray]:
        """Block until the copy has landed (the device has finished this sub-batch); returns the pieces.

        Then the values move to ordinary memory and the pinned block goes back to torch's cache at once:
        batches waiting for the result thread hold no pinned memory, which stays a few batches' worth.
        """
        with self._lock:
            if self._pieces is not None:
                return self._pieces
            assert self._event is not None and self._staging is not None  # set together for a CUDA copy
            self._event.synchronize()
            values = self._staging.numpy().copy()
            self._staging = None
            pieces, start = [], 0
            for shape in self._shapes:
                size = int(np.prod(shape))
                pieces.append(values[start : start + size].reshape(shape))
                start += size
            self._pieces = pieces
            return pieces

    def result(self) -> HostScores:
        scores, global_p, maps, *type_blocks = self.wait()
        types: dict[int, np.ndarray] = {}
        for rows, block in zip(self._types_rows, type_blocks, strict=True):
            for j, (_, i) in enumerate(rows):
                types[i] = block[j]
        return HostScores(scores, global_p, maps, types)


class PendingBatch:
    """A launched batch: its device work queued, its results built on the first `outcomes()` call."""

    def __init__(self, snap: Snapshot, size: int, started: float, assemble: Assemble, stats: EngineStats) -> None:
        self._snap = snap
        self._started = started
        self._assemble = assemble
        self._stats = stats
        self._results: list[Prediction | FrameError | None] = [None] * size
        self._parts: list[tuple[list[Item], HostTransfer]] = []
        self._lock = threading.Lock()
        self._built = False
        self.errors = 0
        self.seconds: float | None = None  # launch to results on the host, once known

    def fail(self, error: FrameError) -> None:
        self._results[error.index] = error
        self.errors += 1

    def add(self, items: list[Item], transfer: HostTransfer) -> None:
        self._parts.append((items, transfer))

    def wait(self) -> None:
        """Block until the device has finished this batch (not the host part)."""
        for _, transfer in self._parts:
            transfer.wait()
        if self.seconds is None:
            self.seconds = time.perf_counter() - self._started

    def outcomes(self) -> list[Prediction | FrameError]:
        """One result per frame, in order; safe to call from any thread, more than once."""
        with self._lock:
            if not self._built:
                self.wait()
                snap = self._snap
                version = snap.prompts.version
                for items, transfer in self._parts:
                    host = transfer.result()
                    for j, (index, frame, name) in enumerate(items):
                        self._results[index] = self._assemble(snap.classes[name], host, j, frame, index, version)
                self._parts = []  # the device outputs and frames are no longer needed
                self._built = True
                self._stats.last_batch_ms = (time.perf_counter() - self._started) * 1000
        return [r for r in self._results if r is not None]
