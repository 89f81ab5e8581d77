"""The fold procedure, written once: what every backbone family does with one fold.

Framework-free (no torch, no tensorflow): the base class owns the procedure, as AutoGluon's
``AbstractModel`` owns fit timing, info and save/load, and the epochs fire one set of events, as
fastai's ``Learner`` does. A family supplies a few small hooks and registers itself
(``backbones.register``); callers reach it only through this interface. A family package's
``__init__`` stays light (no framework import): its hooks import the framework when called.

What the template owns (``FoldProcedure``):
  runtime set-up call -> plan (phases x sizes -> segments) -> build -> resume bookkeeping (where to
  restart, history trim, the callbacks' memory) -> one ``fit_segment`` per segment, each epoch
  ending in ``FoldEvents.epoch_end`` (validation without TTA via ``oof.metrics``, seconds,
  images/s, history rows, CSV, TensorBoard, the log line, TerminateOnNaN, best weights, the
  user's callbacks, the resume state) -> best weights -> precise BatchNorm -> prediction of the
  held-out rows and the test set with TTA views (``predict_views``: one loop, batches x views)
  -> the checkpoint publish (one metadata schema) -> the info dict and timings.

The hooks (``Family``: stateless, one registered instance per family; ``FoldModel``: one fold):

  Family.name / framework / checkpoint_suffix / libraries      what the family is
  Family.resolve_spec(model_name, cfg) -> BackboneSpec         name check, preprocessing
  Family.setup_runtime(cfg, seed) -> None                      threads, seeds, device settings
  Family.build(job, plan) -> FoldModel                         model for the fold (checks batches)
  Family.tensorboard_writer(path) -> writer | None             add_scalar / flush / close
  Family.user_callbacks(cfg) -> list[Callback]                 default: backbones.callbacks
  Family.lr_range_test(job, lrs) -> list[float]                one loss per learning rate
  Family.load_predictor(run_meta, checkpoint, threads, device) -> FoldPredictor
  Family.read_checkpoint_meta(path) -> dict                    the metadata save_weights wrote
  Family.load_run_predictor(run_meta, checkpoints, ...) -> RunPredictor   all K folds, (K, N, C)
  Family.run_files(run_meta) -> list[str]                      other files its predictor reads
  Family.versions() -> dict                                    ``libraries``' versions
  Family.load_rank / load()                                    import order, import the framework
  Family.predict_dtype / predict_batch_size                    how predict_views accumulates
  Family.example -> ContractExample                            its smallest model, trained by the
      contract suite (tests/test_backbone_contract.py); a family without one fails it

  FoldModel.stop_training                                      the callbacks' brake
  FoldModel.fit_segment(segment, first_epoch, events)          train the segment's epochs from
      ``first_epoch``; for each epoch call ``events.epoch_begin(epoch)`` then
      ``events.epoch_end(epoch, train_logs)`` (it fills the logs in place and returns True when
      training must stop). A family may run all the epochs in one framework call (Keras'
      ``model.fit``) and fire the two events from a framework callback adapter.
  FoldModel.predict_batch(images_uint8, batch_size) -> probabilities of one view of one batch
      (``batch_size``: the size every batch of this prediction is padded to, if the family pads)
  FoldModel.before_predict()                                   e.g. eval mode (default: nothing)
  FoldModel.predict_views(images, views, num_classes, family)  default: predict_views over
      predict_batch (the probe averages its features over the views instead)
  FoldModel.snapshot() / load_weights(state)                   best epoch, early stopping
  FoldModel.recalibrate_batchnorm(images) -> layers            precise BatchNorm
  FoldModel.save_resume(work_dir, epoch, memory)               after each epoch: the family's
      state plus ``memory`` (history rows, stop flag, callbacks' memory), atomically
  FoldModel.load_resume(work_dir, plan) -> ResumePoint | None  the epoch to restart from and the
      memory saved with it (None when the family restores its own state without it: history is
      then read back from the CSV and the best epoch from it)
  FoldModel.save_weights(path, meta, state=None)               the predicting weights (or a
      snapshot) with ``meta`` inside, atomically
  FoldModel.info() -> dict                                     device, amp and family extras
  FoldModel.checkpoint_meta() -> dict                          family keys for the checkpoint

Checkpoint metadata: one schema for every family (``checkpoint_meta``); the weights that predict
are named under ``predict_weights`` (Keras runs before issue 29 wrote ``weights``:
``checkpoint_weights`` reads both).
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backbones.base import BackboneSpec, FoldJob, FoldResult
from backbones.callbacks import (
    BestWeights,
    Callback,
    CSVLogger,
    TerminateOnNaN,
    read_history,
    trim_history,
    user_callbacks,
)
from oof.metrics import accuracy, log_loss
from recipe import plan_phases, plan_segments, plan_sizes
from recipe.phases import Phase, Segment, SizeStage
from recipe.tta import TTAView, tta_views

if TYPE_CHECKING:
    from oof.config import RunConfig

log = logging.getLogger(__name__)

#: the checkpoint metadata key naming the weights that predict ('last' | 'best'); OLD_WEIGHTS_KEY
#: is what Keras checkpoints wrote before the schema was shared
WEIGHTS_KEY = "predict_weights"
OLD_WEIGHTS_KEY = "weights"


@dataclass(frozen=True)
class FoldPlan:
    """The fold's epochs: phases (head, full) cut by image-size stages into fit segments."""

    phases: list[Phase]
    stages: list[SizeStage]
    segments: list[Segment]

    @classmethod
    def of(cls, cfg: RunConfig, input_size: int) -> FoldPlan:
        phases = plan_phases(cfg)
        stages = plan_sizes(cfg, input_size)
        return cls(phases, stages, plan_segments(phases, stages))

    @property
    def progressive(self) -> bool:
        return len(self.stages) > 1


