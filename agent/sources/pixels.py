"""GenICam pixel formats to the images the engine takes: 8-bit gray HxW or 8-bit BGR HxWx3.

Every other source hands over what OpenCV decodes (BGR, or gray), so a GenICam camera's frames do too:
- Mono8 as it is; Mono10/Mono12/Mono16 (unpacked, one uint16 per pixel holding 10/12/16 significant bits)
  shifted to their top 8 bits, so full scale of the sensor is 255 (the engine would read a uint16 frame as
  16-bit full scale and a 12-bit image would come out 16 times too dark);
- BayerRG8/GR8/GB8/BG8 demosaiced to BGR (the name is the colour order of the top-left 2x2 block's first row);
- RGB8 and RGBa8 reordered to BGR, BGRa8 without its alpha, BGR8 as it is.
Packed formats (Mono12p, Mono10Packed, ...) and YUV are not taken: set the camera to one of the above.
Older Basler names (RGB8Packed, BGR8Packed, BGRA8Packed) are the same layouts and taken too.
"""

from __future__ import annotations

import cv2
import numpy as np

ALIASES = {"RGB8Packed": "RGB8", "BGR8Packed": "BGR8", "BGRA8Packed": "BGRa8", "RGBA8Packed": "RGBa8"}
MONO_BITS = {"Mono8": 8, "Mono10": 10, "Mono12": 12, "Mono16": 16}
BAYER = {
    "BayerRG8": cv2.COLOR_BayerRGGB2BGR,
    "BayerGR8": cv2.COLOR_BayerGRBG2BGR,
    "BayerGB8": cv2.COLOR_BayerGBRG2BGR,
    "BayerBG8": cv2.COLOR_BayerBGGR2BGR,
}
COLOUR_CHANNELS = {"RGB8": 3, "BGR8": 3, "RGBa8": 4, "BGRa8": 4}
SUPPORTED = (*MONO_BITS, *BAYER, *COLOUR_CHANNELS)


class PixelFormatError(ValueError):
    """A frame in a pixel format the agent does not take, or whose buffer does not fit its format."""


def canonical(pixel_format: str) -> str:
    """The SFNC name of `pixel_format` (Basler's older names mapped); PixelFormatError when not supported."""
    name = ALIASES.get(pixel_format, pixel_format)
    if name not in SUPPORTED:
        raise PixelFormatError(
            f"pixel format {pixel_format} is not supported; set the camera to one of {', '.join(SUPPORTED)}"
        )
    return name


def channels(pixel_format: str) -> int:
    """Values per pixel in a buffer of `pixel_format` (1 for mono and Bayer)."""
    return COLOUR_CHANNELS.get(canonical(pixel_format), 1)


def to_engine_image(data: np.ndarray, pixel_format: str) -> np.ndarray:
    """`data` (HxW, or HxWxC for RGB/BGR formats) as an 8-bit gray or BGR image the engine takes."""
    name = canonical(pixel_format)
    want = channels(name)
    shape_ok = data.ndim == 2 if want == 1 else data.ndim == 3 and data.shape[2] == want
    if not shape_ok:
        raise PixelFormatError(f"a {name} frame of shape {data.shape} (expected {want} value(s) per pixel)")
    if name in MONO_BITS:
        return _mono(data, MONO_BITS[name])
    _need_8_bit(data, name)
    if name in BAYER:
        return cv2.cvtColor(np.ascontiguousarray(data), BAYER[name])
    if name == "BGR8":
        return np.ascontiguousarray(data)
    if name == "BGRa8":
        return np.ascontiguousarray(data[:, :, :3])
    return cv2.cvtColor(np.ascontiguousarray(data[:, :, :3]), cv2.COLOR_RGB2BGR)  # RGB8, RGBa8


def _mono(data: np.ndarray, bits: int) -> np.ndarray:
    if bits == 8:
        _need_8_bit(data, "Mono8")
        return np.ascontiguousarray(data)
    if data.dtype != np.uint16:
        raise PixelFormatError(f"a Mono{bits} frame must come as 16-bit values, got {data.dtype}")
    return np.minimum(data >> (bits - 8), 255).astype(np.uint8)  # stray bits above the format's: full scale


def _need_8_bit(data: np.ndarray, name: str) -> None:
    if data.dtype != np.uint8:
        raise PixelFormatError(f"a {name} frame must come as 8-bit values, got {data.dtype}")
