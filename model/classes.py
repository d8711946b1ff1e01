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
  threshold (reported "stale-calibration" when a calibration no longer holds, "default" without one);
- the patch memory of classes with `memory_weight_for(class) > 0` (`model/memory.py`): built from the
  reference frames at set-up (or read from `<class>.memory.safetensors` beside the profile when built
  from the same references), its fusion statistics measured leave-one-out on them, the threshold
  calibrated on the fused score (each reference leaves itself out of the memory); grown from parts
  confirmed good (`grow_memory`); re-read with the profiles, a memory file that does not fit refused
  (the running one stays).

Threading: the device thread sets classes up and calibrates (they score frames); `set_thresholds`
may run on any thread. Every change builds a new `Snapshot` under the cell's write lock and publishes
it with one reference assignment (`model/state.py`): a batch in flight keeps its own. The registry
scores frames only through a `ClassScorer` (the engine's device side), never through the engine.
"""

from __future__ import annotations

import time
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
from model.memory import (
    BranchStats,
    ClassMemory,
    MemoryFileError,
    MemoryIdentity,
    MemoryStats,
    PatchMemory,
    add_images,
    build_memory,
    load_memory,
    memory_path,
    save_memory,
)
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

    def good_scores(
        self,
        prompts: PromptState,
        text: ClassText,
        frames: Sequence[np.ndarray],
        memory: ClassMemory | None = None,
        exclude: Sequence[int] | None = None,
    ) -> np.ndarray:
        """The image scores [N] of `frames` of one class, as a batch would score them (fused with `memory`,
        frame i leaving memory image `exclude[i]` out)."""
        ...

    def patch_features(self, model: GenClip, frames: Sequence[np.ndarray], kind: str) -> torch.Tensor:
        """Normalised patch features [N, L, HW, C] a memory keeps ("tokens", or "adapted" by `model`)."""
        ...

    def branch_maps(
        self,
        prompts: PromptState,
        text: ClassText,
        frames: Sequence[np.ndarray],
        memory: ClassMemory,
        exclude: Sequence[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-shot and few-shot patch-grid maps [N, HW] of `frames`, frame i leaving memory image i out."""
        ...

    @property
    def device(self) -> torch.device:
        """Where memories live."""
        ...


@dataclass(frozen=True)
class MemoryStatus:
    """A class's patch memory as status and info report it."""

    weight: float
    fusion: str
    features: str
    images: int
    confirmed: int
    patches: int
    bytes: int
    built_at: str
    updated_at: str


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
    memory: MemoryStatus | None = None
    memory_error: str | None = None  # why a class with a memory weight has no memory

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
            "memory": None if self.memory is None else asdict(self.memory),
            "memory_error": self.memory_error,
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
        self,
        config: EngineConfig,
        cell: SnapshotCell,
        scorer: ClassScorer,
        settings: CalibrationSettings,
        memory_identity: Callable[[PromptState], MemoryIdentity],
    ) -> None:
        self.config = config
        self.scorer = scorer
        self._cell = cell
        self._settings = settings  # the engine's; class_word set per class
        self._memory_identity = memory_identity  # what a memory built on these prompts is
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
        p, c, m = entry.profile, entry.profile.calibration, entry.memory
        memory = None
        if m is not None:
            kept = m.memory
            memory = MemoryStatus(
                m.weight,
                m.fusion,
                kept.identity.features,
                kept.images,
                kept.confirmed,
                kept.patches,
                kept.nbytes,
                kept.built_at,
                kept.updated_at,
            )
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
            memory=memory,
            memory_error=entry.memory_error,
        )

    def calibration_settings(self, class_word: str, memory: ClassMemory | None = None) -> CalibrationSettings:
        """What a calibration of a class with this word (and memory) depends on besides the prompts."""
        return self._settings.for_word(class_word).with_memory(memory.describe() if memory else None)

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
            classes = {
                name: self._entry(old.prompts, e.profile, e.text, overrides, e.memory, e.memory_error)
                for name, e in old.classes.items()
            }
            self._cell.publish(Snapshot(old.prompts, MappingProxyType(classes), overrides))

    def _entry(
        self,
        prompts: PromptState,
        profile: ClassProfile,
        text: ClassText,
        overrides: Mapping[str, Threshold],
        memory: ClassMemory | None = None,
        memory_error: str | None = None,
    ) -> ClassEntry:
        settings = self.calibration_settings(profile.class_word, memory)
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
        return ClassEntry(profile, text, value, source, stale, memory, memory_error)

    def _publish_class(
        self,
        old: Snapshot,
        profile: ClassProfile,
        text: ClassText,
        memory: ClassMemory | None = None,
        memory_error: str | None = None,
    ) -> None:
        """With the write lock held: `old` with this class's entry (re)placed."""
        entry = self._entry(old.prompts, profile, text, old.overrides, memory, memory_error)
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
        memory: PatchMemory | None = None,
        memory_error: str | None = None,
    ) -> ClassProfile:
        """Set a product class up for scoring (device thread); returns its profile.

        - `profile`: a saved profile; its class word is kept when made for this backbone and weights.
        - `references`: frames of good parts (or a function that reads them): they decide the class word
          by CNF when no profile or configured word does (at least `min_reference_images`), and calibrate
          the threshold when `calibrate` (default: when references are given). A loader is kept, so
          a prompt swap recalibrates the class on the new prompts.
        - neither: the plain class name, reported as class_word_source "unfiltered".
        - with `memory_weight_for(class) > 0`: the patch memory, built from `references` (or `memory`, a saved
          one, when built from the same references or when none are given; `memory_error`: why a saved one
          was refused), and the calibration is on the fused score.
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
            use, why = self._memory_for(old.prompts, text, name, frames, memory, memory_error)
            if (calibrate if calibrate is not None else bool(frames)) and frames:
                new = self._calibrated(old.prompts, new, text, frames, self._quantile(new), use)
            self._publish_class(old, new, text, use, why)
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
        memory, memory_error = self._saved_memory(name)
        profile = self.register(name, references, profile=saved, memory=memory, memory_error=memory_error)
        if save and directory is not None:
            self._saving.add(name)
            if profile != saved:
                self.save(profile)
            entry = self._cell.current.classes.get(name)
            if entry is not None and entry.memory is not None and entry.memory.memory is not memory:
                self.save_memory(name)
        return profile

    def _saved_memory(self, name: str) -> tuple[PatchMemory | None, str | None]:
        """The class's memory file in [model].profile_dir when its memory is used: the memory, or why it is refused."""
        directory = self.config.profile_dir
        if directory is None or self.config.memory_weight_for(name) <= 0:
            return None, None
        path = memory_path(profile_path(directory, name))
        if not path.is_file():
            return None, None
        try:
            return load_memory(path, self._memory_identity(self._cell.current.prompts), self.scorer.device), None
        except MemoryFileError as exc:
            log.warning("patch memory refused", product_class=name, error=str(exc))
            return None, str(exc)

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
            running = self._cell.current.classes[name].memory
            try:
                saved = ClassProfile.load(path)
                if (saved.backbone, saved.weights) != (self._settings.backbone, self._settings.weights):
                    raise ProfileError(f"{path}: made for {saved.backbone} {saved.weights}, not the running weights")
                new = self._profile_for(name, [], saved)
                self._check_fits_context(self._cell.current.prompts.model, new.class_word, new.defect_types)
                memory, memory_error = self._saved_memory(name)
                if memory_error is not None:
                    raise MemoryFileError(memory_error)
            except (ProfileError, ClassSetupError, MemoryFileError) as exc:
                log.warning("class profile not reloaded; the running one stays", product_class=name, error=str(exc))
                changes.append(ProfileChange(name, before, before, refused=str(exc)))
                continue
            use = running
            if memory is not None and (running is None or memory.digest != running.memory.digest):
                use = ClassMemory(memory, self.config.memory_weight_for(name), self.config.memory_fusion)
            if new.as_dict() == current.as_dict() and use is running:
                continue
            with self._cell.write_lock:
                old = self._cell.current
                why = old.classes[name].memory_error if use is None else None
                self._publish_class(old, new, self.scorer.class_text(old.prompts.model, new), use, why)
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

    def save_memory(self, product_class: str) -> None:
        """The class's patch memory beside its profile, for classes saved there (as `save`)."""
        name, directory = normalise_class_name(product_class), self.config.profile_dir
        entry = self._cell.current.classes.get(name)
        if directory is None or name not in self._saving or entry is None or entry.memory is None:
            return
        try:
            save_memory(memory_path(profile_path(directory, name)), entry.memory.memory)
        except OSError as exc:
            log.warning("cannot save patch memory", product_class=name, error=str(exc))

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
            profile = self._calibrated(old.prompts, entry.profile, entry.text, checked, quantile, entry.memory)
            self._publish_class(old, profile, entry.text, entry.memory, entry.memory_error)
        return profile

    def _quantile(self, profile: ClassProfile) -> float:
        return profile.calibration.quantile if profile.calibration else self.config.calibration_quantile

    def _calibrated(
        self,
        prompts: PromptState,
        profile: ClassProfile,
        text: ClassText,
        frames: Sequence[np.ndarray],
        q: float,
        memory: ClassMemory | None = None,
    ) -> ClassProfile:
        """`profile` calibrated on good `frames`; with a memory on the fused score, each frame that is in the
        memory leaving itself out (scored as a part the memory has never seen)."""
        exclude = [memory.memory.image_index(sha256_frames([f])) for f in frames] if memory else None
        calibration = Calibration.from_scores(
            self.scorer.good_scores(prompts, text, frames, memory, exclude),
            q,
            prompts.version,
            prompts.digest,
            self.calibration_settings(profile.class_word, memory),
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

    def _reference_frames(self, name: str) -> list[np.ndarray]:
        """The class's reference frames from its loader ([] without one, or when they cannot be read)."""
        if name not in self._references:
            return []
        try:
            return [check_frame(f, i) for i, f in enumerate(self._references[name]())]
        except Exception as exc:  # a reference folder that went away must not block a prompt swap
            log.warning("reference images unreadable; calibration will be stale", product_class=name, error=str(exc))
            return []

    # --- a prompt swap ---------------------------------------------------------------------------------
    def rebuilt_for(self, prompts: PromptState, old: Snapshot) -> tuple[Mapping[str, ClassEntry], list[ClassProfile]]:
        """With the write lock held, for a swap to `prompts`: every class of `old` with its text rebuilt and,
        where it has a reference loader and a calibration, recalibrated; and the recalibrated profiles
        (for `save` once the swap is published, so history/ keeps the previous calibration)."""
        classes, recalibrated = {}, []
        for name, entry in old.classes.items():
            text = self.scorer.class_text(prompts.model, entry.profile)
            profile = entry.profile
            frames = self._reference_frames(name) if name in self._references else []
            memory, why = entry.memory, entry.memory_error
            if memory is not None:  # statistics of the zero-shot branch (and adapted features) follow the prompts
                saved = memory.memory if memory.memory.identity == self._memory_identity(prompts) else None
                memory, why = self._memory_for(prompts, text, name, frames, saved, None)
                if memory is None:
                    why = f"patch memory built on other prompts and no references to rebuild it: {why}"
            if profile.calibration is not None and frames:
                profile = self._calibrated(prompts, profile, text, frames, self._quantile(profile), memory)
                recalibrated.append(profile)
            classes[name] = self._entry(prompts, profile, text, old.overrides, memory, why)
        return MappingProxyType(classes), recalibrated

    # --- the patch memory ------------------------------------------------------------------------------
    def _memory_for(
        self,
        prompts: PromptState,
        text: ClassText,
        name: str,
        frames: Sequence[np.ndarray],
        saved: PatchMemory | None,
        saved_error: str | None,
    ) -> tuple[ClassMemory | None, str | None]:
        """The memory a class scores with on `prompts`, or None and why (None, None: b = 0, zero-shot).

        `saved` is used when it was built from these reference `frames` (or none are given); else one is
        built from `frames`. Its statistics are measured again on `frames` when they were measured on
        other prompts."""
        weight = self.config.memory_weight_for(name)
        if weight <= 0:
            return None, None
        memory = saved
        if frames and (memory is None or memory.reference_digest != sha256_frames(frames)):
            memory = self.build_memory_from(prompts, frames)
        if memory is None:
            return None, saved_error or (
                "no good parts to build a patch memory from ([references], `genclip calibrate` or confirm-good)"
            )
        if frames and (memory.stats is None or memory.stats.prompt_digest != prompts.digest):
            memory = self._with_stats(prompts, text, memory, frames)
        if memory.stats is None:
            return None, "the patch memory has no good-part statistics; rebuild it from references"
        return ClassMemory(memory, weight, self.config.memory_fusion), None

    def build_memory_from(
        self, prompts: PromptState, frames: Sequence[np.ndarray], sources: Sequence[str] | None = None
    ) -> PatchMemory:
        """A memory (without statistics) of good `frames` on `prompts` (device thread)."""
        identity = self._memory_identity(prompts)
        kind = "tokens" if identity.features == "tokens" else "adapted"
        started = time.perf_counter()
        features = self.scorer.patch_features(prompts.model, frames, kind)
        memory = build_memory(
            features,
            identity,
            [sha256_frames([f]) for f in frames],
            list(sources or ["reference"] * len(frames)),
            sha256_frames(frames),
            self.config.memory_coreset,
        )
        log.info(
            "patch memory built",
            images=memory.images,
            patches=memory.patches,
            mib=round(memory.nbytes / 2**20, 2),
            seconds=round(time.perf_counter() - started, 3),
        )
        return memory

    def _with_stats(
        self, prompts: PromptState, text: ClassText, memory: PatchMemory, frames: Sequence[np.ndarray]
    ) -> PatchMemory:
        """`memory` with both branches' good-part statistics measured on `frames` (each leaving itself out)."""
        exclude = [memory.image_index(sha256_frames([f])) for f in frames]
        probe = ClassMemory(memory, 1.0, self.config.memory_fusion)
        zero_shot, few_shot = self.scorer.branch_maps(prompts, text, frames, probe, exclude)
        stats = MemoryStats(BranchStats.of(zero_shot), BranchStats.of(few_shot), len(frames), prompts.digest)
        return memory.with_stats(stats)

    def memory(self, product_class: str) -> PatchMemory | None:
        """The patch memory a class scores with now, or None."""
        entry = self._cell.current.classes.get(normalise_class_name(product_class))
        return entry.memory.memory if entry is not None and entry.memory is not None else None

    def build_memory(self, product_class: str, frames: Sequence[np.ndarray]) -> PatchMemory:
        """A memory of a registered class from good `frames`, with its statistics, not installed (device
        thread; `use_memory` installs one: `genclip eval --shots` tries several)."""
        name = normalise_class_name(product_class)
        checked = [check_frame(f, i) for i, f in enumerate(frames)]
        snap = self._cell.current
        entry = snap.classes.get(name)
        if entry is None:
            raise ClassSetupError(f"class '{name}' is not registered")
        if not checked:
            raise ClassSetupError(f"class '{name}': no good images to build a patch memory from")
        return self._with_stats(snap.prompts, entry.text, self.build_memory_from(snap.prompts, checked), checked)

    def use_memory(self, product_class: str, memory: PatchMemory | None, weight: float | None = None) -> None:
        """Score a registered class with `memory` at weight b (`weight`, default its configured one); None or
        b = 0: zero-shot."""
        name = normalise_class_name(product_class)
        b = self.config.memory_weight_for(name) if weight is None else weight
        with self._cell.write_lock:
            old = self._cell.current
            entry = old.classes.get(name)
            if entry is None:
                raise ClassSetupError(f"class '{name}' is not registered")
            use = ClassMemory(memory, b, self.config.memory_fusion) if memory is not None and b > 0 else None
            self._publish_class(old, entry.profile, entry.text, use, None)

    def grow_memory(self, product_class: str, frames: Sequence[np.ndarray], part_ids: Sequence[str]) -> PatchMemory:
        """Add parts confirmed good to a class's memory (device thread), at most [model].memory_max_images
        images (the oldest confirmed go first); statistics measured again on the references and these parts,
        the threshold recalibrated on the references when the class has them; saved beside its profile."""
        name = normalise_class_name(product_class)
        checked = [check_frame(f, i) for i, f in enumerate(frames)]
        weight = self.config.memory_weight_for(name)
        if weight <= 0:
            raise ClassSetupError(
                f"class '{name}' fuses no patch memory ([model].memory_weight or class_memory_weights is 0)"
            )
        if not checked:
            raise ClassSetupError(f"class '{name}': no parts to add to its memory")
        references = self._reference_frames(name)
        with self._cell.write_lock:
            old = self._cell.current
            entry = old.classes.get(name)
            if entry is None:
                raise ClassSetupError(f"class '{name}' is not registered")
            sources = [f"confirmed:{p}" for p in part_ids]
            if entry.memory is None:
                memory = self.build_memory_from(old.prompts, checked, sources)
                memory = replace(memory, reference_digest=None)
            else:
                kind = "tokens" if entry.memory.memory.identity.features == "tokens" else "adapted"
                features = self.scorer.patch_features(old.prompts.model, checked, kind)
                digests = [sha256_frames([f]) for f in checked]
                memory = add_images(entry.memory.memory, features, digests, sources, self.config.memory_max_images)
            memory = self._with_stats(old.prompts, entry.text, memory, [*references, *checked])
            use = ClassMemory(memory, weight, self.config.memory_fusion)
            profile = entry.profile
            if profile.calibration is not None and references:
                profile = self._calibrated(old.prompts, profile, entry.text, references, self._quantile(profile), use)
            self._publish_class(old, profile, entry.text, use, None)
        if profile is not entry.profile:
            self.save(profile)
        self.save_memory(name)
        log.info("patch memory grown", product_class=name, images=memory.images, patches=memory.patches)
        return memory

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