@dataclass
class ResumePoint:
    """Where a killed fold restarts: the first epoch still to train and, when the family saved
    it, the template's memory from then (``history``, ``stop_training``, ``callbacks``)."""

    next_epoch: int
    memory: dict[str, Any] | None = None
    #: without ``memory``: the best epoch's weights as the family kept them through the kill
    #: (what its ``snapshot()`` returned, e.g. a file), so 'best' still means the best epoch
    best_state: Any = None


@dataclass(frozen=True)
class ContractExample:
    """A family's smallest model, for the contract every family passes (OOF and test rows
    complete, same bits after a kill, predictor = stored rows, bad config refused): declared on
    the family, so a new family cannot be registered without being checked."""

    backbone: str  # a FAMILY/MODEL name that trains in seconds on a CPU, e.g. "timm/resnet10t"
    img_size: int  # the smallest input size it trains at (px)
    flags: tuple[str, ...] = ()  # run_folds.py flags it needs besides these (a fast head, ...)
    #: (flag, value) pairs of run_folds.py the family itself refuses with a ConfigError naming
    #: the flag (a misspelt model name is checked for every family)
    bad: tuple[tuple[str, str], ...] = ()


def checkpoint_weights(meta: dict[str, Any]) -> str | None:
    """Which weights a fold checkpoint holds ('last' / 'best'), whichever key wrote it."""
    return meta.get(WEIGHTS_KEY, meta.get(OLD_WEIGHTS_KEY))


def predict_views(images: np.ndarray, views: list[TTAView],
                  predict_batch: Callable[[np.ndarray, int], np.ndarray], num_classes: int,
                  batch_size: int, dtype: Any) -> np.ndarray:
    """Class probabilities (float64, rows sum to 1) averaged over the test-time ``views``.

    The one prediction loop of every family: batches of ``batch_size`` rows, each view of a
    batch through ``predict_batch``, the views summed in ``dtype`` (the family's own
    accumulation: its bits do not move) and divided by their count in it, then float64 and each
    row normalised. ``rows`` are the images' positions in the whole set, so a random view of an
    image is the same whatever batch it falls in.
    """
    return _predict(images, views, predict_batch, num_classes, batch_size, dtype, False)[0]


