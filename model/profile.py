"""Class profiles: how one product class is scored on a line, decided once and kept in a small JSON file.

A profile records the class word used in the prompts (and why: Class Name
Filtering's similarities, a configured word, or none), the reference set it was
decided on, the defect vocabulary, and the calibration: the threshold with the
prompt version, precision and scoring settings it was measured with. A
calibration is only used while those still equal the running engine's; a
profile lives beside the line's config, never inside a prompt checkpoint, so a
new prompt version cannot silently inherit thresholds measured on the old one.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

FORMAT = "genclip-class-profile"
FORMAT_VERSION = 1
ClassWordSource = Literal["cnf", "config", "unfiltered", "cnf-off", "generic"]


class ProfileError(ValueError):
    """A profile file that cannot be used; the message names the file and the problem."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def threshold_at_quantile(scores: np.ndarray, quantile: float) -> float:
    """The score at `quantile` of good parts (the 'higher' value, so at most 1 - quantile of them reach it)."""
    if len(scores) == 0:
        raise ValueError("no good images were scored")
    if not 0.5 <= quantile < 1.0:
        raise ValueError(f"quantile must be in [0.5, 1), got {quantile}")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), quantile, method="higher"))


def images_to_resolve(quantile: float) -> int:
    """Good images needed before `quantile` is measured rather than guessed: 1 / (1 - q) (200 for 0.995)."""
    return math.ceil(round(1.0 / (1.0 - quantile), 6))


def resolvable_quantile(images: int) -> float:
    """The highest quantile `images` good scores can resolve: 1 - 1/n (0.958 for 24)."""
    return 1.0 - 1.0 / images if images > 0 else 0.0


def threshold_from_good(scores: np.ndarray, quantile: float, margin: float) -> tuple[float, str]:
    """The threshold for good parts' `scores`, and the rule that set it.

    With enough images (`images_to_resolve`), the `quantile` of the scores ("quantile"). With fewer,
    the quantile would only be the maximum, which the next good part beats about 1/(n+1) of the time,
    so the threshold is put above it: max + margin x (max - median) ("max+margin").
    """
    values = np.asarray(scores, dtype=np.float64)
    threshold = threshold_at_quantile(values, quantile)
    if len(values) >= images_to_resolve(quantile):
        return threshold, "quantile"
    top, middle = float(values.max()), float(np.median(values))
    return top + margin * (top - middle), "max+margin"


