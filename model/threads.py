"""CPU thread settings for torch, set once per process before the first tensor work.

torch's default intra-op pool is one thread per core. On a line PC that also
captures, encodes and publishes frames, fewer can be faster, and benchmarks need
a fixed count to be comparable, so both counts are configuration (`[engine]`).
"""

from __future__ import annotations

import contextlib

import torch


def set_torch_threads(threads: int = 0, interop_threads: int = 0) -> dict[str, int]:
    """Apply the counts (0 = leave torch's default); returns the counts now in effect.

    The inter-op count can only be set before torch runs parallel work; a later
    attempt is ignored (torch raises), so call this first thing in a process.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    if interop_threads > 0 and torch.get_num_interop_threads() != interop_threads:
        with contextlib.suppress(RuntimeError):  # parallel work already ran here: the pool is fixed now
            torch.set_num_interop_threads(interop_threads)
    return {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}
