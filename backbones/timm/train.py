"""The timm fold model: one fold's model, optimiser and epoch loop, behind ``backbones.fold``'s
``FoldModel`` hooks (the template runs the fold; this module trains the epochs it is given).

The loop is deliberately small (AdamW, warmup + cosine/one-cycle per step, label smoothing, AMP on
GPU). Images arrive as uint8 arrays from the decoded-image cache and are normalised on the device,
so the loop never touches a file.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from backbones.base import BackboneSpec, FoldJob
from backbones.fold import FoldEvents, FoldModel, FoldPlan, ResumePoint, predict_views
from backbones.timm import optim
from backbones.timm.batchnorm import recalibrate_batchnorm
from backbones.timm.data import make_loader
from backbones.timm.model import create_model, pick_device, training_batchnorms
from oof.config import RunConfig
from recipe import plan_phases
from recipe.augment import batch_rng, mix_batch
from recipe.batches import check_train_batches
from recipe.losses import class_weight_vector
from recipe.phases import Phase, Segment

if TYPE_CHECKING:
    from recipe.tta import TTAView

PREDICT_BATCH = 256  # images per forward pass when predicting
PREDICT_DTYPE = np.float32  # the views' softmax outputs are summed in float32


@dataclass
class Trainer(FoldModel):
    """One fold's model, optimiser and loop; ``stop_training`` is the callbacks' brake."""

    model: nn.Module
    spec: BackboneSpec
    cfg: RunConfig
    device: torch.device
    steps_per_epoch: int
    seed: int = 0  # of the per-batch mixing draws
    class_weights: np.ndarray | None = None  # recipe.class_weight_vector of the fold
    stop_training: bool = False

    def __post_init__(self) -> None:
        cfg = self.cfg
        self.model.to(self.device)
        if self.device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.phase: Phase | None = None
        self.global_step = 0
        self.ema = None
        if cfg.ema:  # timm's EMA of the weights, warming up so that short runs benefit too
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=True)
        self.weight_of_class = (None if self.class_weights is None else
                                torch.as_tensor(self.class_weights, device=self.device))
        use_amp = cfg.amp and self.device.type == "cuda"
        self.amp_dtype = (torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported()
                          else torch.float16 if use_amp else None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.mean = torch.tensor(self.spec.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(self.spec.std, device=self.device).view(1, 3, 1, 1) * 255
        self.loaders: dict[int, torch.utils.data.DataLoader] = {}  # training batches per size
        self.job: FoldJob | None = None

    def loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """``optim.recipe_loss`` with the fold's config and class weights."""
        return optim.recipe_loss(logits, target, self.cfg, self.weight_of_class)

    @property
    def predict_model(self) -> nn.Module:
        """The weights that predict: the EMA of the weights when ``ema`` is on."""
        return self.ema.module if self.ema is not None else self.model

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Put a ``snapshot()`` back (best epoch, early stopping)."""
        self.predict_model.load_state_dict(state)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the weights, for ``BestWeights``."""
        return {k: v.detach().to("cpu", copy=True)
                for k, v in self.predict_model.state_dict().items()}

    def start_phase(self, phase: Phase) -> None:
        """Freeze or unfreeze the backbone, then a fresh optimiser and LR curve for ``phase``."""
        optim.set_trainable(self.model, phase, self.backbone_batchnorms())
        self.optimizer = optim.make_optimizer(self.model, self.cfg, phase, self.device)
        self.scheduler = optim.make_scheduler(self.optimizer, self.cfg, phase,
                                              self.steps_per_epoch)
        self.phase = phase

    def backbone_batchnorms(self) -> list[nn.Module]:
        """The backbone's BatchNorm layers (a hidden head layer's own BatchNorm excluded)."""
        head = set(self.model.get_classifier().modules())
        return [m for m in self.model.modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in head]

    def check_batches(self, job: FoldJob, phases: list[Phase]) -> None:
        """Refuse training batches of one image when BatchNorm trains (``recipe.batches``)."""
        check_train_batches(len(job.x_train), self.cfg.batch_size,
                            len(training_batchnorms(self.model, phases)), job.spec.name,
                            job.fold)

    def train_mode(self) -> None:
        """Training mode, but a frozen backbone (head phase) stays in inference mode: its
        BatchNorm statistics and dropout are part of what the head learns on; frozen
        BatchNorm layers (``freeze_bn``) stay in inference mode in every phase."""
        if self.phase is not None and not self.phase.train_backbone:
            self.model.eval()
            self.model.get_classifier().train()
            return
        self.model.train()
        for bn in self.backbone_batchnorms() if self.phase and self.phase.freeze_bn else ():
            bn.eval()

    def to_input(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        """NHWC uint8 -> normalised NCHW float on the device."""
        x = batch_uint8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def step(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on a batch; returns its logits and loss."""
        with self._autocast():
            logits = self.model(x)
            loss = self.loss_fn(logits, target)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return logits, loss

    def train_epoch(self, loader: Any, epoch: int) -> dict[str, float]:
        """One pass over ``loader`` (mixup/cutmix drawn per batch from (seed, epoch, batch))."""
        from tqdm.auto import tqdm

        self.train_mode()
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=not self.cfg.progress, total=len(loader), unit="batch")
        cfg = self.cfg
        eye = np.eye(self.model.num_classes, dtype=np.float32)
        for b, (images, labels) in enumerate(bar):
            target = labels if labels.ndim == 2 else None  # --distill-from: soft targets
            if labels.ndim == 2:  # accuracy: agreement with the target's top class
                labels = labels.argmax(1)
            if cfg.mixup_alpha or cfg.cutmix_alpha:  # soft targets; CrossEntropyLoss takes them
                rows = eye[labels.numpy()] if target is None else target.numpy()
                mixed, soft = mix_batch(images.numpy(), rows, cfg.mixup_alpha,
                                        cfg.cutmix_alpha, cfg.mix_prob,
                                        batch_rng(self.seed, epoch, b))
                images, target = torch.from_numpy(mixed), torch.from_numpy(soft)
            x, y = self.to_input(images), labels.to(self.device, non_blocking=True)
            logits, loss = self.step(x, y if target is None else target.to(self.device))
            self.scheduler.step()
            self.global_step += 1
            if self.ema is not None:
                self.ema.update(self.model, step=self.global_step)
            n = len(y)
            total_loss += loss.item() * n
            correct += int((logits.argmax(1) == y).sum())
            seen += n
            bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.4f}",
                            refresh=False)  # drawn at tqdm's own pace, not at every step
        return {"loss": total_loss / max(seen, 1), "accuracy": correct / max(seen, 1),
                "lr": max(g["lr"] for g in self.optimizer.param_groups)}

    # ----------------------------------------------------------------- FoldModel hooks

    def loader_at(self, size: int) -> torch.utils.data.DataLoader:
        """The fold's training batches at ``size`` px (progressive resizing: one per size)."""
        job = self.job
        if job is None:
            raise RuntimeError("this Trainer was not built for a fold (family.build)")
        if size not in self.loaders:
            self.loaders[size] = make_loader(job.train_images(size), job.train_targets(),
                                             self.cfg, job.seed, self.device)
        return self.loaders[size]

    def fit_segment(self, segment: Segment, first_epoch: int, events: FoldEvents) -> None:
        """The segment's epochs from ``first_epoch``, each ending in the template's event."""
        if self.phase is None or self.phase.name != segment.phase.name:
            self.start_phase(segment.phase)
        loader = self.loader_at(segment.size)
        for epoch in range(first_epoch, segment.first_epoch + segment.epochs):
            events.epoch_begin(epoch)
            loader.sampler.set_epoch(epoch)
            if events.epoch_end(epoch, self.train_epoch(loader, epoch)):
                return

    def before_predict(self) -> None:
        self.predict_model.eval()

    @torch.no_grad()
    def predict_batch(self, images: np.ndarray, batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Softmax of one view of one batch, float32 (summed over views in float32)."""
        x = self.to_input(torch.from_numpy(images))
        with self._autocast():
            return self.predict_model(x).float().softmax(1).cpu().numpy()

    def predict(self, images: np.ndarray, views: list[TTAView] | None = None,
                batch_size: int = PREDICT_BATCH) -> np.ndarray:
        """Class probabilities for uint8 images, averaged over the test-time ``views``."""
        self.before_predict()
        return predict_views(images, views or [], self.predict_batch,
                             self.predict_model.num_classes, batch_size, PREDICT_DTYPE)

    def recalibrate_batchnorm(self, images: np.ndarray, chunk: int | None = None) -> int:
        """Precise BatchNorm of the predicting weights (``batchnorm.recalibrate_batchnorm``)."""
        return recalibrate_batchnorm(self.predict_model, self.model, images, self.to_input,
                                     self._autocast, chunk)

    def save_resume(self, work_dir: Path, epoch: int, memory: dict[str, Any]) -> None:
        from backbones.timm.resume import RESUME_FILE, save_resume_state

        save_resume_state(work_dir / RESUME_FILE, self, epoch, memory)

    def load_resume(self, work_dir: Path, plan: FoldPlan) -> ResumePoint | None:
        from backbones.timm.resume import RESUME_FILE, load_resume_state, restore

        state = load_resume_state(work_dir / RESUME_FILE)
        if state is None:
            return None
        restore(self, state, plan.phases)
        return ResumePoint(int(state["next_epoch"]), {
            "history": state["history"], "stop_training": state["stop_training"],
            "callbacks": state["callbacks"]})

    def save_weights(self, path: Path, meta: dict[str, Any], state: Any = None) -> None:
        from backbones.timm.serving import save_checkpoint

        model = self.predict_model
        if state is not None:
            model = copy.deepcopy(model)
            model.load_state_dict(state)
        save_checkpoint(path, model, meta)

    def info(self) -> dict[str, Any]:
        return {"device": str(self.device), "amp": str(self.amp_dtype)}


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_runtime(cfg: RunConfig, seed: int) -> None:
    """torch's thread count, then every generator seeded from the fold's seed."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(seed)


def new_trainer(job: FoldJob, steps_per_epoch: int) -> Trainer:
    """The fold's model with a fresh head, in its first phase (after ``setup_runtime``)."""
    cfg = job.cfg
    model = create_model(job.spec, len(job.classes))
    trainer = Trainer(model, job.spec, cfg, pick_device(cfg), steps_per_epoch, job.seed,
                      class_weight_vector(cfg.class_weights, job.classes, job.y_train))
    trainer.start_phase(plan_phases(cfg)[0])
    return trainer


def build_trainer(job: FoldJob, steps_per_epoch: int) -> Trainer:
    """``setup_runtime`` then ``new_trainer``: a fold's trainer outside the template."""
    setup_runtime(job.cfg, job.seed)
    return new_trainer(job, steps_per_epoch)


def build(job: FoldJob, plan: FoldPlan) -> Trainer:
    """The family's ``build`` hook: the fold's loader at its size and its trainer, with
    training batches of one refused where BatchNorm trains."""
    loader = make_loader(job.x_train, job.train_targets(), job.cfg, job.seed,
                         pick_device(job.cfg))
    trainer = new_trainer(job, len(loader))
    trainer.job, trainer.loaders = job, {job.spec.input_size: loader}
    trainer.check_batches(job, plan.phases)
    return trainer


def lr_range_test(job: FoldJob, lrs: np.ndarray) -> list[float]:
    """The training loss of one batch per learning rate in ``lrs`` (the LR range test).

    It ramps the phase that trains every layer (layer-wise scales included), from the fold's
    initial weights, so the suggestion is for ``--lr``.
    """
    cfg = job.cfg
    device = pick_device(cfg)
    loader = make_loader(job.x_train, job.y_train, cfg, job.seed, device)
    trainer = build_trainer(job, len(loader))
    trainer.check_batches(job, plan_phases(cfg)[-1:])
    trainer.start_phase(plan_phases(cfg)[-1])
    trainer.model.train()
    losses: list[float] = []
    epoch = 0
    while len(losses) < len(lrs):
        loader.sampler.set_epoch(epoch)
        for images, labels in loader:
            if len(losses) == len(lrs):
                break
            for g in trainer.optimizer.param_groups:
                g["lr"] = float(lrs[len(losses)]) * g.get("lr_scale", 1.0)
            _, loss = trainer.step(trainer.to_input(images), labels.to(device))
            losses.append(float(loss.item()))
            if not math.isfinite(losses[-1]):
                return losses + [math.inf] * (len(lrs) - len(losses))
        epoch += 1
    return losses


def tensorboard_writer(path: Path) -> Any:
    """torch's own ``SummaryWriter``, kept free of TensorFlow.

    TensorBoard imports TensorFlow whenever it is installed (it is, for the Keras family),
    which would put both frameworks in one process; the ``tensorboard.compat.notf`` marker
    module is the switch TensorBoard's TensorFlow-free build uses to pick its stub instead.
    """
    import sys
    import types

    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))
