"""timm backbones: build, train one fold, predict with TTA. The only module that imports torch.

The loop is deliberately small (AdamW, warmup + cosine/one-cycle per step, label smoothing, AMP on
GPU) and its hooks carry Keras' names (``backbones.callbacks``). Images arrive as uint8 arrays from
the decoded-image cache and are normalised on the device, so the loop never touches a file.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from backbones import close_names
from backbones.base import BackboneSpec, FoldJob, FoldResult
from backbones.callbacks import (
    BestWeights,
    Callback,
    CSVLogger,
    TerminateOnNaN,
    trim_history,
    user_callbacks,
)
from oof.atomic import atomic_path
from oof.config import RunConfig
from oof.errors import ConfigError
from oof.metrics import accuracy, log_loss
from recipe.augment import SeededAugment, batch_rng, build_seeded_augment, epoch_order, mix_batch
from recipe.tta import TTAView, tta_views
from recipe import lr_factor, phase_lengths, plan_phases, plan_sizes, size_of
from recipe.batches import PooledMoments, bn_chunks, check_batch_size, check_train_batches
from recipe.losses import class_weight_vector
from recipe.phases import Phase, phase_of

log = logging.getLogger(__name__)
FRAMEWORK = "torch"
# optimizers torch runs as one fused kernel per step on CPU and CUDA: resnet10t's AdamW step took
# 3.2 ms fused against 15.6 ms in torch's default per-tensor loop on a CPU (foreach: 13.3 ms)
FUSED_OPTIMIZERS = frozenset({"adam", "adamw", "sgd"})


def versions() -> dict[str, str]:
    import torchvision

    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__}


def resolve_spec(model_name: str, cfg: RunConfig) -> BackboneSpec:
    """Check the name against timm's registry and read its preprocessing from the pretrained cfg."""
    if not timm.is_model(model_name):
        raise ConfigError(
            f"--backbone timm/{model_name}: timm has no such model; closest: "
            f"{close_names(model_name, timm.list_models())}"
        )
    if cfg.pretrained not in ("", "auto") and not Path(cfg.pretrained).expanduser().is_file():
        # checked here, before images are decoded or the run folder is written
        raise ConfigError(f"--pretrained {cfg.pretrained}: no such weights file")
    user_callbacks(cfg.callbacks)  # unknown names fail before any work
    pcfg = timm.get_pretrained_cfg(model_name)
    default_size = pcfg.input_size[-1] if pcfg and pcfg.input_size else 224
    mean = tuple(pcfg.mean) if pcfg else (0.485, 0.456, 0.406)
    std = tuple(pcfg.std) if pcfg else (0.229, 0.224, 0.225)
    spec = BackboneSpec(
        name=f"timm/{model_name}", family="timm", framework=FRAMEWORK, model_name=model_name,
        input_size=int(cfg.final_img_size or default_size), mean=mean, std=std,  # type: ignore[arg-type]
        preprocessing=f"x/255, minus mean {mean}, divided by std {std} (timm pretrained cfg)",
        pretrained=cfg.pretrained, **BackboneSpec.head_options(cfg),
    )
    if cfg.batch_size < 2:  # the model's structure decides (no weights loaded)
        model = create_model(replace(spec, pretrained=""), 2)
        check_batch_size(cfg.batch_size, len(training_batchnorms(model, plan_phases(cfg))),
                         spec.name)
    return spec


