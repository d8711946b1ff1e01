"""The training loop: learned prompts and adapters from auxiliary data, validated every epoch.

Writes into a run folder (one run per folder: a used folder is refused unless the
run is resumed or `force`d):
  last.safetensors   the newest prompts (after every epoch, and on Ctrl-C)
  best.safetensors   the prompts chosen so far (see trainer/validation.py for the rule)
  state.safetensors  optimiser state, prompts and progress at the end of the last finished epoch, for --resume
  log.jsonl          one line per epoch: losses, validation metrics with intervals, skipped files
  summary.json       what the run did, including the rule that chose `best`
Validation runs through the same Engine the agent uses, with the epoch's
checkpoint hot-swapped in, so its numbers are what the line will see.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import structlog
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from model.checkpoint import (
    CheckpointError,
    check_compatible,
    identity_mismatch,
    model_identity,
    read_checkpoint,
    read_metadata,
    save_model,
    write_atomic,
)
from model.config import EngineConfig
from model.engine import Engine
from model.genclip import GenClip
from model.preprocess import Preprocessor
from trainer.config import TrainerConfig
from trainer.datasets import InspectionDataset, Sample, collate_inspection, open_dataset
from trainer.evaluate import evaluate, headline
from trainer.losses import defect_type_loss, image_loss, pixel_loss, top_patch_loss
from trainer.report import jsonable
from trainer.validation import ValidationPlan, ValidationRecords, bootstrap_interval, plan_validation

log = structlog.stdlib.get_logger("trainer")

LEARNED_PREFIX = "learned."
"""state.safetensors: the learned tensors of the last finished epoch, beside the optimiser's (`<param id>.<key>`)."""
RUN_FILES = ("last.safetensors", "best.safetensors", "state.safetensors", "log.jsonl", "summary.json")
"""What a run writes into its folder; `force` removes exactly these."""


class RunFolderError(ValueError):
    """The run folder holds an earlier run that this one would overwrite."""


class PublishError(ValueError):
    """What the run would publish is a checkpoint the line (its [model]) would refuse."""


