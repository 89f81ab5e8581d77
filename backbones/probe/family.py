"""The probe family on the fold template: no epochs, one fit of a scikit-learn head.

The template (``backbones.fold``) runs the fold as for any family: its first epoch is the
probe's whole training (the fold's training features, cached in the work folder, then the head
fitted with inner CV), validated and recorded by the template; the head then stops training.
Prediction averages each image's features over the TTA views before the head reads them
(``predict_views``), and a run predictor serves the K fold heads from one feature pass.
Light at import: torch and scikit-learn are imported inside the hooks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from backbones.base import BackboneSpec, FoldJob
from backbones.fold import ContractExample, Family, FoldModel, FoldPlan, ResumePoint
from oof.atomic import atomic_path
from oof.errors import ConfigError
from oof.metrics import accuracy, log_loss

if TYPE_CHECKING:
    from backbones.probe.features import FeatureExtractor
    from backbones.probe.heads import LinearHead
    from oof.config import RunConfig
    from recipe.phases import Segment
    from recipe.tta import TTAView

log = logging.getLogger(__name__)
FEATURES_FILE = "train_features.npy"  # the fold's training features, in its work folder
HEAD_FILE = "head.npz"  # the fitted head, in the work folder until the fold is published


def timm_family() -> Family:
    """The family whose models, weights and preprocessing the probe reuses."""
    import backbones

    return backbones.get_backend("timm")


class ProbeFoldModel(FoldModel):
    """One fold: the run's frozen extractor and the head fitted on the fold's features."""

    def __init__(self, job: FoldJob) -> None:
        self.job, self.stop_training = job, False
        self.head: LinearHead | None = None
        self._extractor: FeatureExtractor | None = None
        self.feature_seconds = self.fit_seconds = 0.0

    @property
    def extractor(self) -> FeatureExtractor:
        from backbones.probe.features import extractor_for

        if self._extractor is None:
            job = self.job
            self._extractor = extractor_for(job.spec, job.checkpoint_path.parent,
                                            job.seed - job.fold, job.cfg.device)
        return self._extractor

    def views(self) -> list[TTAView]:
        """The TTA views the template predicts with: the head learns on the same features."""
        from recipe.tta import tta_views

        cfg, spec = self.job.cfg, self.job.spec
        return tta_views(cfg.tta, cfg.tta_scales, cfg.tta_augment, cfg.augment,
                         spec.input_size, self.job.seed)

    def train_features(self) -> np.ndarray:
        """From the run root's feature store (``features``), else cached in the work folder: a
        fold killed after its feature pass resumes after it."""
        x, views = self.job.x_train, self.views()
        if self.job.cfg.probe_feature_store and self.extractor.storable(x, views):
            t0 = time.perf_counter()
            feats = self.extractor.features(x, views, store=True)
            self.feature_seconds += time.perf_counter() - t0
            return feats
        path = self.job.work_dir / FEATURES_FILE
        if path.exists():
            try:
                feats = np.load(path, allow_pickle=False)
                if len(feats) == len(self.job.x_train):
                    return feats
            except (OSError, ValueError) as exc:
                log.warning("%s is damaged (%s): extracting again", path, exc)
        t0 = time.perf_counter()
        feats = self.extractor.features(x, views)
        self.feature_seconds += time.perf_counter() - t0
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, feats)
        return feats

    def fit_segment(self, segment: Segment, first_epoch: int, events: Any) -> None:
        """The probe's one 'epoch': fit the head, let the template validate and record it."""
        from backbones.probe.heads import fit_head

        if self.head is not None:  # resumed after its fit
            self.stop_training = True
            return
        job, cfg = self.job, self.job.cfg
        events.epoch_begin(first_epoch)
        feats = self.train_features()
        t0 = time.perf_counter()
        self.head = fit_head(cfg.probe_head, feats, job.y_train, len(job.classes), job.seed,
                             cfg.threads, where=f"{job.spec.name} fold {job.fold}")
        self.fit_seconds = time.perf_counter() - t0
        train = self.head.predict_proba(feats)
        self.stop_training = True  # before epoch_end: the saved memory says so
        events.epoch_end(first_epoch, {"loss": log_loss(job.y_train, train),
                                       "accuracy": accuracy(job.y_train, train)})

    def predict_views(self, images: np.ndarray, views: list[TTAView], num_classes: int,
                      family: Family) -> np.ndarray:
        """Features averaged over ``views`` (none: the image itself), then the head."""
        from recipe.tta import tta_views

        assert self.head is not None, "predict before fit"
        views = views or tta_views("none", [], 0, "none", 0, 0)
        return self.head.predict_proba(self.extractor.features(
            images, views, store=self.job.cfg.probe_feature_store))

    def predict_each_view(self, images: np.ndarray, views: list[TTAView], num_classes: int,
                          family: Family) -> tuple[np.ndarray, np.ndarray]:
        """The head on the views' mean features, and on each view's own (from the store)."""
        return (self.predict_views(images, views, num_classes, family),
                np.stack([self.predict_views(images, [v], num_classes, family) for v in views]))

    def predict_batch(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        return self.predict_views(images, [], len(self.job.classes), None)  # type: ignore[arg-type]

    def snapshot(self) -> Any:
        return self.head

    def load_weights(self, state: Any) -> None:
        self.head = state

    def recalibrate_batchnorm(self, images: np.ndarray) -> int:
        return 0  # the extractor is frozen: its statistics are the pretrained ones

    def save_resume(self, work_dir: Path, epoch: int, memory: dict[str, Any]) -> None:
        from backbones.probe.heads import save_head

        if self.head is not None:
            save_head(work_dir / HEAD_FILE, self.head, {"epoch": epoch})

    def load_resume(self, work_dir: Path, plan: FoldPlan) -> ResumePoint | None:
        """A fitted head in the work folder: the fold goes on to its predictions (the template
        reads the history back from the CSV)."""
        from backbones.probe.heads import load_head

        path = work_dir / HEAD_FILE
        if not path.exists():
            return None
        self.head = load_head(path)[0]
        return ResumePoint(next_epoch=1)

    def save_weights(self, path: Path, meta: dict[str, Any], state: Any = None) -> None:
        from backbones.probe.features import EXTRACTOR_FILE
        from backbones.probe.heads import save_head

        head = state if state is not None else self.head
        save_head(path, head, {**meta, "extractor": EXTRACTOR_FILE,
                               "feature_dim": int(head.coef.shape[1])})

    def info(self) -> dict[str, Any]:
        device = self._extractor.trainer.device if self._extractor else self.job.cfg.device
        return {"device": str(device), "probe_head": self.job.cfg.probe_head,
                "head": self.head.info if self.head is not None else None,
                "feature_seconds": self.feature_seconds, "fit_seconds": self.fit_seconds,
                "feature_passes": self._extractor.passes if self._extractor else 0}


class ProbeFamily(Family):
    """``probe/<timm model>``: see the package docstring."""

    name = "probe"
    framework = "torch"
    checkpoint_suffix = ".probe.npz"
    libraries = ("torch", "torchvision", "timm")
    load_rank = 0
    predict_dtype = np.float64
    predict_batch_size = 128
    #: the contract suite's model; lda: the quicker head (its inner CV fits 5 LDAs, not 55 logregs)
    example = ContractExample("probe/resnet10t", 32, ("--probe-head", "lda"),
                              bad=(("--head-hidden", "64"), ("--img-size", "32,48")))

    def resolve_spec(self, model_name: str, cfg: RunConfig) -> BackboneSpec:
        """The timm family's spec of ``model_name`` (name checked, preprocessing from its
        pretrained cfg), as a probe: features pooled by ``--head-pool``, no network head."""
        name = f"probe/{model_name}"
        if cfg.head_hidden:
            raise ConfigError(f"--head-hidden {cfg.head_hidden}: {name} trains no network head "
                              "(its head is --probe-head); leave --head-hidden at 0")
        if isinstance(cfg.img_size, list):
            raise ConfigError(f"--img-size {','.join(map(str, cfg.img_size))}: {name} extracts "
                              "features at one size (progressive resizing is for training)")
        try:  # batches of one are fine: nothing trains
            spec = timm_family().resolve_spec(model_name, replace(cfg, batch_size=2))
        except ConfigError as exc:
            raise ConfigError(str(exc).replace(f"timm/{model_name}", name)) from None
        if not spec.pretrained:
            log.warning("%s without --pretrained: features of a random frozen network (a "
                        "baseline, drawn from the run's training seed)", name)
        return replace(spec, name=name, family=self.name, head_dropout=0.0,
                       preprocessing=f"{spec.preprocessing}; frozen features, "
                       f"--probe-head {cfg.probe_head} per fold")

    def setup_runtime(self, cfg: RunConfig, seed: int) -> None:
        timm_family().setup_runtime(cfg, seed)

    def versions(self) -> dict[str, str]:
        return timm_family().versions()

    def build(self, job: FoldJob, plan: FoldPlan) -> FoldModel:
        return ProbeFoldModel(job)

    def tensorboard_writer(self, path: Path) -> Any:
        return timm_family().tensorboard_writer(path)

    def lr_range_test(self, job: FoldJob, lrs: np.ndarray) -> list[float]:
        raise ConfigError(f"--lr-find: {job.spec.name} trains no network (its head is fitted "
                          "by scikit-learn): there is no learning rate to find")

    def read_checkpoint_meta(self, path: Path) -> dict[str, Any]:
        from backbones.probe.heads import read_head_meta

        return read_head_meta(path)

    def passes_per_image(self, models: int, views: int) -> int:
        """One extractor pass per view, whatever the number of fold heads reading it."""
        return views

    def run_files(self, run_meta: dict[str, Any]) -> list[str]:
        """Beside the fold heads, a run's predictor needs its frozen extractor."""
        from backbones.probe.features import EXTRACTOR_FILE

        return [EXTRACTOR_FILE]

    def load_run_predictor(self, run_meta: dict[str, Any], checkpoints: list[Path],
                           threads: int | None = None, device: str = "cpu") -> Any:
        """All K heads on one feature pass per image (``predictor.ProbeRunPredictor``)."""
        from backbones.probe.predictor import load_run_predictor

        return load_run_predictor(run_meta, checkpoints, threads, device)

    def load_predictor(self, run_meta: dict[str, Any], checkpoint: Path,
                       threads: int | None = None, device: str = "cpu") -> Any:
        """One fold: the run predictor of that fold's head alone."""
        return self.load_run_predictor(run_meta, [checkpoint], threads, device).fold(0)
