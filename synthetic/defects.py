"""Synthetic defects on good images: training data with exact masks when real defects are scarce.

Every defect kind draws a soft layer (an alpha map and a target colour, or a warp for `dent`)
and composites it onto the image. The mask is then derived from what actually changed: a pixel
is in the mask when its largest channel change is at least `NOTICEABLE` grey levels, plus the
pixels enclosed by such a region inside the defect's footprint (a stain over a speck of the same
colour is still one stain). So the mask covers exactly the visible change; the only unmasked
changes are faint fringes (anti-aliasing, soft edges) below `NOTICEABLE`.

Colours are chosen against the local background (dark defects on bright surfaces and the other
way round), so defects stay visible on black and on white. Sizes scale with the image. Given a
foreground (the product's pixels, as `trainer.foreground` estimates it), defects are centred on it, scaled to
it and clipped to it instead, so none lands on the background. All randomness comes from the
`numpy.random.Generator` passed in: same seed, same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import cv2
import numpy as np

from synthetic.kinds import DEFECT_KINDS, normalise_kind

NOTICEABLE = 12
"""Largest per-channel change (0-255) from which a pixel counts as defective in the mask."""

_LUMA = np.asarray([0.114, 0.587, 0.299], np.float32)  # BGR
_TINTS = np.asarray(  # BGR hues of common stains: rust, oil, coffee, green, ink, yellow
    [[40, 90, 160], [70, 65, 55], [50, 80, 110], [80, 140, 90], [150, 90, 60], [60, 170, 200]], np.float32
)

Defect = tuple[np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- shared drawing helpers


def _luma(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32) @ _LUMA


def _mean_luma(image: np.ndarray, where: np.ndarray) -> float:
    """Average brightness of the background the defect will sit on."""
    if not where.any():
        return float(_luma(image).mean())
    return float(_luma(image[where]).mean())


def _tone(luma: float, rng: np.random.Generator, prefer: str) -> float:
    """A brightness that contrasts with `luma` by >= ~40 levels: darker on bright, brighter on dark."""
    if prefer == "dark":
        darker = luma > 75
    elif prefer == "bright":
        darker = luma > 180
    else:
        darker = luma > 127 if (luma < 90 or luma > 165) else bool(rng.random() < 0.5)
    if darker:
        return luma * float(rng.uniform(0.05, 0.35))
    return luma + (255.0 - luma) * float(rng.uniform(0.55, 0.95))


def _coloured(tone: float, rng: np.random.Generator, saturation: float) -> np.ndarray:
    """A BGR colour of brightness ~`tone`, tinted towards a random stain hue by `saturation`."""
    hue = _TINTS[rng.integers(len(_TINTS))]
    hue = hue / float(hue @ _LUMA)
    colour = (1.0 - saturation) + saturation * hue
    return np.clip(colour * np.float32(tone), 0, 255).astype(np.float32)


def _blend(base: np.ndarray, target: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """base + (target - base) * alpha, in float; `target` is a colour or a per-pixel image."""
    return base + (target - base) * alpha[:, :, None]


def _enclosed(region: np.ndarray) -> np.ndarray:
    """Pixels not in `region` that cannot reach the image border without crossing it (its holes)."""
    height, width = region.shape
    canvas = np.zeros((height + 2, width + 2), np.uint8)
    canvas[1:-1, 1:-1] = region
    cv2.floodFill(canvas, np.zeros((height + 4, width + 4), np.uint8), (0, 0), 2)
    return canvas[1:-1, 1:-1] == 0


def _finish(
    image: np.ndarray, drawn: np.ndarray, footprint: np.ndarray, window: tuple[slice, slice], place: _Place
) -> Defect:
    """Paste the drawing of `window` (pixels outside the footprint or off the product untouched) and derive the mask."""
    footprint = place.clip(footprint, window)
    before = image[window]
    local = np.clip(np.rint(drawn), 0, 255).astype(np.uint8)
    local[~footprint] = before[~footprint]
    change = np.abs(local.astype(np.int16) - before.astype(np.int16)).max(axis=2)
    changed = change >= NOTICEABLE
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[window] = (changed | (_enclosed(changed.astype(np.uint8)) & footprint)).astype(np.uint8) * 255
    out = image.copy()
    out[window] = local
    return out, mask


def _composite(
    image: np.ndarray, target: np.ndarray, alpha: np.ndarray, footprint: np.ndarray, place: _Place
) -> Defect:
    """Blend a full-image layer, working only inside the footprint's bounding box."""
    footprint = place.clip(footprint)
    x, y, w, h = cv2.boundingRect(footprint.astype(np.uint8))
    window = (slice(y, y + h), slice(x, x + w))
    local_target = target[window] if target.ndim == 3 else target
    drawn = _blend(image[window].astype(np.float32), local_target, alpha[window])
    return _finish(image, drawn, footprint[window], window, place)