@dataclass(frozen=True)
class CalibrationSettings:
    """What a calibration depends on besides the prompts: the model, the numbers that make the score, the
    towers' precision and the class word. A calibration holds while these equal the running engine's.

    Not `model.genclip.ScoringSettings` (the four numbers the scoring path computes with); these are what a
    threshold measured once was measured under. Stored in a profile as a JSON object of these keys.
    """

    backbone: str
    weights: str
    image_size: int
    layers: tuple[int, ...]
    vv_from_layer: int | None
    branch_weight: float
    score_alpha: float
    blur_sigma: float
    temperature: float
    precision: str
    class_word: str
    memory: str | None = None  # the class's patch memory and fusion (`ClassMemory.describe`); None: zero-shot
    # Only for settings read from a profile file unlike the engine's (hand-edited, or another version):
    extra: tuple[tuple[str, Any], ...] = ()  # keys the file holds beyond these
    missing: tuple[str, ...] = ()  # keys the file lacks (their fields hold None and are not written back)

    def for_word(self, class_word: str) -> CalibrationSettings:
        return replace(self, class_word=class_word)

    def with_memory(self, memory: str | None) -> CalibrationSettings:
        return replace(self, memory=memory)

    def as_dict(self) -> dict[str, Any]:
        """The JSON object a profile stores (layers a list, keys in this order, as read from a file); `memory`
        only when a memory is fused, so a zero-shot calibration reads as it did before memories existed."""
        data = {
            name: getattr(self, name)
            for name in self._keys()
            if name not in self.missing and not (name == "memory" and self.memory is None)
        }
        if "layers" in data:
            data["layers"] = list(self.layers)
        return {**data, **dict(self.extra)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationSettings:
        """From a profile's JSON object, values as they are (compared as recorded, never converted)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"calibration settings are a JSON {type(data).__name__}, not an object")
        names = cls._keys()
        values: dict[str, Any] = {name: data.get(name) for name in names}
        if isinstance(values["layers"], list):
            values["layers"] = tuple(values["layers"])
        extra = tuple((k, v) for k, v in data.items() if k not in values)
        absent = tuple(name for name in names if name not in data and name != "memory")  # memory: optional
        return cls(**values, extra=extra, missing=absent)

    @classmethod
    def _keys(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.name not in ("extra", "missing")]

    def changed_from(self, other: CalibrationSettings) -> list[str]:
        """The keys whose values differ, sorted; a key only one side has counts as None on the other."""
        mine, theirs = self.as_dict(), other.as_dict()
        return sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))


@dataclass(frozen=True)
class Calibration:
    """A threshold measured on good parts, with everything it depends on."""

    threshold: float
    quantile: float
    images: int
    score_min: float
    score_median: float
    score_p95: float
    score_max: float
    prompt_version: str
    prompt_digest: str
    settings: CalibrationSettings  # the running engine's when measured
    measured_at: str = field(default_factory=now_iso)
    rule: str = "quantile"  # "quantile" or "max+margin" (too few images to resolve the quantile)
    margin: float = 0.0
    false_reject_rate: float | None = None  # share of the calibration images the threshold rejects

    @classmethod
    def from_scores(
        cls,
        scores: np.ndarray,
        quantile: float,
        prompt_version: str,
        prompt_digest: str,
        settings: CalibrationSettings,
        margin: float = 0.0,
    ) -> Calibration:
        values = np.asarray(scores, dtype=np.float64)
        threshold, rule = threshold_from_good(values, quantile, margin)
        return cls(
            threshold=threshold,
            quantile=quantile,
            images=len(values),
            score_min=float(values.min()),
            score_median=float(np.median(values)),
            score_p95=float(np.quantile(values, 0.95)),
            score_max=float(values.max()),
            prompt_version=prompt_version,
            prompt_digest=prompt_digest,
            settings=settings,
            rule=rule,
            margin=margin if rule == "max+margin" else 0.0,
            false_reject_rate=float(np.mean(values >= threshold)),
        )

    @property
    def images_needed(self) -> int:
        """Good images the quantile needs to be measured (`images_to_resolve`)."""
        return images_to_resolve(self.quantile)

    def describe(self) -> str:
        """One line for people: images, distribution, the rule, and what it rejects of them."""
        spread = (
            f"{self.images} good image(s): min {self.score_min:.4f}, median {self.score_median:.4f}, "
            f"p95 {self.score_p95:.4f}, max {self.score_max:.4f}"
        )
        if self.rule == "quantile":
            how = f"threshold {self.threshold:.4f} at quantile {self.quantile}"
        else:
            how = (
                f"quantile {self.quantile} needs {self.images_needed} images, {self.images} resolve at most "
                f"{resolvable_quantile(self.images):.3f}: threshold {self.threshold:.4f} = max + "
                f"{self.margin:g} x (max - median)"
            )
        rate = "" if self.false_reject_rate is None else f"; rejects {self.false_reject_rate:.1%} of these images"
        return f"{spread}; {how}{rate}"

    def stale_because(self, prompt_digest: str, settings: CalibrationSettings) -> str | None:
        """Why this calibration does not hold for the running engine, or None when it does."""
        if self.prompt_digest != prompt_digest:
            return f"measured on prompts {self.prompt_version}, running other prompts"
        changed = self.settings.changed_from(settings)
        if changed:
            return "scoring settings changed since calibration: " + ", ".join(changed)
        return None

    def as_dict(self) -> dict[str, Any]:
        """The JSON object a profile stores."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"settings": self.settings.as_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        return cls(**{**data, "settings": CalibrationSettings.from_dict(data["settings"])})


@dataclass(frozen=True)
class ClassProfile:
    """Everything decided about one product class; immutable, replaced as a whole."""

    product_class: str
    class_word: str
    class_word_source: ClassWordSource
    backbone: str
    weights: str
    defect_types: tuple[str, ...]
    cnf: dict[str, Any] | None = None
    reference_images: int = 0
    reference_digest: str | None = None
    calibration: Calibration | None = None
    updated_at: str = field(default_factory=now_iso)

    def with_calibration(self, calibration: Calibration | None) -> ClassProfile:
        return replace(self, calibration=calibration, updated_at=now_iso())

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["defect_types"] = list(self.defect_types)
        data["calibration"] = self.calibration.as_dict() if self.calibration is not None else None
        if data["cnf"] is not None:
            data["cnf"] = _json_safe(data["cnf"])
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **data}

    def save(self, path: Path) -> Path:
        """Write atomically (temporary file, then rename), readable by the service user; a different
        profile already there is first copied to `history/<class>/` (see `archive_profile`)."""
        from model.checkpoint import write_atomic

        path = Path(path)
        text = json.dumps(self.as_dict(), indent=2, allow_nan=False) + "\n"
        try:
            previous = path.read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            previous = None
        if previous is not None and previous != text:
            archive_profile(path)
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), mode=0o644)
        return path

    @classmethod
    def load(cls, path: Path) -> ClassProfile:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ProfileError(f"{path}: no such profile file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProfileError(f"{path}: not a readable JSON profile ({exc})") from None
        if not isinstance(data, dict):
            raise ProfileError(f"{path}: not a GenCLIP class profile (a JSON {type(data).__name__}, not an object)")
        if data.get("format") != FORMAT:
            raise ProfileError(f"{path}: not a GenCLIP class profile (format {data.get('format')!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise ProfileError(f"{path}: profile format version {data.get('format_version')} is not supported")
        try:
            calibration = data.get("calibration")
            return cls(
                product_class=str(data["product_class"]),
                class_word=str(data["class_word"]),
                class_word_source=data["class_word_source"],
                backbone=str(data["backbone"]),
                weights=str(data["weights"]),
                defect_types=tuple(str(w) for w in data["defect_types"]),
                cnf=data.get("cnf"),
                reference_images=int(data.get("reference_images", 0)),
                reference_digest=data.get("reference_digest"),
                calibration=Calibration.from_dict(calibration) if calibration else None,
                updated_at=str(data.get("updated_at", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"{path}: profile field missing or of the wrong type ({exc})") from None


HISTORY_KEEP = 50
"""Earlier profiles kept per class in `<profile_dir>/history/<class>/`, newest last."""


def archive_profile(path: Path) -> Path:
    """Copy a profile file into `history/<stem>/<UTC time>.json` beside it, keeping the newest HISTORY_KEEP."""
    folder = Path(path).parent / "history" / Path(path).stem
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}.json"
    shutil.copy2(path, target)
    for old in sorted(folder.glob("*.json"))[:-HISTORY_KEEP]:
        old.unlink(missing_ok=True)
    return target


def profile_history(directory: Path, product_class: str) -> list[Path]:
    """The archived profiles of a class, oldest first."""
    folder = Path(directory) / "history" / profile_path(directory, product_class).stem
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


def profile_path(directory: Path, product_class: str) -> Path:
    """`<dir>/<class>.json`, with characters unsafe in file names replaced."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in product_class).strip(".") or "_"
    return Path(directory) / f"{safe}.json"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