def predict_each_view(images: np.ndarray, views: list[TTAView],
                      predict_batch: Callable[[np.ndarray, int], np.ndarray], num_classes: int,
                      batch_size: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """``predict_views`` and, from the same passes, each view alone: (N, C) and (V, N, C), the
    second's [v] bit for bit ``predict_views`` with ``[views[v]]`` (one pass per view, not two)."""
    return _predict(images, views, predict_batch, num_classes, batch_size, dtype, True)


def _predict(images: np.ndarray, views: list[TTAView],
             predict_batch: Callable[[np.ndarray, int], np.ndarray], num_classes: int,
             batch_size: int, dtype: Any, each: bool) -> tuple[np.ndarray, np.ndarray]:
    """The loop of ``predict_views`` (``each``: keeping every view's own probabilities)."""
    n = len(images)
    views = views or tta_views("none", [], 0, "none", 0, 0)
    if n == 0:
        return (np.zeros((0, num_classes), dtype=np.float64),
                np.zeros((len(views) if each else 0, 0, num_classes), dtype=np.float64))
    batch_size = min(batch_size, n)
    one = np.asarray(1, dtype=dtype)
    out: list[np.ndarray] = []
    alone: list[list[np.ndarray]] = [[] for _ in views] if each else []
    for start in range(0, n, batch_size):
        batch = np.asarray(images[start:start + batch_size], dtype=np.uint8)
        rows = np.arange(start, start + len(batch))
        probs: Any = 0
        for k, view in enumerate(views):
            p = np.asarray(predict_batch(view(batch, rows), batch_size), dtype=dtype)
            probs = probs + p
            if each:  # what a loop over this view alone computes: (0 + p) / 1
                alone[k].append(((0 + p) / one).astype(np.float64))
        out.append((probs / np.asarray(len(views), dtype=dtype)).astype(np.float64))
    mean = _normalised(np.concatenate(out))
    if not each:
        return mean, np.zeros((0, n, num_classes), dtype=np.float64)
    return mean, np.stack([_normalised(np.concatenate(a)) for a in alone])


def _normalised(probs: np.ndarray) -> np.ndarray:
    return probs / probs.sum(axis=1, keepdims=True)


class PredictingModel(ABC):
    """What predicts for a ``FoldPredictor``: a fold's model as trained (``FoldModel``) or as
    a family loads it for serving (which may predict its batches another way)."""

    @abstractmethod
    def predict_batch(self, images: np.ndarray, batch_size: int) -> np.ndarray: ...

    def before_predict(self) -> None:  # noqa: B027 - an optional hook
        """Called once before each prediction (inference mode)."""

    def predict_views(self, images: np.ndarray, views: list[TTAView], num_classes: int,
                      family: Family) -> np.ndarray:
        """Probabilities averaged over ``views``: the one loop (``predict_views``) over this
        model's ``predict_batch``. A family whose views are averaged before its classifier
        (the probe averages features) overrides this."""
        return predict_views(images, views, self.predict_batch, num_classes,
                             family.predict_batch_size, family.predict_dtype)

    def predict_each_view(self, images: np.ndarray, views: list[TTAView], num_classes: int,
                          family: Family) -> tuple[np.ndarray, np.ndarray]:
        """``predict_views`` and each view alone, from one pass per view (``predict_each_view``).
        A family that overrides ``predict_views`` overrides this too."""
        return predict_each_view(images, views, self.predict_batch, num_classes,
                                 family.predict_batch_size, family.predict_dtype)


class FoldModel(PredictingModel):
    """One fold's trainable model, as a family wraps it (see the module docstring)."""

    stop_training: bool = False

    @abstractmethod
    def fit_segment(self, segment: Segment, first_epoch: int, events: FoldEvents) -> None: ...

    @abstractmethod
    def snapshot(self) -> Any: ...

    @abstractmethod
    def load_weights(self, state: Any) -> None: ...

    @abstractmethod
    def recalibrate_batchnorm(self, images: np.ndarray) -> int: ...

    @abstractmethod
    def save_resume(self, work_dir: Path, epoch: int, memory: dict[str, Any]) -> None: ...

    @abstractmethod
    def load_resume(self, work_dir: Path, plan: FoldPlan) -> ResumePoint | None: ...

    @abstractmethod
    def save_weights(self, path: Path, meta: dict[str, Any], state: Any = None) -> None: ...

    def info(self) -> dict[str, Any]:
        """Keys for the fold's info dict (``device``, ``amp`` and the family's own)."""
        return {}

    def checkpoint_meta(self) -> dict[str, Any]:
        """The family's own keys for the checkpoint metadata (on top of ``checkpoint_meta``)."""
        return {}


class FoldPredictor:
    """One fold model loaded for serving: ``predict_proba`` is the loop that made its OOF rows
    (``predict_views``) with the run's TTA views."""

    def __init__(self, family: Family, model: PredictingModel, views: list[TTAView],
                 meta: dict[str, Any], input_size: int, num_classes: int) -> None:
        self.family, self.model, self.views, self.input_size = family, model, views, input_size
        self.meta = {**meta}
        if WEIGHTS_KEY not in self.meta and OLD_WEIGHTS_KEY in self.meta:
            self.meta[WEIGHTS_KEY] = self.meta[OLD_WEIGHTS_KEY]
        self.num_classes = num_classes

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        self.model.before_predict()
        return self.model.predict_views(images, self.views, self.num_classes, self.family)


class RunPredictor:
    """Every fold model of a run, loaded for serving: ``predict_proba`` gives (K, N, C), fold
    order (``Family.load_run_predictor``'s default: one ``load_predictor`` per fold)."""

    def __init__(self, folds: list[FoldPredictor]) -> None:
        self.folds = folds
        self.input_size = folds[0].input_size

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return np.stack([p.predict_proba(images) for p in self.folds])


def run_views(run_meta: dict[str, Any], checkpoint_meta: dict[str, Any],
              input_size: int) -> list[TTAView]:
    """The TTA views fold ``checkpoint_meta['fold']`` of a run predicted with (its meta.json)."""
    c = run_meta["config"]
    seed = int(run_meta["train_seed"]) + int(checkpoint_meta.get("fold", 0))
    return tta_views(c["tta"], c["tta_scales"], c["tta_augment"], c["augment"], input_size, seed)


class Family(ABC):
    """A backbone family: the stateless hooks, plus ``train_fold`` (the template)."""

    name: str = ""  # "timm": the FAMILY of FAMILY/MODEL names
    framework: str = ""  # "torch"
    checkpoint_suffix: str = ""  # ".safetensors": fold checkpoints are fold{k}<suffix>
    libraries: tuple[str, ...] = ()  # importable modules whose versions a run records
    predict_dtype: Any = np.float64  # the views' probabilities are summed in this dtype
    predict_batch_size: int = 256
    publishes_best_checkpoint: bool = False  # also fold{k}.best<suffix> when predicting 'last'
    progress_prints_epochs: bool = False  # its progress bar shows the epoch line already
    soft_targets: bool = False  # trains on FoldJob.y_train_soft when given (--distill-from)
    #: families sharing a process are loaded in this order: torch's before TensorFlow's
    #: (torchvision or triton imported after TensorFlow aborts the process: both bundle LLVM)
    load_rank: int = 0
    #: the smallest model of the family, trained by the contract suite (None fails it)
    example: ContractExample | None = None

    @abstractmethod
    def resolve_spec(self, model_name: str, cfg: RunConfig) -> BackboneSpec: ...

    @abstractmethod
    def setup_runtime(self, cfg: RunConfig, seed: int) -> None: ...

    @abstractmethod
    def build(self, job: FoldJob, plan: FoldPlan) -> FoldModel: ...

    @abstractmethod
    def lr_range_test(self, job: FoldJob, lrs: np.ndarray) -> list[float]: ...

    @abstractmethod
    def load_predictor(self, run_meta: dict[str, Any], checkpoint: Path,
                       threads: int | None = None, device: str = "cpu") -> FoldPredictor: ...

    @abstractmethod
    def read_checkpoint_meta(self, path: Path) -> dict[str, Any]: ...

    def load_run_predictor(self, run_meta: dict[str, Any], checkpoints: list[Path],
                           threads: int | None = None, device: str = "cpu") -> Any:
        """Every fold of a run for serving: an object with ``input_size`` and
        ``predict_proba(images) -> (K, N, C)``. Default: one ``load_predictor`` per fold; a
        family whose folds share work overrides it (the probe: one feature pass, K heads)."""
        return RunPredictor([self.load_predictor(run_meta, ck, threads, device)
                             for ck in checkpoints])

    def run_files(self, run_meta: dict[str, Any]) -> list[str]:
        """Files of the run's checkpoints/ folder its predictor reads besides the fold
        checkpoints (a bundle copies them): none by default, the probe's extractor."""
        return []

    def tensorboard_writer(self, path: Path) -> Any:
        """An object with ``add_scalar(tag, value, step)``, ``flush()``, ``close()``."""
        return None

    def user_callbacks(self, cfg: RunConfig) -> list[Callback]:
        return user_callbacks(cfg.callbacks)

    def load(self) -> None:
        """Import the framework now (a family package imports it lazily, in its hooks)."""
        import importlib

        for lib in self.libraries:
            importlib.import_module(lib)

    @abstractmethod
    def versions(self) -> dict[str, str]:
        """The installed version of each of ``libraries`` (a run records them)."""

    def checkpoint_name(self, fold: int, best: bool = False) -> str:
        return f"fold{fold}{'.best' if best else ''}{self.checkpoint_suffix}"

    def passes_per_image(self, models: int, views: int) -> int:
        """Forward passes per image of ``models`` fold models on ``views`` TTA views: one per
        model and view (a family whose models share one backbone pass overrides it)."""
        return models * views

    def train_fold(self, job: FoldJob, callbacks: list[Callback] | None = None) -> FoldResult:
        """Train on the fold's training rows, then predict its held-out rows and the test set.

        The state is saved after every epoch in the fold's work folder; a killed fold resumes
        from the last finished epoch and ends exactly as an uninterrupted one would.
        """
        return FoldProcedure(self, job, callbacks or []).run()


@dataclass
class FoldEvents:
    """The epoch events a family's ``fit_segment`` fires; the template's per-epoch work."""

    proc: FoldProcedure
    started: float = 0.0
    seconds: list[float] = field(default_factory=list)

    def epoch_begin(self, epoch: int) -> None:
        self.started = time.perf_counter()
        for cb in self.proc.callbacks:
            cb.on_epoch_begin(epoch, {})

    def epoch_end(self, epoch: int, logs: dict[str, Any]) -> bool:
        """Validate, record and publish the epoch; ``logs`` is completed in place (a framework
        callback list sees the same numbers). Returns True when training must stop."""
        p, job = self.proc, self.proc.job
        if p.plan.progressive:
            from recipe import size_of

            logs["img_size"] = size_of(p.plan.stages, epoch)
        val = p.predict(job.x_val)
        seconds = time.perf_counter() - self.started
        logs.update(val_loss=log_loss(job.y_val, val), val_accuracy=accuracy(job.y_val, val),
                    seconds=seconds, images_per_second=len(job.x_train) / seconds)
        self.seconds.append(seconds)
        if p.writer is not None:
            for key, value in logs.items():
                p.writer.add_scalar(f"epoch/{key}", value, epoch)
            p.writer.flush()
        p.history.append({"epoch": epoch, **logs})
        echo = not (job.cfg.progress and p.family.progress_prints_epochs)
        (log.info if echo else log.debug)(
            "fold %d epoch %d/%d %s", job.fold, epoch + 1, job.cfg.epochs,
            " ".join(f"{k}={float(v):.4g}" for k, v in logs.items()))
        for cb in p.callbacks:
            cb.on_epoch_end(epoch, logs)
        p.model.save_resume(job.work_dir, epoch, p.memory())
        return bool(p.model.stop_training)


class FoldProcedure:
    """One fold through the template: built by ``Family.train_fold``."""

    def __init__(self, family: Family, job: FoldJob, extra: list[Callback]) -> None:
        self.family, self.job, self.extra = family, job, extra
        self.history: list[dict[str, Any]] = []
        self.callbacks: list[Callback] = []
        self.writer: Any = None
        self.best = BestWeights("val_loss")

    def memory(self) -> dict[str, Any]:
        """What the template needs back after a kill, saved by the family with its state."""
        return {"history": self.history, "stop_training": self.model.stop_training,
                "callbacks": [{k: v for k, v in vars(cb).items() if k != "trainer"}
                              for cb in self.callbacks]}

    def predict(self, images: np.ndarray, views: list[TTAView] | None = None) -> np.ndarray:
        self.model.before_predict()
        return self.model.predict_views(images, views or [], len(self.job.classes), self.family)

    def predict_each(self, images: np.ndarray, views: list[TTAView]
                     ) -> tuple[np.ndarray, np.ndarray]:
        """``predict`` and each view's own probabilities, from the same passes."""
        self.model.before_predict()
        return self.model.predict_each_view(images, views, len(self.job.classes), self.family)

    def run(self) -> FoldResult:
        """Set up, train the epochs left, predict with the final weights, publish, report."""
        t0 = time.perf_counter()
        resumed_from = self.start()
        build_seconds = time.perf_counter() - t0
        events = FoldEvents(self)
        self.fit(0 if resumed_from is None else resumed_from, events)
        for cb in self.callbacks:
            cb.on_train_end({})
        if self.writer is not None:
            self.writer.close()
        train_seconds = time.perf_counter() - t0
        recalibrated = self.final_weights()
        val_proba, test_proba, per_view = self.predict_rows()
        self.publish(recalibrated)
        secs = events.seconds
        steady = float(np.median(secs[1:])) if len(secs) > 1 else 0.0
        first_extra = max(0.0, secs[0] - steady) if len(secs) > 1 else 0.0
        return FoldResult(val_proba, test_proba, self.history, {
            **self.model.info(), "epochs_run": len(self.history),
            "predict_weights": self.job.cfg.predict_weights, "best_epoch": self.best.best_epoch,
            "bn_recalibrated_layers": recalibrated,
            "phases": [p.to_dict() for p in self.plan.phases],
            "resumed_from_epoch": resumed_from,
            "epochs_this_session": len(secs), "startup_seconds": build_seconds + first_extra,
            "build_seconds": build_seconds, "first_epoch_seconds": secs[0] if secs else None,
            "steady_epoch_seconds": steady, "train_seconds": train_seconds,
            "predict_seconds": time.perf_counter() - t0 - train_seconds,
        }, per_view)

    def start(self) -> int | None:
        """Runtime, plan, model, resume and TensorBoard; the epoch a killed fold resumes at."""
        job, family = self.job, self.family
        family.setup_runtime(job.cfg, job.seed)
        self.plan = FoldPlan.of(job.cfg, job.spec.input_size)
        self.model = family.build(job, self.plan)
        point = self.model.load_resume(job.work_dir, self.plan)
        first_epoch = self.resume(point)
        if job.tensorboard_dir is not None:
            self.writer = family.tensorboard_writer(job.tensorboard_dir)
        return first_epoch if point is not None else None

    def final_weights(self) -> int:
        """The weights that predict: the best epoch's with 'best', then precise BatchNorm;
        the count of BatchNorm layers recalibrated."""
        job, cfg = self.job, self.job.cfg
        if cfg.predict_weights == "best" and self.best.state is not None:
            self.model.load_weights(self.best.state)
        return self.model.recalibrate_batchnorm(job.x_train) if cfg.bn_recalibrate else 0

    def predict_rows(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
        """Held-out and test probabilities averaged over the TTA views, and with
        ``tta_save_views`` each view's alone (issue 30 item 3), from the same passes."""
        job, cfg = self.job, self.job.cfg
        views = tta_views(cfg.tta, cfg.tta_scales, cfg.tta_augment, cfg.augment,
                          job.spec.input_size, job.seed)
        if not (cfg.tta_save_views and len(views) > 1):
            return self.predict(job.x_val, views), self.predict(job.x_test, views), None
        val_proba, val_views = self.predict_each(job.x_val, views)
        test_proba, test_views = self.predict_each(job.x_test, views)
        return val_proba, test_proba, {"names": [v.name for v in views], "val": val_views,
                                       "test": test_views}

    def resume(self, point: ResumePoint | None) -> int:
        """Callbacks on, and the memory of a killed fold back; the first epoch to train."""
        job = self.job
        self.callbacks = [CSVLogger(job.history_path, append=point is not None),
                          TerminateOnNaN(), self.best, *self.family.user_callbacks(job.cfg),
                          *self.extra]
        for cb in self.callbacks:
            cb.set_trainer(self.model)
            cb.on_train_begin({})
        if point is None:
            return 0
        first = int(point.next_epoch)
        if point.memory is not None:
            memory = point.memory
            self.model.stop_training = bool(memory["stop_training"])
            for cb, saved in zip(self.callbacks, memory["callbacks"], strict=True):
                vars(cb).update(saved)
            history = list(memory["history"])
        else:
            history = read_history(job.history_path)
        self.history = [r for r in history if int(r["epoch"]) < first]
        if point.memory is None:
            finite = [r for r in self.history if math.isfinite(float(r.get("val_loss", math.nan)))]
            if finite:
                row = min(finite, key=lambda r: float(r["val_loss"]))
                self.best.best, self.best.best_epoch = float(row["val_loss"]), int(row["epoch"])
                self.best.state = point.best_state
        trim_history(job.history_path, first)
        log.info("fold %d: resuming after epoch %d in %s", job.fold, first, job.work_dir)
        return first

    def fit(self, first_epoch: int, events: FoldEvents) -> None:
        """The segments left, each from the epoch where the fold stands."""
        job = self.job
        for seg in self.plan.segments:
            end = seg.first_epoch + seg.epochs
            if end <= first_epoch:
                continue
            if self.model.stop_training:
                break
            phase = seg.phase
            log.info("fold %d: %s, epochs %d-%d%s, %s", job.fold, seg.name,
                     max(first_epoch, seg.first_epoch) + 1, end,
                     f" at {seg.size}px" if self.plan.progressive else "",
                     "every layer" + (f", layer decay {phase.layer_decay}"
                                      if phase.layer_decay else "")
                     if phase.train_backbone else "head only, backbone frozen")
            self.model.fit_segment(seg, max(first_epoch, seg.first_epoch), events)

    def publish(self, recalibrated: int) -> None:
        """The fold checkpoint (the weights that predict, metadata inside), and with
        ``publishes_best_checkpoint`` the best epoch's weights beside it."""
        job, cfg = self.job, self.job.cfg
        meta = {**checkpoint_meta(job, len(self.history), self.best.best_epoch, recalibrated),
                **self.model.checkpoint_meta()}
        self.model.save_weights(job.checkpoint_path, {**meta, WEIGHTS_KEY: cfg.predict_weights})
        if (self.family.publishes_best_checkpoint and cfg.predict_weights != "best"
                and self.best.state is not None):
            self.model.save_weights(
                job.checkpoint_path.with_name(self.family.checkpoint_name(job.fold, best=True)),
                {**meta, WEIGHTS_KEY: "best"}, self.best.state)


def checkpoint_meta(job: FoldJob, epochs_run: int, best_epoch: int | None,
                    recalibrated: int) -> dict[str, Any]:
    """The metadata every fold checkpoint carries (without ``predict_weights``)."""
    return {"backbone": job.spec.to_dict(), "classes": job.classes, "fold": job.fold,
            "epochs_run": epochs_run, "num_classes": len(job.classes),
            "best_epoch": best_epoch, "bn_recalibrated_layers": recalibrated}