def create_model(spec: BackboneSpec, num_classes: int) -> nn.Module:
    """Build the model with a fresh head; weights from scratch, timm's cache, or a local file.

    The run's image size goes to timm too: ViT, Swin and other models with position embeddings
    or fixed windows are built for it (and pretrained embeddings resampled); convolutional nets
    take no ``img_size`` and work at any size.
    """
    source = spec.pretrained
    kwargs: dict[str, Any] = {"num_classes": num_classes, "global_pool": spec.head_pool,
                              "drop_rate": spec.head_dropout}
    if spec.drop_path:
        kwargs["drop_path_rate"] = spec.drop_path
    if source not in ("", "auto"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(f"--pretrained {source}: no such weights file")
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
    try:
        model = _with_hidden_layer(_create_at_size(spec, pretrained=bool(source), **kwargs), spec)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - timm raises many types for "no weights"
        if not source:
            raise
        where = source if source != "auto" else "the Hugging Face / torch hub cache or online"
        raise ConfigError(
            f"--pretrained {source}: could not load weights for timm/{spec.model_name} from "
            f"{where} ({type(exc).__name__}: {str(exc)[:300]}). Offline, pass a local file: "
            "--pretrained /path/to/model.safetensors (or .pth / .bin)"
        ) from exc
    if source:
        _zero_new_head(model)
    return model


def _zero_new_head(model: nn.Module) -> None:
    """Start the new head's last layer at zero on pretrained features.

    timm initialises a fresh classifier for training from scratch: on pretrained EfficientNet
    features its logits start with a standard deviation near 3 (first-epoch loss 8-10 on 8
    classes), and those large early gradients flow into the backbone. A zero last layer starts
    at the uniform prediction (loss ln C) and still gets full gradients, as BiT does.
    """
    head = model.get_classifier()
    last = head[-1] if isinstance(head, nn.Sequential) else head
    if isinstance(last, nn.Linear):
        with torch.no_grad():
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


def _with_hidden_layer(model: nn.Module, spec: BackboneSpec) -> nn.Module:
    """Replace timm's linear classifier by Linear-BatchNorm-activation-dropout-Linear when
    ``head_hidden`` asks for one (timm's pooling and pre-logits dropout stay in place)."""
    if not spec.head_hidden:
        return model
    old = model.get_classifier()
    if not isinstance(old, nn.Linear):
        raise ConfigError(f"--head-hidden: timm/{spec.model_name}'s classifier is a "
                          f"{type(old).__name__}, not a Linear layer to extend")
    head = nn.Sequential(
        nn.Linear(old.in_features, spec.head_hidden), nn.BatchNorm1d(spec.head_hidden),
        ACTIVATIONS[spec.head_activation](), nn.Dropout(spec.head_dropout),
        nn.Linear(spec.head_hidden, old.out_features))
    path = model.pretrained_cfg.get("classifier") or ""
    parent_name, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if getattr(parent, attr, None) is not old:
        raise ConfigError(f"--head-hidden: cannot find timm/{spec.model_name}'s classifier")
    setattr(parent, attr, head)
    return model


def _create_at_size(spec: BackboneSpec, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with ``img_size`` where the model takes one; a model without
    stochastic depth refuses ``--drop-path`` clearly."""
    try:
        return _create_sized(spec, **kwargs)
    except TypeError as exc:
        if "drop_path_rate" in str(exc):
            raise ConfigError(f"--drop-path {spec.drop_path}: timm/{spec.model_name} has no "
                              "stochastic depth (drop_path_rate); leave --drop-path at 0") from exc
        raise


def _create_sized(spec: BackboneSpec, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(spec.model_name, img_size=spec.input_size, **kwargs)
    except TypeError as exc:
        if "img_size" not in str(exc):
            raise
    except (AssertionError, ValueError, RuntimeError) as exc:
        if "size" in str(exc).lower() or "divisible" in str(exc).lower():
            raise ConfigError(f"--img-size {spec.input_size}: timm/{spec.model_name} cannot be "
                              f"built at this size ({type(exc).__name__}: {str(exc)[:200]})"
                              ) from exc
        raise
    return timm.create_model(spec.model_name, **kwargs)


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


class ArrayDataset(torch.utils.data.Dataset):
    """uint8 HWC images in memory (or memory-mapped) with a seeded albumentations transform.

    Item ``epoch * len(self) + i`` is image ``i`` as augmented in epoch ``epoch`` (see
    ``EpochSampler``), in the batch of rows it comes with: the draw depends on nothing else, so
    workers and order do not matter.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray,
                 augment: SeededAugment | None) -> None:
        self.images, self.augment = images, augment
        self.labels = np.asarray(labels, dtype=np.int64)  # once, not per batch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> tuple[torch.Tensor, int]:
        images, labels = self.__getitems__([key])
        return images[0], int(labels[0])

    def __getitems__(self, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole batch in one call (torch's batched fetch): one gather from the cache, one
        seeding of the augmentation (``SeededAugment.batch``), no per-image collation.
        ``EpochSampler`` never mixes epochs in a batch."""
        epoch = int(keys[0]) // len(self.images)
        rows = np.asarray(keys, dtype=np.int64) - epoch * len(self.images)
        x = self.images[rows]  # fancy indexing: a writable copy of the read-only memmap rows
        if self.augment is not None:
            x = self.augment.batch(x, epoch, rows)
        return (torch.from_numpy(np.ascontiguousarray(x)),
                torch.from_numpy(self.labels[rows]))


def collated(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The DataLoader's collate step: ``ArrayDataset.__getitems__`` made the batch already."""
    return batch


class EpochSampler(torch.utils.data.Sampler[int]):
    """A permutation per epoch from (seed, epoch) alone, yielding ``epoch * n + i`` keys.

    ``set_epoch`` before each epoch (as with DistributedSampler): a resumed fold then replays
    exactly the batches an uninterrupted one would have seen.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self):  # noqa: ANN204 - Sampler protocol
        return iter((epoch_order(self.n, self.seed, self.epoch) + self.epoch * self.n).tolist())


@dataclass
class Trainer:
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

    def loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The recipe's loss (recipe/losses.py): ``mean_i w_i * l_i`` with smoothed targets,
        ``l_i`` cross-entropy or focal, ``w_i`` the target's class weight; hard (class index)
        or soft (mixed) targets."""
        cfg = self.cfg
        logits = logits.float()
        if target.ndim == 1:
            target = nn.functional.one_hot(target, logits.shape[1]).to(logits.dtype)
        smooth = target * (1.0 - cfg.label_smoothing) + cfg.label_smoothing / logits.shape[1]
        log_p = nn.functional.log_softmax(logits, dim=1)
        if cfg.loss == "focal":
            log_p = log_p * (1.0 - log_p.exp()).pow(cfg.focal_gamma)
        per_image = -(smooth * log_p).sum(dim=1)
        if self.weight_of_class is not None:
            per_image = per_image * (target @ self.weight_of_class)
        return per_image.mean()

    @property
    def predict_model(self) -> nn.Module:
        """The weights that predict: the EMA of the weights when ``ema`` is on."""
        return self.ema.module if self.ema is not None else self.model

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Put a ``snapshot()`` back (best epoch, early stopping)."""
        self.predict_model.load_state_dict(state)

    def start_phase(self, phase: Phase) -> None:
        """Freeze or unfreeze the backbone, then a fresh optimiser and LR curve for ``phase``.

        timm's ``create_optimizer_v2`` makes the parameter groups (no weight decay on biases and
        norms; with ``layer_decay`` one group per layer depth with its ``lr_scale``), and skips
        frozen parameters, so the head phase optimises the head alone. Adam, AdamW and SGD run
        torch's fused kernels (``FUSED_OPTIMIZERS``).
        """
        from timm.optim import create_optimizer_v2

        cfg = self.cfg
        head = {id(p) for p in self.model.get_classifier().parameters()}
        for p in self.model.parameters():
            p.requires_grad_(phase.train_backbone or id(p) in head)
        for bn in self.backbone_batchnorms() if phase.freeze_bn else ():
            for p in bn.parameters():
                p.requires_grad_(False)
        self.optimizer = create_optimizer_v2(
            self.model, opt=cfg.optimizer, lr=phase.lr, weight_decay=cfg.weight_decay,
            momentum=0.9, layer_decay=phase.layer_decay,
            **({"fused": True} if cfg.optimizer in FUSED_OPTIMIZERS
               and self.device.type in ("cpu", "cuda") else {}))
        total, warmup = phase_lengths(phase.epochs, phase.warmup_epochs, self.steps_per_epoch)
        curves = [functools.partial(_scaled_factor, g.get("lr_scale", 1.0), total, warmup,
                                    cfg.schedule) for g in self.optimizer.param_groups]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, curves)
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

    def train_epoch(self, loader: Any, epoch: int) -> dict[str, float]:
        from tqdm.auto import tqdm

        self.train_mode()
        total_loss, correct, seen = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", leave=False,
                   disable=not self.cfg.progress, total=len(loader), unit="batch")
        cfg = self.cfg
        eye = np.eye(self.model.num_classes, dtype=np.float32)
        for b, (images, labels) in enumerate(bar):
            target = None
            if cfg.mixup_alpha or cfg.cutmix_alpha:  # soft targets; CrossEntropyLoss takes them
                mixed, soft = mix_batch(images.numpy(), eye[labels.numpy()], cfg.mixup_alpha,
                                        cfg.cutmix_alpha, cfg.mix_prob,
                                        batch_rng(self.seed, epoch, b))
                images, target = torch.from_numpy(mixed), torch.from_numpy(soft)
            x, y = self.to_input(images), labels.to(self.device, non_blocking=True)
            with self._autocast():
                logits = self.model(x)
                loss = self.loss_fn(logits, y if target is None else target.to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
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

    @torch.no_grad()
    def recalibrate_batchnorm(self, images: np.ndarray, chunk: int | None = None) -> int:
        """Precise BatchNorm: running statistics become those of ``images``, each image
        weighing the same (``recipe.batches``: chunks of ``BN_CHUNK``, never of one image).

        The same fix as ``backbones.keras_backend.recalibrate_batchnorm`` (see why there). Each
        chunk's statistics are read with momentum 1 and pooled by their value counts, spread of
        the chunk means included (``PooledMoments``), so a short last chunk counts by its images
        and a layer's running mean and variance are those of all its inputs at once. Every
        other module stays in eval mode, so dropout and drop-path do not shift the statistics.
        BatchNorm layers whose weights are frozen keep their statistics, and so does every
        layer when there are fewer than 2 images. Returns the count of layers recalibrated.
        """
        model = self.predict_model
        # frozen as the trained model says: the EMA copy (``ema``) kept its flags from the start
        frozen = {name for name, m in self.model.named_modules()
                  if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and m.weight is not None and not m.weight.requires_grad}
        bns = [m for name, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats and name not in frozen]
        chunks = bn_chunks(len(images), chunk)
        if not bns or not chunks:
            return 0
        model.eval()
        momenta = [m.momentum for m in bns]
        values: dict[nn.Module, int] = {}  # values per channel of the chunk, per layer

        def count(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            values[module] = inputs[0].numel() // inputs[0].shape[1]

        hooks = [m.register_forward_pre_hook(count) for m in bns]
        pooled = {m: PooledMoments() for m in bns}
        for m in bns:
            m.reset_running_stats()
            m.momentum = 1.0  # running statistics := this chunk's
            m.train()
        try:
            for start, stop in chunks:
                x = self.to_input(torch.from_numpy(np.array(images[start:stop])))
                with self._autocast():
                    model(x)
                for m in bns:
                    c = values[m]  # torch's running_var is unbiased: back to the biased one
                    pooled[m].add(c, m.running_mean.double().cpu().numpy(),
                                  m.running_var.double().cpu().numpy() * ((c - 1) / c))
            if len(chunks) > 1:  # one chunk: torch's own statistics are already exact
                for m in bns:
                    m.running_mean.copy_(torch.from_numpy(pooled[m].mean))
                    m.running_var.copy_(torch.from_numpy(pooled[m].unbiased_var))
        finally:
            for hook in hooks:
                hook.remove()
            for m, momentum in zip(bns, momenta):
                m.momentum = momentum
            model.eval()
        return len(bns)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the weights, for ``BestWeights``."""
        return {k: v.detach().to("cpu", copy=True)
                for k, v in self.predict_model.state_dict().items()}

    @torch.no_grad()
    def predict(self, images: np.ndarray, views: list[TTAView] | None = None,
                batch_size: int = 256) -> np.ndarray:
        """Class probabilities for uint8 images, averaged over the test-time ``views``."""
        model = self.predict_model
        model.eval()
        views = views or tta_views("none", [], 0, "none", 0, 0)
        out = []
        for start in range(0, len(images), batch_size):
            batch = np.array(images[start:start + batch_size])
            rows = np.arange(start, start + len(batch))
            probs = 0
            for view in views:
                x = self.to_input(torch.from_numpy(view(batch, rows)))
                with self._autocast():
                    probs = probs + model(x).float().softmax(1)
            out.append((probs / len(views)).cpu().numpy().astype(np.float64))
        if not out:
            return np.zeros((0, model.num_classes), dtype=np.float64)
        probs = np.concatenate(out)
        return probs / probs.sum(axis=1, keepdims=True)


def training_batchnorms(model: nn.Module, phases: list[Phase]) -> list[nn.Module]:
    """The BatchNorm layers that normalise by batch statistics in some of ``phases``: a hidden
    head layer's always, the backbone's unless every phase that trains the backbone freezes
    them (``freeze_bn``)."""
    head = set(model.get_classifier().modules())
    backbone = any(p.train_backbone and not p.freeze_bn for p in phases)
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (backbone or m in head)]


def _scaled_factor(scale: float, total: int, warmup: int, schedule: str, step: int) -> float:
    """``lr_factor`` times a parameter group's layer-decay scale (picklable for LambdaLR)."""
    return scale * lr_factor(step, total, warmup, schedule)


def make_loader(images: np.ndarray, labels: np.ndarray, cfg: RunConfig, seed: int,
                device: torch.device) -> torch.utils.data.DataLoader:
    """The fold's training batches, augmented where the step runs unless workers pay off.

    On a CPU the batches are made between steps on the main thread: a worker process, or a
    background thread overlapping augmentation with compute, takes turns with torch's compute
    threads for the cores (and the GIL) and lost more than it hid: on 2 cores the timm loop ran
    at 0.946x the bare loop with a prefetch thread, 0.975x without (per-tensor AdamW; mean of 12
    paired rounds with a bare loop, while OpenCV still ran its own pool, see ``augment.opencv``);
    the light preset and the DataLoader cost 0.8 ms a batch of 64 32 px images.
    On a GPU the step runs asynchronously, so the main thread makes the next batch meanwhile,
    or worker processes do where there are more than 2 cores.
    """
    workers = cfg.num_workers
    if workers is None:
        cores = os.cpu_count() or 1
        workers = 0 if cores <= 2 or device.type == "cpu" else min(8, cores - 1)
    # the batches of recipe.batches.train_batches: full ones, or one of every row
    return torch.utils.data.DataLoader(
        ArrayDataset(images, labels, build_seeded_augment(cfg.augment, images.shape[1], seed)),
        batch_size=cfg.batch_size, sampler=EpochSampler(len(images), seed),
        collate_fn=collated, drop_last=len(images) > cfg.batch_size, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=workers > 0,
    )


def save_checkpoint(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Weights with their metadata inside (like timm's CheckpointSaver), written atomically.

    safetensors, not ``torch.save``: a server loads these files, and a pickle can run code on
    load; the metadata travels as JSON in the safetensors header (``read_checkpoint_meta``).
    """
    from safetensors.torch import save_model

    with atomic_path(path) as tmp:
        save_model(model, str(tmp), metadata={"foldstack": json.dumps(meta, default=str)})


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_trainer(job: FoldJob, steps_per_epoch: int) -> Trainer:
    cfg = job.cfg
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(job.seed)
    device = pick_device(cfg)
    model = create_model(job.spec, len(job.classes))
    trainer = Trainer(model, job.spec, cfg, device, steps_per_epoch, job.seed,
                      class_weight_vector(cfg.class_weights, job.classes, job.y_train))
    trainer.start_phase(plan_phases(cfg)[0])
    return trainer


RESUME_FILE = "resume.pt"


def save_resume_state(path: Path, trainer: Trainer, epoch: int, history: list[dict[str, Any]],
                      callbacks: list[Callback]) -> None:
    """Everything the next epoch depends on, written atomically at the end of each epoch:
    weights, optimiser, LR curve, grad scaler, the callbacks' memory and torch's RNG."""
    state = {
        "next_epoch": epoch + 1, "phase": trainer.phase.name if trainer.phase else None,
        "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
        "history": history, "stop_training": trainer.stop_training,
        "global_step": trainer.global_step,
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "callbacks": [{k: v for k, v in vars(cb).items() if k != "trainer"} for cb in callbacks],
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_resume_state(path: Path) -> dict[str, Any] | None:
    """The state of a killed fold, or None (none saved, or damaged: the fold starts over)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        if not isinstance(state, dict) or "next_epoch" not in state:
            raise ValueError("not a foldstack resume state")
        return state
    except Exception as exc:  # noqa: BLE001 - a damaged file fails in many ways
        log.warning("%s is damaged (%s: %s): the fold starts over", path, type(exc).__name__,
                    str(exc)[:200])
        path.unlink(missing_ok=True)
        return None


def _restore(trainer: Trainer, state: dict[str, Any], phases: list[Phase],
             callbacks: list[Callback]) -> None:
    trainer.model.load_state_dict(state["model"])
    trainer.start_phase(next(p for p in phases if p.name == state["phase"]))
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.stop_training = state["stop_training"]
    trainer.global_step = state["global_step"]
    if trainer.ema is not None:
        trainer.ema.load_state_dict(state["ema"])
    for cb, saved in zip(callbacks, state["callbacks"], strict=True):
        vars(cb).update(saved)
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def tensorboard_writer(path: Path) -> Any:
    """torch's own ``SummaryWriter``, kept free of TensorFlow.

    TensorBoard imports TensorFlow whenever it is installed (it is, for the Keras backend),
    which would put both frameworks in one process; the ``tensorboard.compat.notf`` marker
    module is the switch TensorBoard's TensorFlow-free build uses to pick its stub instead.
    """
    import sys
    import types

    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(path))


def train_fold(job: FoldJob, callbacks: list[Callback] | None = None) -> FoldResult:
    """Train on the fold's training rows, then predict its held-out rows and the test set.

    The loop saves its full state after every epoch in the fold's work folder; a killed fold
    resumes from the last finished epoch and ends exactly as an uninterrupted one would.
    """
    cfg = job.cfg
    t0 = time.perf_counter()
    device = pick_device(cfg)
    loader = make_loader(job.x_train, job.y_train, cfg, job.seed, device)
    phases = plan_phases(cfg)
    stages = plan_sizes(cfg, job.spec.input_size)
    loaders = {job.spec.input_size: loader}  # progressive resizing: one loader per size
    trainer = build_trainer(job, len(loader))
    trainer.check_batches(job, phases)
    resume_path = job.work_dir / RESUME_FILE
    state = load_resume_state(resume_path)
    best = BestWeights("val_loss")
    callbacks = [CSVLogger(job.history_path, append=state is not None), TerminateOnNaN(), best,
                 *user_callbacks(cfg.callbacks), *(callbacks or [])]
    for cb in callbacks:
        cb.set_trainer(trainer)
        cb.on_train_begin({})
    history: list[dict[str, Any]] = []
    first_epoch = 0
    if state is not None:
        _restore(trainer, state, phases, callbacks)
        history, first_epoch = list(state["history"]), int(state["next_epoch"])
        trim_history(job.history_path, first_epoch)
        log.info("fold %d: resuming after epoch %d from %s", job.fold, first_epoch,
                 resume_path)
    startup = time.perf_counter() - t0
    writer = tensorboard_writer(job.tensorboard_dir) if job.tensorboard_dir else None
    for epoch in range(first_epoch, cfg.epochs):
        if trainer.stop_training:
            break
        e0 = time.perf_counter()
        phase = phase_of(phases, epoch)
        if phase is not trainer.phase:
            trainer.start_phase(phase)
            log.info("fold %d: phase %r from epoch %d, %s", job.fold, phase.name, epoch + 1,
                     "every layer" + (f", layer decay {phase.layer_decay}"
                                      if phase.layer_decay else "")
                     if phase.train_backbone else "head only, backbone frozen")
        for cb in callbacks:
            cb.on_epoch_begin(epoch, {})
        size = size_of(stages, epoch)
        if size not in loaders:
            loaders[size] = make_loader(job.train_images(size), job.y_train, cfg, job.seed,
                                        device)
        if len(stages) > 1 and (epoch == first_epoch or size != size_of(stages, epoch - 1)):
            log.info("fold %d: training at %dpx from epoch %d", job.fold, size, epoch + 1)
        loader = loaders[size]
        loader.sampler.set_epoch(epoch)
        logs = trainer.train_epoch(loader, epoch)
        if len(stages) > 1:
            logs["img_size"] = size
        val = trainer.predict(job.x_val)
        seconds = time.perf_counter() - e0
        logs.update(val_loss=log_loss(job.y_val, val), val_accuracy=accuracy(job.y_val, val),
                    seconds=seconds, images_per_second=len(job.x_train) / seconds)
        if writer is not None:
            for key, value in logs.items():
                writer.add_scalar(f"epoch/{key}", value, epoch)
            writer.flush()
        history.append({"epoch": epoch, **logs})
        log.info("fold %d epoch %d/%d %s", job.fold, epoch + 1, cfg.epochs,
                 " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        for cb in callbacks:
            cb.on_epoch_end(epoch, logs)
        save_resume_state(resume_path, trainer, epoch, history, callbacks)
    for cb in callbacks:
        cb.on_train_end({})
    if writer is not None:
        writer.close()
    train_seconds = time.perf_counter() - t0
    if cfg.predict_weights == "best" and best.state is not None:
        trainer.load_weights(best.state)
    recalibrated = trainer.recalibrate_batchnorm(job.x_train) if cfg.bn_recalibrate else 0
    views = tta_views(cfg.tta, cfg.tta_scales, cfg.tta_augment, cfg.augment,
                      job.spec.input_size, job.seed)
    val_proba = trainer.predict(job.x_val, views)
    test_proba = trainer.predict(job.x_test, views)
    save_checkpoint(job.checkpoint_path, trainer.predict_model, {
        "backbone": job.spec.to_dict(), "classes": job.classes, "fold": job.fold,
        "epochs_run": len(history), "num_classes": len(job.classes),
        "predict_weights": cfg.predict_weights, "best_epoch": best.best_epoch,
        "bn_recalibrated_layers": recalibrated,
    })
    return FoldResult(val_proba, test_proba, history, {
        "device": str(device), "amp": str(trainer.amp_dtype), "epochs_run": len(history),
        "predict_weights": cfg.predict_weights, "best_epoch": best.best_epoch,
        "bn_recalibrated_layers": recalibrated, "startup_seconds": startup,
        "phases": [p.to_dict() for p in phases],
        "resumed_from_epoch": first_epoch if state is not None else None,
        "train_seconds": train_seconds,
        "predict_seconds": time.perf_counter() - t0 - train_seconds,
    })


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
            x, y = trainer.to_input(images), labels.to(device)
            with trainer._autocast():
                loss = trainer.loss_fn(trainer.model(x), y)
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.scaler.scale(loss).backward()
            trainer.scaler.step(trainer.optimizer)
            trainer.scaler.update()
            losses.append(float(loss.item()))
            if not math.isfinite(losses[-1]):
                return losses + [math.inf] * (len(lrs) - len(losses))
        epoch += 1
    return losses


# --------------------------------------------------------------------------------- serving


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The metadata ``save_checkpoint`` put in a fold checkpoint's safetensors header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return json.loads((fh.metadata() or {}).get("foldstack", "{}"))


class TimmPredictor:
    """One fold model, loaded once, predicting uint8 RGB images as the run predicted its rows.

    The run's own preprocessing (the spec's mean/std) and TTA views go through the same
    ``Trainer.predict`` that made the OOF and test rows, so a served fold reproduces them.
    """

    def __init__(self, trainer: Trainer, views: list[TTAView], meta: dict[str, Any]) -> None:
        self.trainer, self.views, self.meta = trainer, views, meta
        self.input_size = trainer.spec.input_size

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        return self.trainer.predict(images, self.views)


def load_predictor(run_meta: dict[str, Any], checkpoint: Path, threads: int | None = None,
                   device: str = "cpu") -> TimmPredictor:
    """Load fold model ``checkpoint`` (safetensors) of the run described by ``run_meta``.

    ``threads`` caps torch's intra-op pool, so a Keras model in the same process keeps its cores.
    """
    from safetensors.torch import load_model

    from oof.config import make_config

    if threads:
        torch.set_num_threads(threads)
    meta = read_checkpoint_meta(checkpoint)
    spec = BackboneSpec(**{**run_meta["backbone"], "pretrained": ""})
    model = create_model(spec, len(run_meta["classes"]))
    load_model(model, str(checkpoint), strict=True, device="cpu")
    cfg = make_config(RunConfig, {"backbone": spec.name, "ema": False, "device": device})
    trainer = Trainer(model, spec, cfg, pick_device(cfg), 1)
    trainer.predict_model.eval()
    c = run_meta["config"]
    seed = int(run_meta["train_seed"]) + int(meta.get("fold", 0))
    views = tta_views(c["tta"], c["tta_scales"], c["tta_augment"], c["augment"],
                      spec.input_size, seed)
    return TimmPredictor(trainer, views, meta)