def _centre(rng: np.random.Generator, height: int, width: int, margin: float) -> np.ndarray:
    return np.asarray([rng.uniform(margin, width - 1 - margin), rng.uniform(margin, height - 1 - margin)], np.float64)


class _Place:
    """Where a defect may go: anywhere (`foreground` None, the original behaviour, same bytes) or on the product.

    With a foreground, sizes scale with the product's extent instead of the image, centres are drawn
    from product pixels at least `margin` inside its outline, and every footprint is clipped to it,
    so the defect's mask lies on the product.
    """

    def __init__(self, shape: tuple[int, ...], foreground: np.ndarray | None) -> None:
        self.height, self.width = shape[:2]
        self.mask = foreground
        if foreground is None:
            self.size = min(self.height, self.width)
            return
        _, _, w, h = cv2.boundingRect(foreground.astype(np.uint8))
        self.size = max(16, min(w, h))
        # distance to the nearest pixel off the product, the image edge counting as off
        self.depth = cv2.distanceTransform(np.pad(foreground.astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1]

    def centre(self, rng: np.random.Generator, margin: float) -> np.ndarray:
        if self.mask is None:
            return _centre(rng, self.height, self.width, margin)
        ys, xs = np.nonzero(self.depth >= min(margin, float(self.depth.max())))
        pick = int(rng.integers(len(ys)))
        return np.asarray([xs[pick], ys[pick]], np.float64) + rng.uniform(-0.5, 0.5, 2)

    def edge(self, rng: np.random.Generator) -> np.ndarray:
        """A point on the product's outline (on the image border when the product is the whole image)."""
        assert self.mask is not None
        ys, xs = np.nonzero(self.depth < 1.5)
        pick = int(rng.integers(len(ys)))
        return np.asarray([xs[pick], ys[pick]], np.float64)

    def clip(self, footprint: np.ndarray, window: tuple[slice, slice] | None = None) -> np.ndarray:
        if self.mask is None:
            return footprint
        return footprint & (self.mask if window is None else self.mask[window])


def _window(centre: np.ndarray, radius: float, height: int, width: int) -> tuple[slice, slice]:
    """The rows and columns around `centre` that a defect of `radius` can touch."""
    x0, x1 = int(max(0, np.floor(centre[0] - radius))), int(min(width, np.ceil(centre[0] + radius) + 1))
    y0, y1 = int(max(0, np.floor(centre[1] - radius))), int(min(height, np.ceil(centre[1] + radius) + 1))
    return slice(y0, y1), slice(x0, x1)


def _local_coords(
    rows: slice, cols: slice, centre: np.ndarray, angle: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(dx, dy) offsets from `centre` in the window and the same rotated into the defect's frame."""
    ys = np.arange(rows.start, rows.stop, dtype=np.float32) - np.float32(centre[1])
    xs = np.arange(cols.start, cols.stop, dtype=np.float32) - np.float32(centre[0])
    dx, dy = np.meshgrid(xs, ys)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return dx, dy, dx * c + dy * s, -dx * s + dy * c


def _smooth_field(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1], to keep blotches from looking flat."""
    grid = rng.random((cells, cells)).astype(np.float32)
    return np.clip(cv2.resize(grid, (max(width, 1), max(height, 1)), interpolation=cv2.INTER_CUBIC), 0, 1)


def _fixed(points: np.ndarray) -> np.ndarray:
    """Sub-pixel polyline points for OpenCV's `shift=4` drawing."""
    return np.rint(points * 16).astype(np.int32).reshape(-1, 1, 2)


# --------------------------------------------------------------------------- defect kinds


def _draw_scratch(image: np.ndarray, rng: np.random.Generator, place: _Place) -> Defect:
    height, width = image.shape[:2]
    size = place.size
    length = size * rng.uniform(0.2, 0.6)
    angle = rng.uniform(0, 2 * np.pi)
    direction = np.asarray([np.cos(angle), np.sin(angle)])
    normal = np.asarray([-direction[1], direction[0]])
    centre = place.centre(rng, 0.1 * size)
    p0, p2 = centre - direction * length / 2, centre + direction * length / 2
    p1 = centre + normal * length * rng.uniform(-0.25, 0.25)
    t = np.linspace(0.0, 1.0, 48)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2
    thickness = max(1, round(size / 256 * rng.uniform(0.8, 2.2)))
    canvas = np.zeros((height, width), np.uint8)
    for i in range(len(points) - 1):
        fade = np.sin(np.pi * (i + 0.5) / (len(points) - 1)) ** 0.35  # ends fade out
        a, b = _fixed(points[i : i + 2]).reshape(2, 2)
        cv2.line(canvas, tuple(a), tuple(b), int(255 * fade), thickness, cv2.LINE_AA, shift=4)
    alpha = canvas.astype(np.float32) / 255.0 * np.float32(rng.uniform(0.8, 1.0))
    footprint = place.clip(canvas > 0)
    tone = _tone(_mean_luma(image, footprint), rng, "either")
    colour = _coloured(tone, rng, 0.1)
    return _composite(image, colour, alpha, footprint, place)


def _jagged_path(start: np.ndarray, angle: float, steps: int, step: float, rng: np.random.Generator) -> np.ndarray:
    drift = np.cumsum(rng.normal(0.0, 0.08, steps))
    angles = angle + drift + rng.normal(0.0, 0.55, steps)
    moves = np.stack([np.cos(angles), np.sin(angles)], axis=1) * step
    return np.vstack([start, start + np.cumsum(moves, axis=0)])


def _draw_crack(image: np.ndarray, rng: np.random.Generator, place: _Place) -> Defect:
    height, width = image.shape[:2]
    size = place.size
    step = max(2.0, size * rng.uniform(0.02, 0.035))
    steps = max(4, int(size * rng.uniform(0.25, 0.55) / step))
    angle = rng.uniform(0, 2 * np.pi)
    start = place.centre(rng, 0.15 * size) - np.asarray([np.cos(angle), np.sin(angle)]) * steps * step / 2
    trunk = _jagged_path(start, angle, steps, step, rng)
    thick = max(1, round(size / 256 * rng.uniform(1.2, 2.8)))
    thin = max(1, thick - 1)
    canvas = np.zeros((height, width), np.uint8)
    tip = max(1, steps // 6)
    for piece, width_px in (
        (trunk[: tip + 1], thin),
        (trunk[tip : steps - tip + 1], thick),
        (trunk[steps - tip :], thin),
    ):
        cv2.polylines(canvas, [_fixed(piece)], False, 255, width_px, cv2.LINE_AA, shift=4)
    for _ in range(int(rng.integers(1, 4))):
        at = int(rng.integers(steps // 5, max(steps // 5 + 1, 4 * steps // 5)))
        branch_angle = angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.1)
        branch = _jagged_path(trunk[at], branch_angle, max(2, int(steps * rng.uniform(0.2, 0.45))), step * 0.8, rng)
        cv2.polylines(canvas, [_fixed(branch)], False, 255, thin, cv2.LINE_AA, shift=4)
    alpha = canvas.astype(np.float32) / 255.0 * np.float32(rng.uniform(0.85, 1.0))
    footprint = place.clip(canvas > 0)
    tone = _tone(_mean_luma(image, footprint), rng, "dark")
    colour = _coloured(tone, rng, 0.15)
    return _composite(image, colour, alpha, footprint, place)


def _draw_hole(image: np.ndarray, rng: np.random.Generator, place: _Place) -> Defect:
    height, width = image.shape[:2]
    size = place.size
    radius = size * rng.uniform(0.025, 0.07) + 1.5
    squash = rng.uniform(0.65, 1.0)
    rim = rng.uniform(0.25, 0.5)  # rim width relative to the radius
    centre = place.centre(rng, 0.08 * size)
    rows, cols = _window(centre, radius * (1 + rim) + 2, height, width)
    _, _, u, v = _local_coords(rows, cols, centre, rng.uniform(0, np.pi))
    rho = np.sqrt((u / np.float32(radius)) ** 2 + (v / np.float32(radius * squash)) ** 2)
    inside = np.clip((1.0 - rho) * np.float32(radius * squash) + 0.5, 0.0, 1.0)  # 1 px anti-aliased edge
    ring = np.clip(1.0 - np.abs(rho - 1.0) / np.float32(rim), 0.0, 1.0) ** 2 * np.float32(rng.uniform(0.5, 0.8))
    patch = image[rows, cols]
    luma = _mean_luma(patch, place.clip(rho < 1 + rim, (rows, cols)))
    if luma > 70:  # dark hole, light raised rim
        depth = (0.6 + 0.4 * np.minimum(rho, 1.0)) * np.float32(min(luma * 0.25, rng.uniform(5, 35)))
        rim_tone = min(255.0, luma + rng.uniform(30, 70))
    else:  # on a dark surface: backlit through the hole, darker rim
        depth = (1.1 - 0.2 * np.minimum(rho, 1.0)) * np.float32(rng.uniform(150, 210))
        rim_tone = luma * 0.5
    drawn = _blend(patch.astype(np.float32), _coloured(rim_tone, rng, 0.05), ring)
    drawn = _blend(drawn, depth[:, :, None] * _coloured(1.0, rng, 0.05), inside)
    return _finish(image, drawn, (inside > 0) | (ring > 0), (rows, cols), place)


def _blob_outline(rng: np.random.Generator, radius: float, points: int = 72) -> np.ndarray:
    """An irregular closed outline around (0, 0): a circle with random low harmonics."""
    theta = np.linspace(0, 2 * np.pi, points, endpoint=False)
    r = np.ones_like(theta)
    for k in range(2, 7):
        r += rng.uniform(0.0, 0.22) / k**0.7 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = np.maximum(r, 0.35) * radius
    squash, angle = rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    x, y = r * np.cos(theta), r * np.sin(theta) * squash
    return np.stack([x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)], axis=1)


def _draw_stain(image: np.ndarray, rng: np.random.Generator, place: _Place) -> Defect:
    height, width = image.shape[:2]
    size = place.size
    radius = size * rng.uniform(0.05, 0.15) + 2
    centre = place.centre(rng, 0.1 * size)
    outline = _blob_outline(rng, radius) + centre
    shape = np.zeros((height, width), np.uint8)
    cv2.fillPoly(shape, [_fixed(outline)], 255, cv2.LINE_8, shift=4)
    rows, cols = _window(centre, 1.4 * radius + 2, height, width)
    depth = cv2.distanceTransform(np.pad(shape[rows, cols], 1), cv2.DIST_L2, 3)[1:-1, 1:-1]
    feather = max(1.5, radius * rng.uniform(0.15, 0.4))
    ramp = np.clip(depth / np.float32(feather), 0.0, 1.0)
    ramp = ramp * ramp * (3 - 2 * ramp)  # smoothstep: soft edge inside the outline
    texture = 0.8 + 0.2 * _smooth_field(rng, ramp.shape[0], ramp.shape[1], 4)
    alpha = ramp * texture * np.float32(rng.uniform(0.55, 0.9))
    patch = image[rows, cols]
    tone = _tone(_mean_luma(patch, place.clip(alpha > 0, (rows, cols))), rng, "either")
    colour = _coloured(tone, rng, rng.uniform(0.3, 0.8))
    return _finish(image, _blend(patch.astype(np.float32), colour, alpha), alpha > 0, (rows, cols), place)


def _draw_missing_part(image: np.ndarray, rng: np.random.Generator, place: _Place) -> Defect:
    height, width = image.shape[:2]
    size = place.size
    chip = rng.random() < 0.35
    if chip and place.mask is not None:  # a chip out of the product's outline
        radius = size * rng.uniform(0.1, 0.2) + 2
        centre = place.edge(rng)
    elif chip:  # a chip out of an edge of the image
        radius = size * rng.uniform(0.1, 0.2) + 2
        side = int(rng.integers(4))
        along = rng.uniform(0.2, 0.8)
        centre = np.asarray(
            [[along * (width - 1), 0], [along * (width - 1), height - 1], [0, along * (height - 1)],
             [width - 1, along * (height - 1)]][side], np.float64
        )  # fmt: skip
    else:
        radius = size * rng.uniform(0.06, 0.16) + 2
        centre = place.centre(rng, 0.1 * size)
    corners = int(rng.integers(5, 10))
    theta = np.sort(rng.uniform(0, 2 * np.pi, corners))
    r = radius * rng.uniform(0.55, 1.0, corners)
    polygon = centre + np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [_fixed(polygon)], 255, cv2.LINE_AA, shift=4)
    alpha = canvas.astype(np.float32) / 255.0
    footprint = place.clip(canvas > 0)
    tone = _tone(_mean_luma(image, footprint), rng, "either")
    fill = np.empty((height, width), np.float32)
    fill[:] = np.float32(tone)
    ys, xs = np.nonzero(footprint)
    if rng.random() < 0.5:  # a different texture shows through: stripes
        period, angle = size * rng.uniform(0.03, 0.08) + 2, rng.uniform(0, np.pi)
        phase = (xs * np.cos(angle) + ys * np.sin(angle)) / period
        fill[ys, xs] += np.float32(10.0) * np.sin(2 * np.pi * phase).astype(np.float32)
    fill[ys, xs] += rng.normal(0.0, 1.5, len(ys)).astype(np.float32)
    target = fill[:, :, None] * _coloured(1.0, rng, 0.15)
    return _composite(image, target, alpha, footprint, place)


def _draw_dent(image: np.ndarray, rng: np.random.Generator, place: _Place) -> Defect:
    height, width = image.shape[:2]
    size = place.size
    radius = size * rng.uniform(0.06, 0.14) + 3
    squash = rng.uniform(0.6, 1.0)
    centre = place.centre(rng, 0.1 * size)
    rows, cols = _window(centre, radius + 2, height, width)
    dx, dy, u, v = _local_coords(rows, cols, centre, rng.uniform(0, np.pi))
    rho2 = (u / np.float32(radius)) ** 2 + (v / np.float32(radius * squash)) ** 2
    bump = np.where(rho2 < 1.0, (1.0 - rho2) ** 2, 0.0).astype(np.float32)  # smooth, zero at the rim
    pull = np.float32(rng.uniform(0.25, 0.5) * rng.choice([-1.0, 1.0]))
    map_x = (dx + np.float32(centre[0])) - pull * dx * bump
    map_y = (dy + np.float32(centre[1])) - pull * dy * bump
    warped = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    grad_y, grad_x = np.gradient(bump)
    light = rng.uniform(0, 2 * np.pi)
    directional = -(grad_x * np.float32(np.cos(light)) + grad_y * np.float32(np.sin(light))) * np.float32(radius)
    patch = image[rows, cols]
    luma = _mean_luma(patch, place.clip(bump > 0, (rows, cols)))
    depth_sign = -1.0 if luma > 75 else 1.0
    shade = depth_sign * rng.uniform(28, 45) * bump + rng.uniform(10, 25) * np.clip(directional, -1.5, 1.5)
    drawn = warped.astype(np.float32) + shade.astype(np.float32)[:, :, None]
    return _finish(image, drawn, bump > 0, (rows, cols), place)


_DRAWERS: dict[str, Callable[[np.ndarray, np.random.Generator, _Place], Defect]] = {
    "scratch": _draw_scratch,
    "crack": _draw_crack,
    "hole": _draw_hole,
    "stain": _draw_stain,
    "missing part": _draw_missing_part,
    "dent": _draw_dent,
}


def apply_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator, foreground: np.ndarray | None = None
) -> Defect:
    """Draw one defect of `kind` on a copy of `image` (uint8 HxWx3 BGR, at least 16 px a side).

    `foreground` (bool HxW, or None for anywhere) is the product: the defect is centred on it,
    sized to it and clipped to it, so nothing off the product changes. Returns (defected image,
    mask uint8 {0, 255}). A draw whose visible area came out tiny (e.g. mostly off the image) is
    redrawn, up to 8 times.
    """
    draw = _DRAWERS[normalise_kind(kind)]
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 HxWx3 BGR image, got {image.dtype} {image.shape}")
    if min(image.shape[:2]) < 16:
        raise ValueError(f"image too small for a defect: {image.shape[1]}x{image.shape[0]}")
    if foreground is not None:
        if foreground.shape != image.shape[:2]:
            (fh, fw), (ih, iw) = foreground.shape[:2], image.shape[:2]
            raise ValueError(f"foreground is {fw}x{fh} but the image is {iw}x{ih}")
        foreground = np.ascontiguousarray(foreground, bool)
        if not foreground.any():
            raise ValueError("foreground is empty: no product pixel to put a defect on")
    image = np.ascontiguousarray(image)
    place = _Place(image.shape, foreground)
    min_area = max(4, min(image.shape[:2]) // 16)
    for _ in range(8):
        out, mask = draw(image, rng, place)
        if np.count_nonzero(mask) >= min_area:
            break
    return out, mask


def scratch(image: np.ndarray, rng: np.random.Generator) -> Defect:
    """A thin anti-aliased curve, bright on dark surfaces and dark on bright ones, fading at the ends."""
    return apply_defect(image, "scratch", rng)


def crack(image: np.ndarray, rng: np.random.Generator) -> Defect:
    """A jagged dark line with one to three branches, thicker in the middle."""
    return apply_defect(image, "crack", rng)


def hole(image: np.ndarray, rng: np.random.Generator) -> Defect:
    """A dark elliptic hole with a soft raised rim (backlit bright on dark surfaces)."""
    return apply_defect(image, "hole", rng)


def stain(image: np.ndarray, rng: np.random.Generator) -> Defect:
    """A translucent tinted blotch with an irregular, soft outline."""
    return apply_defect(image, "stain", rng)


def missing_part(image: np.ndarray, rng: np.random.Generator) -> Defect:
    """A sharp-edged polygon (sometimes a chip out of the border) replaced by flat or striped fill."""
    return apply_defect(image, "missing part", rng)


def dent(image: np.ndarray, rng: np.random.Generator) -> Defect:
    """A local warp (smooth displacement via cv2.remap) with shading; the mask is where it shows."""
    return apply_defect(image, "dent", rng)


class Part(NamedTuple):
    """One synthetic part: the image, its exact defect mask (all zero when good) and the defect kind."""

    image: np.ndarray
    mask: np.ndarray
    kind: str | None  # None: a good part


def make_part(
    rng: np.random.Generator, good: np.ndarray, defect_rate: float, kinds: Sequence[str] = DEFECT_KINDS
) -> Part:
    """A part made from the good surface `good`: defective with probability `defect_rate`, of a kind drawn from `kinds`.

    For streams of parts (the agent's synthetic camera) rather than data sets on disk; all
    randomness comes from `rng`, and `good` is never modified.
    """
    if not 0.0 <= defect_rate <= 1.0:
        raise ValueError(f"defect_rate must be in [0, 1], not {defect_rate}")
    if rng.random() >= defect_rate or not kinds:
        return Part(good.copy(), np.zeros(good.shape[:2], np.uint8), None)
    kind = normalise_kind(kinds[int(rng.integers(len(kinds)))])
    image, mask = apply_defect(good, kind, rng)
    return Part(image, mask, kind)
