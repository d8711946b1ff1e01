"""Evaluation report: `report.json` for machines, `report.md` laid out like the papers' tables,
and a PNG grid of sample predictions for a quick look at what the numbers mean.

`results` is what `trainer.metrics.Evaluator.compute()` returns: {"classes": {name: row},
"mean": row, "notes": [...], ...} with rows keyed by `trainer.metrics.COLUMNS` and values in
[0, 1] (NaN where undefined). JSON has no NaN, so NaN is written as null.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from trainer.metrics import COLUMNS

COLUMN_TITLES: dict[str, str] = {
    "image_auroc": "Image AUROC",
    "image_ap": "Image AP",
    "image_f1_max": "Image F1-max",
    "pixel_auroc": "Pixel AUROC",
    "pixel_ap": "Pixel AP",
    "pixel_f1_max": "Pixel F1-max",
    "pixel_aupro": "Pixel AUPRO",
}

TILE = 192
TITLE_HEIGHT = 28
_FONT = cv2.FONT_HERSHEY_SIMPLEX


# --- report.json / report.md ---------------------------------------------------------------


def write_report(out_dir: Path, results: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write `report.json` and `report.md` into `out_dir`; returns their paths.

    `meta` is copied into the JSON as is (checkpoint, data spec, image counts, skipped files,
    timing, ...); Paths, numpy values, sets and datetimes are converted, NaN becomes null.
    The markdown header shows `checkpoint`, `data`, `date`, `images`, `skipped` and
    `seconds` when present.
    """
    if "classes" not in results or "mean" not in results:
        raise ValueError("results need 'classes' and 'mean' (see trainer.metrics.Evaluator.compute)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = str(meta.get("date") or dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"))
    document = {
        "date": date,
        "columns": list(results.get("columns", COLUMNS)),
        "classes": results["classes"],
        "mean": results["mean"],
        "notes": list(results.get("notes", [])),
        "counts": results.get("counts", {}),
        "meta": dict(meta),
    }
    json_path = out_dir / "report.json"
    md_path = out_dir / "report.md"
    json_path.write_text(json.dumps(jsonable(document), indent=2, allow_nan=False) + "\n")
    md_path.write_text(_markdown(results, meta, date))
    return json_path, md_path


def jsonable(value: Any) -> Any:
    """Plain JSON types only; NaN/inf become null so the file is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return [jsonable(v) for v in sorted(value, key=str)]
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    return str(value)  # Path and anything else with a meaningful str()


def format_percent(value: float | None) -> str:
    """0.9123 -> "91.2", as the papers print; undefined -> "-"."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{100.0 * value:.1f}"


def _markdown(results: Mapping[str, Any], meta: Mapping[str, Any], date: str) -> str:
    columns = list(results.get("columns", COLUMNS))
    lines = ["# GenCLIP evaluation report", ""]
    for key, label in (
        ("checkpoint", "Checkpoint"),
        ("prompt_version", "Prompt version"),
        ("data", "Data"),
        ("images", "Images"),
        ("skipped", "Skipped files"),
        ("seconds", "Time (s)"),
    ):
        if key in meta:
            lines.append(f"- {label}: {_header_value(key, meta[key])}")
    lines += [f"- Date: {date}", ""]

    lines.append("| Class | " + " | ".join(COLUMN_TITLES.get(c, c) for c in columns) + " |")
    lines.append("|:--|" + "--:|" * len(columns))
    for name, row in results["classes"].items():
        lines.append(_table_row(_escape(str(name)), row, columns))
    lines.append(_table_row("**Mean**", results["mean"], columns))

    notes = list(results.get("notes", []))
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _table_row(label: str, row: Mapping[str, Any], columns: Sequence[str]) -> str:
    return f"| {label} | " + " | ".join(format_percent(row.get(c)) for c in columns) + " |"


def _header_value(key: str, value: Any) -> str:
    if key == "skipped" and isinstance(value, (list, tuple, set)):
        return str(len(value))
    if key == "seconds" and isinstance(value, (int, float)):
        return f"{value:.1f}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return f"`{value}`" if key == "checkpoint" else str(value)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


# --- sample grid ---------------------------------------------------------------------------

SCALE_WIDTH = 64
OK_COLOUR, WRONG_COLOUR = (60, 180, 60), (40, 40, 230)  # BGR: green, red


@dataclass(frozen=True)
class GridExample:
    """One row of a class's picture: the image, its ground truth, the map, and how it was judged."""

    image: np.ndarray
    mask: np.ndarray | None
    anomaly_map: np.ndarray
    kind: str = ""  # "good" or the defect kind
    score: float | None = None
    threshold: float | None = None
    label: int | None = None  # 0 good, 1 defective (the truth)

    @property
    def verdict(self) -> str | None:
        if self.score is None or self.threshold is None:
            return None
        return "NG" if self.score >= self.threshold else "OK"

    @property
    def correct(self) -> bool | None:
        if self.verdict is None or self.label is None:
            return None
        return (self.verdict == "NG") == (self.label == 1)

    def caption(self) -> str:
        """'hole: 0.612 >= 0.550 NG' / 'good: 0.612 >= 0.550 NG (false reject)' / 'hole: ... OK (miss)'."""
        head = self.kind or ("good" if self.label == 0 else "defect")
        if self.verdict is None:
            return head
        sign = ">=" if self.verdict == "NG" else "<"
        text = f"{head}: {self.score:.3f} {sign} {self.threshold:.3f} {self.verdict}"
        if self.correct is False:
            text += " (false reject)" if self.label == 0 else " (miss)"
        return text