def check_run_folder(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse to train into a used folder unless resuming it, or (force) clear the earlier run's files."""
    run_dir = Path(run_dir)
    if resume or not run_dir.is_dir():
        return
    used = sorted(p.name for p in run_dir.iterdir())
    if not used:
        return
    if not force:
        raise RunFolderError(
            f"run folder {run_dir} is not empty ({', '.join(used[:4])}{', ...' if len(used) > 4 else ''}): "
            "continue that run with --resume, start over in it with --force (its checkpoints and log are "
            "deleted), or give another --out"
        )
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    log.warning("--force: earlier run's files removed", run_dir=str(run_dir), files=list(RUN_FILES))


@dataclass
class TrainSummary:
    """What a run produced, for the CLI's closing lines and for tests.

    `epochs_done` counts finished epochs, numbered as in log.jsonl (epoch 0 there is the untrained
    baseline, not a training epoch): after a Ctrl-C in epoch 3 it is 2. After --resume, `best_epoch`,
    `best_metrics` and `baseline` cover the whole run, the epochs before the interruption included.
    """

    run_dir: Path
    last: Path
    best: Path | None
    published: Path | None
    epochs_done: int
    best_epoch: int | None
    best_score: float
    baseline: dict[str, Any] | None
    best_metrics: dict[str, Any] | None
    train_images: int
    val_images: int
    selection: str = ""
    validation: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    epochs: int = 0
    publish_refused: str | None = None


class PromptTrainer:
    """Trains GenCLIP's learned tensors; see the module docstring for what it writes."""

    def __init__(
        self,
        model_config: EngineConfig,
        settings: TrainerConfig,
        data: list[str],
        run_dir: Path,
        *,
        publish_dir: Path | None = None,
        resume: bool = False,
        force: bool = False,
        show_progress: bool = True,
    ) -> None:
        if not data:
            raise ValueError("give at least one data set (--data KIND:PATH)")
        self.settings = settings
        self.data = list(data)
        self.run_dir = Path(run_dir)
        self.publish_dir = publish_dir
        self.resume = resume
        self.force = force
        self.show_progress = show_progress
        self.image_size = settings.image_size or model_config.image_size
        self.line_image_size = model_config.image_size  # what the line's engine (its [model]) runs at
        self.model_config = model_config.model_copy(update={"image_size": self.image_size, "checkpoint": None})
        self.skipped: list[str] = []

    # --- set-up --------------------------------------------------------------------------------
    def _plan(self) -> ValidationPlan:
        samples = [s for spec in self.data for s in open_dataset(spec)]
        plan = plan_validation(samples, self.settings)
        if not plan.train:
            raise ValueError("no training images left after holding out the validation classes")
        return plan

    @staticmethod
    def _vocabulary(samples: list[Sample], fallback: list[str]) -> list[str]:
        names = sorted({s.defect_type for s in samples if s.label == 1 and s.defect_type})
        return names or list(fallback)

    def _seed(self) -> None:
        seed = self.settings.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # --- the run -------------------------------------------------------------------------------
    def run(self) -> TrainSummary:
        started = time.perf_counter()
        check_run_folder(self.run_dir, resume=self.resume, force=self.force)
        self._seed()
        plan = self._plan()
        train, val = plan.train, plan.val
        if plan.rule == "last epoch":
            log.warning("no validation; the last epoch will be kept", reason=plan.reason)
        else:
            log.info(
                "validation on held-out classes", classes=list(plan.held_out), good=plan.good, defective=plan.defective
            )
        vocabulary = self._vocabulary(train, self.model_config.defect_types)
        cfg = self.model_config
        engine = Engine(cfg)  # validation runs the agent's own inference path
        backbone, device = engine.backbone, engine.device
        model = GenClip(backbone, cfg).to(device)
        line_identity = model_identity(backbone, model, self.line_image_size)
        if self.publish_dir is not None:  # refuse now, not after hours of training for a checkpoint the line refuses
            self._check_publishable(model_identity(backbone, model, self.image_size), line_identity)
        prep = Preprocessor(self.image_size, backbone.mean, backbone.std, device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.settings.lr, betas=self.settings.betas)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        last, best = self.run_dir / "last.safetensors", self.run_dir / "best.safetensors"
        start_epoch, best_metrics, baseline = 1, None, None
        self.best_score, self.best_epoch = float("-inf"), None
        if self.resume:
            start_epoch = self._restore(model, optimizer, backbone, last)
            baseline, best_metrics = self._logged_validation(start_epoch - 1)
        log.info(
            "training",
            run_dir=str(self.run_dir),
            train_images=len(train),
            val_images=len(val),
            vocabulary=vocabulary,
            backbone=cfg.backbone,
            image_size=self.image_size,
            device=str(device),
            start_epoch=start_epoch,
            selection=plan.describe(),
        )
        meta_base = {
            "training_data": self.data,
            "defect_vocabulary": vocabulary,
            "trainer": json.loads(self.settings.model_dump_json()),
            "selection": plan.as_dict(),
        }
        self._progress = RunProgress(
            self.show_progress,
            epochs=self.settings.epochs,
            first_epoch=start_epoch,
            train_steps=-(-len(train) // self.settings.batch_size),
            val_steps=-(-len(val) // self.settings.batch_size),
            baseline=bool(val) and baseline is None,
        )
        done = start_epoch - 1  # the last finished epoch: its checkpoints, state and log line are all written
        interrupted = False
        try:
            with self._progress:
                if val and baseline is None:
                    baseline = self._validate(engine, None, val)
                    with _ctrl_c_held():
                        self._log_epoch({"epoch": 0, "note": "untrained prompts", "val": baseline})
                for epoch in range(start_epoch, self.settings.epochs + 1):
                    losses = self._train_epoch(model, optimizer, prep, train, vocabulary, epoch)
                    metrics = self._save_and_validate(model, backbone, engine, optimizer, last, epoch, meta_base, val)
                    if plan.rule == "last epoch":
                        score, improved = -float(losses["loss"]), True
                    else:
                        score = headline(metrics["results"]) if metrics else float("nan")
                        improved = bool(score > self.best_score) or self.best_epoch is None
                    with _ctrl_c_held():  # best, state and log agree: a Ctrl-C waits until all three are written
                        if improved:
                            self.best_score, self.best_epoch, best_metrics = score, epoch, metrics
                            _copy_atomic(last, best)
                        self._save_state(optimizer, model, epoch)
                        self._log_epoch({"epoch": epoch, **losses, "val": metrics, "best": improved})
                        done = epoch
        except KeyboardInterrupt:
            interrupted = True
            # last.safetensors gets the prompts as they are now (usable at once); state.safetensors keeps those
            # of the last finished epoch, so --resume redoes the interrupted epoch from where it began.
            meta = {**meta_base, "epoch": done, "interrupted": True, "interrupted_in_epoch": done + 1}
            save_model(last, model, backbone, self.image_size, meta)
            log.warning(
                "training interrupted; last checkpoint saved, continue with --resume",
                last=str(last),
                epochs_done=done,
                interrupted_in_epoch=done + 1,
            )
        published, refused = None, None
        if self.publish_dir is not None and best.exists() and not interrupted:
            try:
                published = publish(best, self.publish_dir, self.run_dir.name, line_identity)
            except PublishError as exc:
                refused = str(exc)
                log.error("not published", reason=refused)
        summary = TrainSummary(
            run_dir=self.run_dir,
            last=last,
            best=best if best.exists() else None,
            published=published,
            epochs_done=done,
            best_epoch=self.best_epoch,
            best_score=self.best_score,
            baseline=baseline,
            best_metrics=best_metrics,
            train_images=len(train),
            val_images=len(val),
            selection=plan.describe(),
            validation=plan.as_dict(),
            skipped=sorted(set(self.skipped)),
            interrupted=interrupted,
            seconds=time.perf_counter() - started,
            epochs=self.settings.epochs,
            publish_refused=refused,
        )
        (self.run_dir / "summary.json").write_text(json.dumps(jsonable(asdict(summary)), indent=2))
        return summary

    def _autocast(self, device: torch.device) -> AbstractContextManager[object]:
        if device.type == "cuda" and self.settings.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _batches(self, loader: DataLoader, epoch: int) -> Iterator[dict[str, Any]]:
        for batch in loader:
            yield batch
            self._progress.step(epoch, f"loss {self._running_loss:.4f}")

    def _train_epoch(
        self,
        model: GenClip,
        optimizer: torch.optim.Optimizer,
        prep: Preprocessor,
        samples: list[Sample],
        vocabulary: list[str],
        epoch: int,
    ) -> dict[str, float]:
        s = self.settings
        generator = torch.Generator().manual_seed(s.seed + epoch)
        loader = DataLoader(
            InspectionDataset(samples, self.image_size, vocabulary),
            batch_size=s.batch_size,
            shuffle=True,
            generator=generator,
            num_workers=s.workers,
            collate_fn=collate_inspection,
        )
        device = prep.device
        model.train()
        totals = {"loss": 0.0, "pixel_loss": 0.0, "image_loss": 0.0, "defect_loss": 0.0}
        steps = 0
        self._running_loss = 0.0
        suffixes: dict[str, Any] = {}
        for batch in self._batches(loader, epoch):
            for skipped in batch["skipped"]:
                self.skipped.append(f"{skipped.path}: {skipped.reason}")
                log.warning("skipped unreadable sample", path=skipped.path, reason=skipped.reason)
            if not len(batch["path"]):
                continue
            images = prep.normalise(batch["image"])
            masks = batch["mask"][:, 0].to(device)
            labels = batch["label"].to(device)
            defect_index = batch["defect_index"].to(device)
            classes = batch["class_name"]
            with self._autocast(device):
                feats = model.encode_image(images)
                for name in set(classes) - suffixes.keys():
                    suffixes[name] = model.suffix(name)
                text = model.state_text([suffixes[c] for c in classes], feats.vision_prompts)
                logits = model.layer_logits(feats, text)
                known = masks.flatten(1).amin(dim=1) >= 0
                pix = pixel_loss(logits[known], masks[known], self.image_size, s.focal_gamma) if known.any() else None
                unknown = ~known
                if unknown.any():  # image-level labels only: supervise the maps through their top patches
                    weak = top_patch_loss(logits[unknown], labels[unknown])
                    pix = weak if pix is None else pix + weak
                global_logits = feats.global_embedding @ model.query_text().float().t() / model.temperature
                img = image_loss(global_logits, labels)
                dfl = self._defect_loss(model, feats, classes, masks, defect_index, vocabulary)
            loss = s.image_loss_weight * img
            if pix is not None:
                loss = loss + pix
            if dfl is not None:
                loss = loss + s.defect_loss_weight * dfl
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            totals["loss"] += float(loss.detach())
            totals["pixel_loss"] += float(pix.detach()) if pix is not None else 0.0
            totals["image_loss"] += float(img.detach())
            totals["defect_loss"] += float(dfl.detach()) if dfl is not None else 0.0
            self._running_loss = totals["loss"] / steps
        if steps == 0:
            raise RuntimeError("no usable training image in this epoch (every sample was skipped)")
        return {k: round(v / steps, 6) for k, v in totals.items()} | {"steps": steps}

    @staticmethod
    def _defect_loss(
        model: GenClip,
        feats: Any,
        classes: list[str],
        masks: torch.Tensor,
        defect_index: torch.Tensor,
        vocabulary: list[str],
    ) -> torch.Tensor | None:
        if len(vocabulary) < 2 or not (defect_index >= 0).any():
            return None
        total = None
        for name in sorted(set(classes)):
            rows = [i for i, c in enumerate(classes) if c == name and int(defect_index[i]) >= 0]
            if not rows:
                continue
            idx = torch.as_tensor(rows, device=masks.device)
            logits = feats.patches[idx] @ model.defect_text(vocabulary, name).float().t() / model.temperature
            part = defect_type_loss(logits, masks[idx].clamp(min=0), defect_index[idx])
            if part is not None:
                total = part if total is None else total + part
        return total

    # --- checkpoints, validation, logs ---------------------------------------------------------
    def _save_and_validate(
        self,
        model: GenClip,
        backbone: Any,
        engine: Engine,
        optimizer: torch.optim.Optimizer,
        last: Path,
        epoch: int,
        meta_base: dict[str, Any],
        val: list[Sample],
    ) -> dict[str, Any] | None:
        save_model(last, model, backbone, self.image_size, {**meta_base, "epoch": epoch})
        metrics = self._validate(engine, last, val) if val else None
        if metrics:
            save_model(last, model, backbone, self.image_size, {**meta_base, "epoch": epoch, "metrics": metrics})
        return metrics

    def _validate(self, engine: Engine, checkpoint: Path | None, val: list[Sample]) -> dict[str, Any]:
        """Metrics on the held-out classes, with their image counts and bootstrap 95 % intervals."""
        if checkpoint is not None:
            engine.load_prompts(checkpoint, announce=False)
        records = ValidationRecords()
        batch_size = self.settings.batch_size
        progress = self._progress
        outcome = evaluate(
            engine,
            val,
            batch_size=batch_size,
            on_image=records.add,
            progress=lambda done, total: progress.validation(done, batch_size, total),
        )
        for skipped in outcome.skipped:
            self.skipped.append(f"{skipped.path}: {skipped.reason}")
        interval = bootstrap_interval(records, self.settings.bootstrap_rounds, self.settings.seed)
        return {
            "results": outcome.results,
            "images": outcome.images,
            "interval": interval,
            "seconds": round(outcome.seconds, 2),
        }

    def _save_state(self, optimizer: torch.optim.Optimizer, model: GenClip, epoch: int) -> None:
        """Optimiser moments, the learned tensors and progress at the end of `epoch`, as tensors + JSON
        (safetensors, nothing pickled): what --resume continues from."""
        tensors = {
            f"{param_id}.{key}": torch.as_tensor(value).detach().cpu().contiguous()
            for param_id, state in optimizer.state_dict()["state"].items()
            for key, value in state.items()
        }
        tensors |= {
            f"{LEARNED_PREFIX}{name}": value.detach().cpu().contiguous()
            for name, value in model.learned_state().items()
        }
        progress = json.dumps({"epoch": epoch, "best_score": self.best_score, "best_epoch": self.best_epoch})
        path = self.run_dir / "state.safetensors"
        write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"progress": progress}))

    def _restore(self, model: GenClip, optimizer: torch.optim.Optimizer, backbone: Any, last: Path) -> int:
        """Load last.safetensors and the optimiser state; returns the epoch to start from."""
        state_path = self.run_dir / "state.safetensors"
        if not last.exists() or not state_path.exists():
            log.info("nothing to resume; starting fresh", run_dir=str(self.run_dir))
            return 1
        found = read_checkpoint(last)
        check_compatible(found.meta, model_identity(backbone, model, self.image_size), str(last))
        with safe_open(str(state_path), framework="pt") as fh:
            progress = json.loads((fh.metadata() or {}).get("progress", "{}"))
        saved = load_file(str(state_path))
        # The prompts at the end of the last finished epoch (state files before these were kept: last's).
        learned = {k.removeprefix(LEARNED_PREFIX): v for k, v in saved.items() if k.startswith(LEARNED_PREFIX)}
        try:
            model.load_learned_state(learned or found.tensors)
        except RuntimeError as exc:
            raise CheckpointError(f"{last}: cannot resume, prompt shapes differ: {exc}") from None
        state = optimizer.state_dict()
        for key, value in saved.items():
            if key.startswith(LEARNED_PREFIX):
                continue
            param_id, name = key.split(".", 1)
            state["state"].setdefault(int(param_id), {})[name] = value
        optimizer.load_state_dict(state)
        best = progress.get("best_score")
        self.best_score = float(best) if best is not None else float("-inf")
        self.best_epoch = progress.get("best_epoch")
        log.info("resuming", after_epoch=progress.get("epoch", 0), best_score=self.best_score)
        return int(progress.get("epoch", 0)) + 1

    def _logged_validation(self, done: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """From log.jsonl of the run being resumed: the untrained baseline (epoch 0) and the validation of the
        best epoch so far, so the resumed run's summary covers the epochs before the interruption."""
        records: dict[int, dict[str, Any]] = {}
        kept: dict[int, str] = {}
        path = self.run_dir / "log.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash: that epoch is done again
                continue
            if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] <= done:
                records[record["epoch"]], kept[record["epoch"]] = record, line
        if len(kept) != len(lines):  # the log goes on from the last finished epoch, one line per epoch
            text = "".join(kept[e] + "\n" for e in sorted(kept))
            write_atomic(path, lambda tmp: tmp.write_text(text))
        baseline = (records.get(0) or {}).get("val")
        best = (records.get(self.best_epoch) or {}).get("val") if self.best_epoch is not None else None
        return baseline, best

    def _check_publishable(self, trained: dict[str, Any], line: dict[str, Any]) -> None:
        """Refuse --publish before training when the line's engine would refuse this run's checkpoints."""
        mismatch = identity_mismatch(trained, line)
        if mismatch is None:
            return
        field_name, have, want = mismatch
        raise PublishError(
            f"--publish {self.publish_dir}: the line would refuse this run's checkpoints: field '{field_name}' is "
            f"{have!r} in this run but {want!r} in the line's [model] (the config given to train); nothing was "
            f"trained or published. {_publish_advice(field_name, want)}"
        )

    def _log_epoch(self, record: dict[str, Any]) -> None:
        record = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record, "skipped_total": len(set(self.skipped))}
        with (self.run_dir / "log.jsonl").open("a") as fh:
            fh.write(json.dumps(jsonable(record)) + "\n")
        val = record.get("val") or {}
        mean = (val.get("results") or {}).get("mean", {})
        interval = val.get("interval") or {}
        fields = {
            "loss": record.get("loss"),
            "val_images": val.get("images"),
            "image_auroc": _rounded(mean.get("image_auroc")),
            "image_auroc_95": interval.get("image_auroc"),
            "pixel_auroc": _rounded(mean.get("pixel_auroc")),
            "pixel_auroc_95": interval.get("pixel_auroc"),
            "best": record.get("best"),
        }
        log.info("epoch done", epoch=record["epoch"], **{k: v for k, v in fields.items() if v is not None})


