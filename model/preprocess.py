"""Frames as cameras give them -> one normalised batch tensor on the engine's device.

Frames are uint8 (or uint16 from machine-vision cameras) BGR HxWx3 or gray HxW,
of any size. The host side only checks and stacks; resizing, colour order and
normalisation run batched on the device. Frames are squashed to the square
input (no crop), so the anomaly map covers the whole frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


class InvalidFrameError(ValueError):
    """A frame the engine cannot use; `index` is its position in the batch."""

    def __init__(self, index: int, reason: str) -> None:
        self.index = index
        self.reason = reason
        super().__init__(f"frame {index}: {reason}")


def check_frame(frame: object, index: int = 0) -> np.ndarray:
    """Return the frame as a usable array or raise InvalidFrameError saying what is wrong."""
    if not isinstance(frame, np.ndarray):
        raise InvalidFrameError(index, f"expected a numpy array, got {type(frame).__name__}")
    if frame.dtype not in (np.uint8, np.uint16):
        raise InvalidFrameError(index, f"expected uint8 or uint16 pixels, got {frame.dtype}")
    if frame.ndim == 3 and frame.shape[2] == 1:
        frame = frame[:, :, 0]
    if frame.ndim == 3 and frame.shape[2] == 4:
        frame = frame[:, :, :3]
    if not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)):
        raise InvalidFrameError(index, f"expected HxW gray or HxWx3 BGR, got shape {frame.shape}")
    if frame.shape[0] < 8 or frame.shape[1] < 8:
        raise InvalidFrameError(index, f"frame of {frame.shape[1]}x{frame.shape[0]} px is too small")
    return frame


class Preprocessor:
    """Resizes and normalises batches on one device; pinned host memory and async copies on CUDA."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], device: torch.device) -> None:
        self.image_size = image_size
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.pin = device.type == "cuda"

    def _to_device(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        if self.pin:
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 BGR [B, 3, S, S] already at input size (the trainer's batches) -> normalised RGB."""
        x = images.to(self.device, non_blocking=True).float().flip(1) / 255.0
        return (x - self.mean) / self.std

    def __call__(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """Checked frames -> [B, 3, S, S] float32, RGB, CLIP-normalised."""
        out = torch.empty(len(frames), 3, self.image_size, self.image_size, device=self.device)
        groups: dict[tuple, list[int]] = {}
        for i, frame in enumerate(frames):
            groups.setdefault((frame.shape, frame.dtype.str), []).append(i)
        whole = len(groups) == 1
        for (shape, _), indices in groups.items():
            stacked = np.stack([frames[i] for i in indices]) if len(indices) > 1 else frames[indices[0]][None]
            x = self._to_device(stacked)
            scale = 65535.0 if x.dtype == torch.uint16 else 255.0
            x = x.unsqueeze(1) if len(shape) == 2 else x.permute(0, 3, 1, 2)  # a channels-last view, no copy
            if x.dtype == torch.uint16 or x.device.type != "cpu":
                x = x.float()
            # On the CPU uint8 frames are resized as uint8 (rounded to whole grey levels, as PIL and
            # OpenCV do): torch's SIMD path for that is ~10x faster than resizing the float frame
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False, antialias=True
            )
            target = out if whole else torch.empty(len(indices), *out.shape[1:], device=self.device)
            gain, bias = 1.0 / (scale * self.std.view(3)), -(self.mean / self.std).view(3)
            for c in range(3):  # BGR -> RGB and (x / scale - mean) / std, one plane at a time
                source = x[:, 0] if len(shape) == 2 else x[:, 2 - c]
                torch.add(source.float().mul_(gain[c]), bias[c], out=target[:, c])
            if not whole:
                out[torch.as_tensor(indices, device=self.device)] = target
        return out