def write_sample_grid(
    path: Path,
    rows: Sequence[GridExample | tuple[np.ndarray, np.ndarray | None, np.ndarray]],
    title: str,
    tile: int = TILE,
) -> Path:
    """One PNG: per row, image | ground truth (black if none) | anomaly map over the image, and a
    colour scale bar on the right.

    Every tile is resized to `tile` x `tile`. The heat map shows the map's absolute value in
    [0, 1] (not normalised per image), so rows can be compared; the scale bar gives its colours.
    A row with a verdict is captioned with the kind, score, threshold and verdict, framed green
    when the verdict is right and red when it is a false reject or a miss.
    The PNG is 3 * tile + SCALE_WIDTH wide and TITLE_HEIGHT + len(rows) * tile high.
    """
    if not rows:
        raise ValueError("no rows to draw")
    examples = [r if isinstance(r, GridExample) else GridExample(*r) for r in rows]
    banner = np.zeros((TITLE_HEIGHT, 3 * tile, 3), np.uint8)
    _label(banner, title, (6, TITLE_HEIGHT - 9), scale=0.55)
    bands = [banner]
    for i, example in enumerate(examples):
        labels = ("image", "ground truth", "anomaly map") if i == 0 else ("", "", "")
        tiles = _row_tiles(example.image, example.mask, example.anomaly_map, tile)
        for t, text in zip(tiles, labels, strict=True):
            if text:
                _label(t, text, (4, 14))
        if example.verdict is not None:
            _label(tiles[0], example.caption(), (4, tile - 8), scale=0.36)
            colour = OK_COLOUR if example.correct is not False else WRONG_COLOUR
            cv2.rectangle(tiles[0], (0, 0), (tile - 1, tile - 1), colour, 3)
        band = np.hstack(tiles)
        if i > 0:
            band[0] = 96  # thin grey line between rows
        bands.append(band)
    grid = np.vstack(bands)
    grid = np.hstack([grid, scale_bar(grid.shape[0], TITLE_HEIGHT)])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), grid):
        raise OSError(f"could not write {path}")
    return path


def scale_bar(height: int, top: int, width: int = SCALE_WIDTH) -> np.ndarray:
    """The heat map's colours from 1.0 (top) to 0.0 (bottom), labelled, as a column `width` wide."""
    column = np.zeros((height, width, 3), np.uint8)
    span = max(height - top - 16, 2)
    values = np.linspace(1.0, 0.0, span)
    colours = cv2.applyColorMap((values * 255).astype(np.uint8)[:, None], cv2.COLORMAP_JET)  # [span, 1, 3]
    column[top + 8 : top + 8 + span, 6:22] = colours
    for value in (1.0, 0.75, 0.5, 0.25, 0.0):
        y = top + 8 + round((1.0 - value) * (span - 1))
        _label(column, f"{value:.2f}", (25, min(max(y + 4, 10), height - 2)), scale=0.35)
    _label(column, "map", (6, top - 6 if top > 12 else 12), scale=0.4)
    return column


def _row_tiles(image: np.ndarray, mask: np.ndarray | None, anomaly_map: np.ndarray, tile: int) -> list[np.ndarray]:
    size = (tile, tile)
    picture = np.asarray(image)
    if picture.dtype != np.uint8:
        raise ValueError("image must be uint8 BGR")
    if picture.ndim == 2:
        picture = cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR)
    picture = cv2.resize(picture, size, interpolation=cv2.INTER_AREA)

    truth = np.zeros((tile, tile, 3), np.uint8)
    if mask is not None:
        defect = (np.asarray(mask, np.float32) > 0.5).astype(np.uint8) * 255
        truth[:] = cv2.resize(defect, size, interpolation=cv2.INTER_NEAREST)[..., None]

    raw = np.asarray(anomaly_map, np.float32)
    peak = float(np.nanmax(raw)) if np.isfinite(raw).any() else math.nan
    scores = np.clip(cv2.resize(np.nan_to_num(raw, nan=0.0), size, interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    heat = cv2.applyColorMap((scores * 255).astype(np.uint8), cv2.COLORMAP_JET)
    overlay = cv2.addWeighted(picture, 0.5, heat, 0.5, 0.0)
    if mask is not None:  # the true defect's outline over the map, to compare where it points
        contours, _ = cv2.findContours(
            cv2.resize(defect, size, interpolation=cv2.INTER_NEAREST), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
        )
        cv2.drawContours(overlay, contours, -1, (255, 255, 255), 1)
    _label(overlay, f"max {peak:.2f}", (4, tile - 6))
    return [picture, truth, overlay]


def _label(canvas: np.ndarray, text: str, origin: tuple[int, int], scale: float = 0.4) -> None:
    """White text with a black outline, readable on any background; made smaller to fit the canvas's width
    (a caption like 'good: 0.612 >= 0.550 NG (false reject)' is wider than a tile at the usual size)."""
    room = canvas.shape[1] - origin[0] - 5  # and clear of a tile's 3 px frame
    (width, _), _ = cv2.getTextSize(text, _FONT, scale, 3)
    if width > room > 0:
        scale *= room / width
    cv2.putText(canvas, text, origin, _FONT, scale, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(canvas, text, origin, _FONT, scale, (255, 255, 255), 1, cv2.LINE_AA)