def _rounded(value: Any) -> Any:
    return round(float(value), 4) if isinstance(value, float) and value == value else value


@contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Hold a Ctrl-C (SIGINT) until the block has run, then raise it: an epoch's files are written whole."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and previous is not signal.SIG_IGN:
        raise KeyboardInterrupt


class RunProgress:
    """One progress bar over the whole run (training and validation batches), so its ETA is the run's."""

    def __init__(
        self, show: bool, *, epochs: int, first_epoch: int, train_steps: int, val_steps: int, baseline: bool
    ) -> None:
        self.epochs = epochs
        self.val_steps = val_steps
        self._val_done = 0
        self._bar: Progress | None = None
        if not show:
            return
        epochs_left = max(epochs - first_epoch + 1, 0)
        total = epochs_left * (train_steps + val_steps) + (val_steps if baseline else 0)
        self._bar = Progress(
            TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[note]}"),
            TextColumn("run ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self._task = self._bar.add_task("run", total=total, epoch=first_epoch, epochs=epochs, note="")

    def __enter__(self) -> RunProgress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def step(self, epoch: int, note: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, epoch=epoch, note=note)

    def validation(self, images_done: int, batch_size: int, images_total: int) -> None:
        """Advance by validation batches (evaluate reports images); resets when a validation ends."""
        if self._bar is None:
            return
        done = -(-images_done // batch_size)
        self._bar.update(self._task, advance=max(done - self._val_done, 0), note="validating")
        self._val_done = 0 if images_done >= images_total else done


def _copy_atomic(source: Path, target: Path) -> None:
    write_atomic(target, lambda tmp: shutil.copyfile(source, tmp))


def _publish_advice(field_name: str, line_value: Any) -> str:
    if field_name == "image_size":
        return (
            f"Train at the line's size: leave out --image-size and [trainer].image_size (or give {line_value}); "
            "or, to move the line to another size, change its [model].image_size first and train with that config."
        )
    return "Train with the line's config, or change the line's [model] first and train with that config."


def publish(checkpoint: Path, folder: Path, name: str, line: dict[str, Any] | None = None) -> Path:
    """Put a checkpoint where an agent watches, atomically: it sees the old file or the whole new one.

    `line`: the identity (`model_identity`) of the engine that reads `folder`; a checkpoint it would refuse
    (Engine.prepare_prompts' check) is not published: PublishError names the field and both values.
    """
    if line is not None:
        mismatch = identity_mismatch(read_metadata(checkpoint), line)
        if mismatch is not None:
            field_name, have, want = mismatch
            raise PublishError(
                f"{checkpoint}: not published to {folder}: the line would refuse it: field '{field_name}' is "
                f"{have!r} in the checkpoint but {want!r} in the line's [model]. {_publish_advice(field_name, want)}"
            )
    target = Path(folder) / f"{name}.safetensors"
    _copy_atomic(checkpoint, target)
    log.info("published", path=str(target))
    return target
