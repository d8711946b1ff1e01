"""Product classes: how each one is set up, which class word its prompts use, and which threshold wins.

`ClassRegistry` (the engine's `engine.classes`) owns everything per class:

- set-up: `register` (a profile, reference frames or neither) and `setup` (the same with the line's
  profile from [model].profile_dir, saved back there when decided or calibrated anew);
- the class word: configured, decided by Class Name Filtering on reference frames (`model/cnf.py`),
  or the plain name; refused when its prompts would not fit CLIP's context;
- calibration: a threshold measured on good parts (`calibrate`, or at set-up), measured again on new
  prompts for classes registered with a reference loader (`rebuilt_for`, called by the prompt swap);
- profiles written while the engine runs (`genclip calibrate --profiles`): `reload_profiles` re-reads
  every registered class's profile from [model].profile_dir and installs those that changed;
- the threshold a frame is judged with, decided in one place, `decide_threshold`: an override
  ([thresholds] in the config or an operator's command) > a calibration that holds > the default
  threshold (reported "stale-calibration" when a calibration no longer holds, "default" without one).

Threading: the device thread sets classes up and calibrates (they score frames); `set_thresholds`
may run on any thread. Every change builds a new `Snapshot` under the cell's write lock and publishes
it with one reference assignment (`model/state.py`): a batch in flight keeps its own. The registry
scores frames only through a `ClassScorer` (the engine's device side), never through the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np
import structlog
import torch

from model.cnf import TEMPLATE, CnfDecision, decide
from model.config import EngineConfig, normalise_class_name
from model.digests import sha256_frames
from model.genclip import GenClip
from model.preprocess import check_frame
from model.profile import (
    Calibration,
    CalibrationSettings,
    ClassProfile,
    ClassWordSource,
    ProfileError,
    profile_path,
)
from model.state import ClassEntry, ClassText, PromptState, Snapshot, SnapshotCell, Threshold

log = structlog.stdlib.get_logger("model.engine")
References = Sequence[np.ndarray] | Callable[[], Sequence[np.ndarray]]


class ClassSetupError(ValueError):
    """A product class cannot be set up as asked (too few reference images, a word CLIP cannot fit...)."""


class ClassScorer(Protocol):
    """What the registry needs of the device: class texts, CLIP embeddings and the scores of good parts."""

    def class_text(self, model: GenClip, profile: ClassProfile) -> ClassText:
        """The suffix and defect-type text features of a class under `model`'s prompts."""
        ...

    def image_embeddings(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """CLIP's own normalised image embeddings [N, D] (frozen tower, no prompts)."""
        ...

    def text_embeddings(self, model: GenClip, texts: Sequence[str]) -> torch.Tensor:
        """CLIP's own text embeddings [N, D] of plain sentences."""
        ...

    def good_scores(self, prompts: PromptState, text: ClassText, frames: Sequence[np.ndarray]) -> np.ndarray:
        """The image scores [N] of `frames` of one class, as a batch would score them."""
        ...


@dataclass(frozen=True)
class CalibrationStatus:
    """The calibration a class status reports."""

    threshold: float
    quantile: float
    images: int
    prompt_version: str
    # the good parts' score distribution it was measured on, and the share of them the threshold rejects
    score_min: float | None = None
    score_median: float | None = None
    score_p95: float | None = None
    score_max: float | None = None
    false_reject_rate: float | None = None
    rule: str = "quantile"

    @classmethod
    def of(cls, c: Calibration) -> CalibrationStatus:
        return cls(
            c.threshold,
            c.quantile,
            c.images,
            c.prompt_version,
            c.score_min,
            c.score_median,
            c.score_p95,
            c.score_max,
            c.false_reject_rate,
            c.rule,
        )


@dataclass(frozen=True)
class ProfileChange:
    """A class profile re-read from [model].profile_dir: the threshold before and after, or why it was refused."""

    product_class: str
    before: Threshold
    after: Threshold
    refused: str | None = None  # the profile on disk is unusable: the running one stays

    def as_dict(self) -> dict[str, Any]:
        """The JSON object the agent's reload answer and log carry."""
        if self.refused is not None:
            return {"product_class": self.product_class, "refused": self.refused}
        return {
            "product_class": self.product_class,
            "threshold": {"before": self.before.value, "after": self.after.value},
            "threshold_source": {"before": self.before.source, "after": self.after.source},
        }


@dataclass(frozen=True)
class ClassStatus:
    """What the engine knows about a product class: class word and why, vocabulary, threshold and why.

    For a class that is not registered only `product_class`, `threshold` and `threshold_source` mean
    anything (the threshold it would get: an override or the default).
    """

    product_class: str
    registered: bool
    threshold: float
    threshold_source: str
    class_word: str | None = None
    class_word_source: ClassWordSource | None = None
    cnf: Mapping[str, Any] | None = None  # the CNF decision as its profile's JSON holds it
    defect_types: tuple[str, ...] = ()
    stale_reason: str | None = None
    calibration: CalibrationStatus | None = None

    def as_dict(self) -> dict[str, Any]:
        """The JSON object logs and the agent publish (an unregistered class: its four keys only)."""
        head = {"product_class": self.product_class, "registered": self.registered}
        threshold = {"threshold": self.threshold, "threshold_source": self.threshold_source}
        if not self.registered:
            return {**head, **threshold}
        calibration = self.calibration
        return {
            **head,
            "class_word": self.class_word,
            "class_word_source": self.class_word_source,
            "cnf": self.cnf,
            "defect_types": list(self.defect_types),
            **threshold,
            "stale_reason": self.stale_reason,
            "calibration": None if calibration is None else asdict(calibration),
        }


def decide_threshold(
    profile: ClassProfile,
    overrides: Mapping[str, Threshold],
    prompt_digest: str,
    settings: CalibrationSettings,
    default: float,
) -> tuple[Threshold, str | None]:
    """The threshold a class is judged with, and why its calibration does not hold (None when it does or
    there is none): an override > a calibration measured on these prompts and settings > `default`."""
    override = overrides.get(profile.product_class)
    if override is not None:
        return override, None
    calibration = profile.calibration
    if calibration is None:
        return Threshold(default, "default"), None
    stale = calibration.stale_because(prompt_digest, settings)
    if stale is None:
        return Threshold(calibration.threshold, "calibration"), None
    return Threshold(default, "stale-calibration"), stale


class ClassRegistry:
    """The product classes of one engine; see the module docstring."""

    def __init__(
        self, config: EngineConfig, cell: SnapshotCell, scorer: ClassScorer, settings: CalibrationSettings
    ) -> None:
        self.config = config
        self.scorer = scorer
        self._cell = cell
        self._settings = settings  # the engine's; class_word set per class
        self._saving: set[str] = set()  # classes whose profile is saved back to [model].profile_dir
        self._references: dict[str, Callable[[], Sequence[np.ndarray]]] = {}
        self._stale_logged: set[tuple[str, str]] = set()

    # --- reading ---------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """The registered classes, sorted."""
        return sorted(self._cell.current.classes)

    def profile(self, product_class: str) -> ClassProfile | None:
        entry = self._cell.current.classes.get(normalise_class_name(product_class))
        return entry.profile if entry else None

    def threshold(self, product_class: str) -> Threshold:
        """The threshold a frame of this class would be judged with now, and where it comes from."""
        name = normalise_class_name(product_class)
        snap = self._cell.current
        entry = snap.classes.get(name)
        if entry is not None:
            return Threshold(entry.threshold, entry.threshold_source)
        if name in snap.overrides:
            return snap.overrides[name]
        return Threshold(self.config.default_threshold, "default")

    def status(self, product_class: str) -> ClassStatus:
        """What the engine knows about a product class (`ClassStatus.as_dict()` for its JSON)."""
        name = normalise_class_name(product_class)
        entry = self._cell.current.classes.get(name)
        value, source = self.threshold(name)
        if entry is None:
            return ClassStatus(name, False, value, source)
        p, c = entry.profile, entry.profile.calibration
        return ClassStatus(
            product_class=name,
            registered=True,
            threshold=value,
            threshold_source=source,
            class_word=p.class_word,
            class_word_source=p.class_word_source,
            cnf=p.cnf,
            defect_types=p.defect_types,
            stale_reason=entry.stale_reason,
            calibration=None if c is None else CalibrationStatus.of(c),
        )

    def calibration_settings(self, class_word: str) -> CalibrationSettings:
        """What a calibration of a class with this word depends on besides the prompts."""
        return self._settings.for_word(class_word)

    # --- thresholds ------------------------------------------------------------------------------------
    def set_thresholds(self, thresholds: Mapping[str, float], sources: Mapping[str, str] | None = None) -> None:
        """Per-class thresholds that win over calibrations; any thread. Their source is "config" unless
        `sources` says otherwise for a class (the agent: "command", set by an operator over MQTT)."""
        given = {normalise_class_name(k): v for k, v in (sources or {}).items()}
        overrides = MappingProxyType(
            {(n := normalise_class_name(k)): Threshold(float(v), given.get(n, "config")) for k, v in thresholds.items()}
        )
        with self._cell.write_lock:
            old = self._cell.current
            classes = {name: self._entry(old.prompts, e.profile, e.text, overrides) for name, e in old.classes.items()}
            self._cell.publish(Snapshot(old.prompts, MappingProxyType(classes), overrides))

    def _entry(
        self, prompts: PromptState, profile: ClassProfile, text: ClassText, overrides: Mapping[str, Threshold]
    ) -> ClassEntry:
        settings = self.calibration_settings(profile.class_word)
        default = self.config.default_threshold
        (value, source), stale = decide_threshold(profile, overrides, prompts.digest, settings, default)
        name = profile.product_class
        if stale is not None and (name, prompts.digest) not in self._stale_logged:
            self._stale_logged.add((name, prompts.digest))
            log.warning(
                "calibration does not hold; using the default threshold",
                product_class=name,
                reason=stale,
                default_threshold=default,
            )
        return ClassEntry(profile, text, value, source, stale)

    def _publish_class(self, old: Snapshot, profile: ClassProfile, text: ClassText) -> None:
        """With the write lock held: `old` with this class's entry (re)placed."""
        entry = self._entry(old.prompts, profile, text, old.overrides)
        classes = {**old.classes, profile.product_class: entry}
        self._cell.publish(Snapshot(old.prompts, MappingProxyType(classes), old.overrides))

    # --- set-up ----------------------------------------------------------------------------------------
    def register(
        self,
        product_class: str,
        references: References = (),
        *,
        profile: ClassProfile | None = None,
        calibrate: bool | None = None,
    ) -> ClassProfile:
        """Set a product class up for scoring (device thread); returns its profile.

        - `profile`: a saved profile; its class word is kept when made for this backbone and weights.
        - `references`: frames of good parts (or a function that reads them): they decide the class word
          by CNF when no profile or configured word does (at least `min_reference_images`), and calibrate
          the threshold when `calibrate` (default: when references are given). A loader is kept, so
          a prompt swap recalibrates the class on the new prompts.
        - neither: the plain class name, reported as class_word_source "unfiltered".
        Raises ClassSetupError (or InvalidFrameError for a bad reference frame) naming the problem.
        """
        name = normalise_class_name(product_class)
        loader = references if callable(references) else None
        given = references() if callable(references) else references
        frames = [check_frame(f, i) for i, f in enumerate(given)]
        if frames and len(frames) < self.config.min_reference_images:
            raise ClassSetupError(
                f"class '{name}': {len(frames)} reference image(s) of good parts are too few to decide its class "
                f"word or threshold; give at least {self.config.min_reference_images} "
                f"([model].min_reference_images)"
            )
        new = self._profile_for(name, frames, profile)
        self._check_fits_context(self._cell.current.prompts.model, new.class_word, new.defect_types)
        with self._cell.write_lock:
            old = self._cell.current
            text = self.scorer.class_text(old.prompts.model, new)
            if loader is not None:
                self._references[name] = loader
            if (calibrate if calibrate is not None else bool(frames)) and frames:
                new = self._calibrated(old.prompts, new, text, frames, self._quantile(new))
            self._publish_class(old, new, text)
        return new

    def _profile_for(self, name: str, frames: list[np.ndarray], profile: ClassProfile | None) -> ClassProfile:
        """`profile` kept (this class's vocabulary) when made for these CLIP weights, else decided anew."""
        defect_types = tuple(self.config.defect_vocabulary(name))
        backbone, weights = self._settings.backbone, self._settings.weights
        usable = profile is not None and (profile.backbone, profile.weights) == (backbone, weights)
        if profile is not None and not usable:
            log.warning("profile made for other CLIP weights; deciding the class word again", product_class=name)
        if profile is not None and usable and name not in self.config.class_words:
            return replace(profile, product_class=name, defect_types=defect_types)
        word, source, decision = self._decide_word(name, frames)
        log.info("class word decided", product_class=name, class_word=word, source=source)
        return ClassProfile(
            product_class=name,
            class_word=word,
            class_word_source=source,
            backbone=backbone,
            weights=weights,
            defect_types=defect_types,
            cnf=decision.as_dict() if decision else None,
            reference_images=len(frames),
            reference_digest=sha256_frames(frames) if frames else None,
            calibration=profile.calibration if profile is not None else None,
        )

    def setup(self, product_class: str, references: References = (), *, save: bool = True) -> ClassProfile:
        """`register` with the line's profile from [model].profile_dir when there is one; a profile
        decided or calibrated anew is saved back there, so a restart scores identically."""
        name = normalise_class_name(product_class)
        directory = self.config.profile_dir
        saved: ClassProfile | None = None
        if directory is not None and profile_path(directory, name).is_file():
            try:
                saved = ClassProfile.load(profile_path(directory, name))
            except ProfileError as exc:
                log.warning("class profile unusable; setting the class up again", product_class=name, error=str(exc))
        profile = self.register(name, references, profile=saved)
        if save and directory is not None:
            self._saving.add(name)
            if profile != saved:
                self.save(profile)
        return profile

    def reload_profiles(self) -> list[ProfileChange]:
        """Re-read every registered class's profile from [model].profile_dir (device thread) and install each
        that differs from the running one (class word, calibration ...); the changes, and the profiles refused
        (unreadable, or made for other CLIP weights: the running profile stays). Nothing is calibrated here."""
        directory = self.config.profile_dir
        changes: list[ProfileChange] = []
        for name in self.names() if directory is not None else []:
            assert directory is not None
            path = profile_path(directory, name)
            current = self.profile(name)
            if current is None or not path.is_file():
                continue
            before = self.threshold(name)
            try:
                saved = ClassProfile.load(path)
                if (saved.backbone, saved.weights) != (self._settings.backbone, self._settings.weights):
                    raise ProfileError(f"{path}: made for {saved.backbone} {saved.weights}, not the running weights")
                new = self._profile_for(name, [], saved)
                self._check_fits_context(self._cell.current.prompts.model, new.class_word, new.defect_types)
            except (ProfileError, ClassSetupError) as exc:
                log.warning("class profile not reloaded; the running one stays", product_class=name, error=str(exc))
                changes.append(ProfileChange(name, before, before, refused=str(exc)))
                continue
            if new.as_dict() == current.as_dict():
                continue
            with self._cell.write_lock:
                old = self._cell.current
                self._publish_class(old, new, self.scorer.class_text(old.prompts.model, new))
            changes.append(ProfileChange(name, before, self.threshold(name)))
        return changes

    def save(self, profile: ClassProfile) -> None:
        """Into [model].profile_dir, for classes set up from there with saving on (the agent's)."""
        name, directory = profile.product_class, self.config.profile_dir
        if directory is None or name not in self._saving:
            return
        try:
            profile.save(profile_path(directory, name))
        except OSError as exc:
            log.warning("cannot save class profile", product_class=name, error=str(exc))

    def _check_fits_context(self, model: GenClip, word: str, defect_names: Sequence[str]) -> None:
        """Refuse a class word (with the defect names) that would not fit CLIP's context."""
        shape = model.shape
        longest = max([len(model.text.word_ids(f"{d} {word}.")) for d in defect_names], default=0)
        need = max(
            1 + shape.query_tokens + shape.state_tokens + len(model.text.word_ids(f"{word}.")) + 1,
            1 + shape.defect_tokens + shape.state_tokens + longest + 1,
        )
        if need > model.text.context_length:
            raise ClassSetupError(
                f"class word '{word}' is too long: its prompts need {need} tokens, "
                f"CLIP's context holds {model.text.context_length}"
            )

    def _decide_word(self, name: str, frames: Sequence[np.ndarray]) -> tuple[str, ClassWordSource, CnfDecision | None]:
        """The class word and its source: configured, CNF on reference frames, or the plain name."""
        cfg = self.config
        configured = cfg.class_words.get(name)
        if configured:
            return configured, "config", None
        if not cfg.cnf:
            return name, "cnf-off", None
        generic = cfg.cnf_generic_names
        if name.lower() in {g.lower() for g in generic}:
            return name, "generic", None
        if not frames:
            return name, "unfiltered", None
        embeddings = self.scorer.image_embeddings(frames)
        model = self._cell.current.prompts.model
        texts = self.scorer.text_embeddings(model, [TEMPLATE.format(n) for n in [name, *generic]])
        decision = decide(name, embeddings, texts[0], texts[1:], list(generic), cfg.cnf_margin)
        return decision.used_name, "cnf", decision

    # --- calibration -----------------------------------------------------------------------------------
    def calibrate(self, product_class: str, frames: Sequence[np.ndarray], quantile: float) -> ClassProfile:
        """Measure a registered class's threshold on good parts with the running prompts (device thread)."""
        name = normalise_class_name(product_class)
        checked = [check_frame(f, i) for i, f in enumerate(frames)]
        if not checked:
            raise ClassSetupError(f"class '{name}': no good images to calibrate on")
        with self._cell.write_lock:
            old = self._cell.current
            entry = old.classes.get(name)
            if entry is None:
                raise ClassSetupError(f"class '{name}' is not registered")
            profile = self._calibrated(old.prompts, entry.profile, entry.text, checked, quantile)
            self._publish_class(old, profile, entry.text)
        return profile

    def _quantile(self, profile: ClassProfile) -> float:
        return profile.calibration.quantile if profile.calibration else self.config.calibration_quantile

    def _calibrated(
        self, prompts: PromptState, profile: ClassProfile, text: ClassText, frames: Sequence[np.ndarray], q: float
    ) -> ClassProfile:
        calibration = Calibration.from_scores(
            self.scorer.good_scores(prompts, text, frames),
            q,
            prompts.version,
            prompts.digest,
            self.calibration_settings(profile.class_word),
            margin=self.config.calibration_margin,
        )
        log.info(
            "class calibrated",
            product_class=profile.product_class,
            threshold=round(calibration.threshold, 6),
            images=calibration.images,
            rule=calibration.rule,
            prompt_version=prompts.version,
        )
        return profile.with_calibration(calibration)

    def _recalibrate(self, prompts: PromptState, name: str, profile: ClassProfile, text: ClassText) -> ClassProfile:
        try:
            frames = [check_frame(f, i) for i, f in enumerate(self._references[name]())]
        except Exception as exc:  # a reference folder that went away must not block a prompt swap
            log.warning("reference images unreadable; calibration will be stale", product_class=name, error=str(exc))
            return profile
        if not frames:
            return profile
        return self._calibrated(prompts, profile, text, frames, self._quantile(profile))

    # --- a prompt swap ---------------------------------------------------------------------------------
    def rebuilt_for(self, prompts: PromptState, old: Snapshot) -> tuple[Mapping[str, ClassEntry], list[ClassProfile]]:
        """With the write lock held, for a swap to `prompts`: every class of `old` with its text rebuilt and,
        where it has a reference loader and a calibration, recalibrated; and the recalibrated profiles
        (for `save` once the swap is published, so history/ keeps the previous calibration)."""
        classes, recalibrated = {}, []
        for name, entry in old.classes.items():
            text = self.scorer.class_text(prompts.model, entry.profile)
            profile = entry.profile
            if profile.calibration is not None and name in self._references:
                profile = self._recalibrate(prompts, name, profile, text)
                recalibrated.append(profile)
            classes[name] = self._entry(prompts, profile, text, old.overrides)
        return MappingProxyType(classes), recalibrated

    def any_text(self) -> ClassText:
        """A registered class's text on the running prompts, or a placeholder class's (for warm-up)."""
        snap = self._cell.current
        entry = next(iter(snap.classes.values()), None)
        if entry is not None:
            return entry.text
        settings = self._settings
        placeholder = ClassProfile(
            "object", "object", "generic", settings.backbone, settings.weights, tuple(self.config.defect_types)
        )
        return self.scorer.class_text(snap.prompts.model, placeholder)
