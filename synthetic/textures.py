"""Procedural "good product" images: surfaces to put synthetic defects on in tests and demos.

No downloads needed: each family is a few vectorised numpy/OpenCV operations (a few ms at
224 px). A seed picks one instance of a family: colour, scale, rotation and lighting vary a
little, the look of the family does not.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from synthetic.kinds import TEXTURE_FAMILIES as FAMILIES

_Rng = np.random.Generator


def _coords(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates centred on the image and rotated by `angle` (u along, v across)."""
    axis = np.arange(size, dtype=np.float32) - (size - 1) / 2.0
    x, y = np.meshgrid(axis, axis)
    c, s = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    return x * c + y * s, -x * s + y * c


def _noise(rng: _Rng, u: np.ndarray, v: np.ndarray, cell_u: float, cell_v: float) -> np.ndarray:
    """Smooth unit-variance noise with correlation lengths `cell_u` along u and `cell_v` along v."""
    extent = float(max(np.abs(u).max(), np.abs(v).max())) + 1.0
    n_u = int(np.ceil(2 * extent / cell_u)) + 4
    n_v = int(np.ceil(2 * extent / cell_v)) + 4
    grid = rng.standard_normal((n_v, n_u)).astype(np.float32)
    map_x = (u + extent) / np.float32(cell_u) + 1.5
    map_y = (v + extent) / np.float32(cell_v) + 1.5
    out = cv2.remap(grid, map_x, map_y, cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    return out / np.float32(max(float(out.std()), 1e-6))


def _lighting(rng: _Rng, size: int, strength: float) -> np.ndarray:
    """A soft directional gradient plus a mild vignette, as from a lamp off to one side."""
    u, v = _coords(size, float(rng.uniform(0, 2 * np.pi)))
    gradient = u / np.float32(size) * np.float32(rng.uniform(0.5, 1.0) * strength)
    vignette = (u * u + v * v) / np.float32(size * size) * np.float32(-0.4 * strength)
    return 1.0 + gradient + vignette


def _colour(rng: _Rng, base_bgr: tuple[float, float, float], spread: float) -> np.ndarray:
    jitter = rng.uniform(1 - spread, 1 + spread, 3) * rng.uniform(1 - spread, 1 + spread)
    return np.clip(np.asarray(base_bgr, np.float32) * jitter.astype(np.float32), 0, 255)


def _paint(shade: np.ndarray, dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Map a [0, 1] shade field onto a two-colour ramp -> float BGR."""
    shade = np.clip(shade, 0.0, 1.0)[:, :, None]
    return dark[None, None, :] + (light - dark)[None, None, :] * shade


def _woven(rng: _Rng, size: int) -> np.ndarray:
    scale = size / 224.0
    period = float(rng.uniform(7.0, 11.0)) * scale
    u, v = _coords(size, float(rng.uniform(-0.25, 0.25)))
    fu, fv = u / np.float32(period), v / np.float32(period)
    iu, iv = np.floor(fu), np.floor(fv)
    fu, fv = fu - iu, fv - iv
    across_warp, across_weft = np.sin(np.pi * fv), np.sin(np.pi * fu)
    warp = np.sqrt(across_warp) * (0.75 + 0.25 * across_weft)
    weft = np.sqrt(across_weft) * (0.75 + 0.25 * across_warp)
    on_top = (iu + iv) % 2 == 0
    fibres = _noise(rng, u, v, 2.5 * scale, 0.8) * 0.05
    shade = np.where(on_top, warp, weft) * 0.8 + 0.1 + fibres
    base = _colour(rng, tuple(rng.choice([[60, 90, 150], [150, 110, 70], [80, 80, 80], [170, 190, 200]])), 0.15)
    weft_tint = base * np.float32(rng.uniform(0.8, 1.1))
    dark, light = base * 0.25, base * 1.25
    img = np.where(on_top[:, :, None], _paint(shade, dark, light), _paint(shade, weft_tint * 0.25, weft_tint * 1.25))
    return img * _lighting(rng, size, 0.25)[:, :, None]


def _grain(rng: _Rng, size: int) -> np.ndarray:
    scale = size / 224.0
    u, v = _coords(size, float(rng.uniform(-0.35, 0.35)) + float(rng.choice([0.0, np.pi / 2])))
    period = float(rng.uniform(9.0, 16.0)) * scale
    bend = _noise(rng, u, v, 90.0 * scale, 35.0 * scale) * np.float32(rng.uniform(0.6, 1.2))
    curve = (u / np.float32(size)) ** 2 * np.float32(rng.uniform(-3.0, 3.0))
    phase = v / np.float32(period) + bend + curve
    rings = (0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** np.float32(rng.uniform(3.0, 6.0))
    streaks = _noise(rng, u, v, 60.0 * scale, 0.9) * 0.06
    shade = 0.85 - 0.55 * rings + streaks
    light = _colour(rng, (95.0, 160.0, 215.0), 0.12)
    dark = light * np.float32(rng.uniform(0.35, 0.5))
    return _paint(shade, dark, light) * _lighting(rng, size, 0.2)[:, :, None]


def _metal(rng: _Rng, size: int) -> np.ndarray:
    scale = size / 224.0
    u, v = _coords(size, float(rng.uniform(-np.pi, np.pi)))
    brushed = _noise(rng, u, v, 120.0 * scale, 0.7) * 0.7 + _noise(rng, u, v, 25.0 * scale, 0.7) * 0.3
    across = _coords(size, float(rng.uniform(0, 2 * np.pi)))[0] / np.float32(size)
    band = np.exp(-(((across - np.float32(rng.uniform(-0.3, 0.3))) / np.float32(rng.uniform(0.12, 0.3))) ** 2))
    shade = np.float32(rng.uniform(0.45, 0.65)) + 0.035 * brushed + 0.25 * band + 0.15 * across
    tint = np.asarray([rng.uniform(0.95, 1.1), 1.0, rng.uniform(0.9, 1.05)], np.float32)
    grey = shade[:, :, None] * 230.0 * tint[None, None, :]
    return grey * _lighting(rng, size, 0.1)[:, :, None]


def _dots(rng: _Rng, size: int) -> np.ndarray:
    pitch = size / float(rng.uniform(4.5, 7.0))
    radius = pitch * float(rng.uniform(0.3, 0.4))
    u, v = _coords(size, float(rng.uniform(-0.15, 0.15)))
    u = u + np.float32(rng.uniform(0, pitch))
    v = v + np.float32(rng.uniform(0, pitch))
    iu, iv = np.round(u / np.float32(pitch)), np.round(v / np.float32(pitch))
    table = rng.normal(0.0, 0.04 * pitch, (16, 16, 2)).astype(np.float32)
    ju = table[iu.astype(np.int64) % 16, iv.astype(np.int64) % 16]
    du = u - iu * np.float32(pitch) - ju[:, :, 0]
    dv = v - iv * np.float32(pitch) - ju[:, :, 1]
    dist = np.sqrt(du * du + dv * dv)
    cover = np.clip(np.float32(radius) - dist + 0.5, 0.0, 1.0)
    height = np.sqrt(np.clip(1.0 - (dist / np.float32(radius)) ** 2, 0.0, 1.0))
    light_angle = float(rng.uniform(0, 2 * np.pi))
    lit = np.clip(
        0.55 * height
        + 0.35 * (du * np.float32(np.cos(light_angle)) + dv * np.float32(np.sin(light_angle))) / np.float32(radius)
        + 0.45,
        0.0,
        1.2,
    )
    pill = _colour(rng, tuple(rng.choice([[225, 230, 235], [60, 200, 235], [70, 80, 200], [200, 140, 90]])), 0.08)
    tray = _colour(rng, tuple(rng.choice([[40, 40, 45], [190, 185, 180]])), 0.1)
    shadow = np.clip((dist - np.float32(radius)) / np.float32(0.25 * pitch), 0.0, 1.0)
    tray_img = tray[None, None, :] * (0.75 + 0.25 * shadow)[:, :, None]
    pill_img = pill[None, None, :] * lit[:, :, None]
    img = tray_img + (pill_img - tray_img) * cover[:, :, None]
    return img * _lighting(rng, size, 0.15)[:, :, None]


def _tiles(rng: _Rng, size: int) -> np.ndarray:
    pitch = size / float(rng.uniform(2.5, 4.5))
    grout = pitch * float(rng.uniform(0.04, 0.07))
    u, v = _coords(size, float(rng.uniform(-0.2, 0.2)))
    u = u + np.float32(rng.uniform(0, pitch))
    v = v + np.float32(rng.uniform(0, pitch))
    fu, fv = u / np.float32(pitch), v / np.float32(pitch)
    iu, iv = np.floor(fu), np.floor(fv)
    fu, fv = (fu - iu) * np.float32(pitch), (fv - iv) * np.float32(pitch)
    edge = np.minimum(np.minimum(fu, np.float32(pitch) - fu), np.minimum(fv, np.float32(pitch) - fv))
    on_tile = np.clip(edge - np.float32(grout) + 0.5, 0.0, 1.0)
    bevel = np.clip(edge / np.float32(2.5 * grout), 0.0, 1.0)
    variation = rng.uniform(0.9, 1.1, (8, 8)).astype(np.float32)
    tile_shade = variation[iu.astype(np.int64) % 8, iv.astype(np.int64) % 8]
    surface = _noise(rng, u, v, 6.0, 6.0) * 0.02
    tile = _colour(rng, tuple(rng.choice([[200, 200, 195], [150, 170, 90], [60, 90, 170], [120, 140, 150]])), 0.1)
    grout_colour = _colour(rng, (110.0, 115.0, 120.0), 0.08)
    shade = (tile_shade * (0.8 + 0.2 * bevel) + surface)[:, :, None]
    img = grout_colour[None, None, :] + (tile[None, None, :] * shade - grout_colour) * on_tile[:, :, None]
    return img * _lighting(rng, size, 0.15)[:, :, None]


def _leather(rng: _Rng, size: int) -> np.ndarray:
    scale = size / 224.0
    u, v = _coords(size, float(rng.uniform(0, np.pi)))
    cells = _noise(rng, u, v, 9.0 * scale, 9.0 * scale * float(rng.uniform(0.8, 1.25)))
    creases = np.exp(-((cells / np.float32(0.35)) ** 2))
    broad = _noise(rng, u, v, 40.0 * scale, 40.0 * scale) * 0.05
    pores = np.clip(_noise(rng, u, v, 1.0, 1.0) - 1.6, 0.0, None) * 0.25
    shade = 0.75 - 0.35 * creases + broad - pores
    light = _colour(rng, tuple(rng.choice([[40, 75, 130], [30, 30, 35], [70, 120, 170], [40, 40, 110]])), 0.15)
    return _paint(shade, light * 0.35, light * 1.3) * _lighting(rng, size, 0.25)[:, :, None]


_RENDERERS: dict[str, Callable[[_Rng, int], np.ndarray]] = {
    "woven": _woven,
    "grain": _grain,
    "metal": _metal,
    "dots": _dots,
    "tiles": _tiles,
    "leather": _leather,
}


def render_texture(family: str, seed: int, size: int) -> np.ndarray:
    """One good surface of `family` as uint8 [size, size, 3] BGR; same (family, seed, size) -> same pixels."""
    if family not in _RENDERERS:
        raise ValueError(f"unknown texture family {family!r}; expected one of {', '.join(FAMILIES)}")
    if size < 16:
        raise ValueError(f"texture size must be at least 16 px, not {size}")
    rng = np.random.default_rng([seed % (1 << 64), FAMILIES.index(family)])
    image = _RENDERERS[family](rng, size)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def instance_seed(seed: int, index: int) -> int:
    """The seed of the `index`-th image of a set made with `seed` (no overlap between nearby seeds)."""
    return int(np.random.SeedSequence([seed % (1 << 64), index]).generate_state(1, np.uint64)[0])


def write_good_images(family: str, out_dir: Path | str, count: int, seed: int, size: int) -> list[Path]:
    """Write `count` PNGs `<family>_NNN.png` of one family into `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        image = render_texture(family, instance_seed(seed, index), size)
        path = out_dir / f"{family}_{index:03d}.png"
        ok, encoded = cv2.imencode(".png", image)
        if not ok:
            raise OSError(f"could not encode {path}")
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(encoded.tobytes())
        tmp.replace(path)
        paths.append(path)
    return paths
