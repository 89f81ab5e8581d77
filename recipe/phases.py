"""Fine-tuning as a list of phases, the way fastai's ``fine_tune`` is freeze -> fit -> unfreeze.

With pretrained weights a fresh random head's first gradients wreck the pretrained features when
every layer trains from step 0 at one LR (measured in issue 9: OOF accuracy 0.67 against 0.72 for
a logistic regression on the frozen features). So by default a pretrained fold first trains the
head alone on a frozen backbone (BatchNorm in inference mode), then unfreezes everything with
layer-wise LR decay (the deepest layers keep the smallest steps). From scratch there is nothing
to protect: one phase, every layer, one LR.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from oof.config import RunConfig
from oof.errors import ConfigError

DEFAULT_HEAD_EPOCHS = 1  # per pretrained fold, out of ``epochs``
DEFAULT_LAYER_DECAY = 0.8  # LR multiplier per layer group, from the head down
DEFAULT_LR = 2e-3  # peak LR from scratch
DEFAULT_FINETUNE_LR = 1e-3  # peak LR with pretrained weights (README: "Why these defaults")


@dataclass(frozen=True)
class Phase:
    """``epochs`` epochs from ``first_epoch`` at peak ``lr`` after ``warmup_epochs``; the
    backbone frozen or not; its BatchNorm layers frozen (``freeze_bn``) or not."""

    name: str
    first_epoch: int
    epochs: int
    lr: float
    warmup_epochs: float
    train_backbone: bool
    layer_decay: float | None
    freeze_bn: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def peak_lr(cfg: RunConfig) -> float:
    """``--lr``, else its default: half the from-scratch peak when the weights are pretrained.

    Measured with ``bench.transfer --train-seeds 42 1 2`` (the same folds, three seeds of
    weights and batches): on Fashion-MNIST 1e-3 beat 2e-3 with every seed (mean accuracy 0.878
    against 0.871, log loss 0.412 against 0.421); on the few hundred photos it tied (0.763
    against 0.759, log loss 0.745 against 0.767). A far domain needs the gentler steps as much
    as a small set does.
    """
    if cfg.lr is not None:
        return cfg.lr
    return DEFAULT_FINETUNE_LR if cfg.pretrained else DEFAULT_LR


def plan_phases(cfg: RunConfig) -> list[Phase]:
    """The phases of one fold: ``head`` (frozen backbone) then ``full``, or ``full`` alone.

    ``epochs`` counts both phases. Defaults depend on whether the weights are pretrained:
    ``head_epochs`` 1, ``layer_decay`` 0.8 and ``freeze_bn`` if so, 0, none and not from
    scratch. Frozen BatchNorm is what keeps the head phase's work: unfrozen, the layers switch
    from the pretrained statistics to each batch's and every feature the head learned on
    shifts (Fashion-MNIST training accuracy 0.70 after the head epoch, 0.31 on the next
    epoch's first batches; the run ended 3 points lower).
    """
    pretrained = bool(cfg.pretrained)
    head = cfg.head_epochs if cfg.head_epochs is not None else (
        min(DEFAULT_HEAD_EPOCHS, cfg.epochs - 1) if pretrained else 0)
    if head > cfg.epochs:
        raise ConfigError(f"--head-epochs {head}: more than --epochs {cfg.epochs} (the head "
                          "epochs are part of the fold's epochs)")
    decay = cfg.layer_decay if cfg.layer_decay is not None else (
        DEFAULT_LAYER_DECAY if pretrained else None)
    freeze_bn = cfg.freeze_bn if cfg.freeze_bn is not None else pretrained
    lr = peak_lr(cfg)
    phases = []
    if head:
        # a new linear head on fixed features needs no warmup: nothing upstream can be hurt
        phases.append(Phase("head", 0, head, cfg.head_lr or lr, 0.0, False, None, True))
    if cfg.epochs - head:
        phases.append(Phase("full", head, cfg.epochs - head, lr, cfg.warmup_epochs, True,
                            None if decay == 1 else decay, freeze_bn))
    return phases


def phase_of(phases: list[Phase], epoch: int) -> Phase:
    """The phase that trains ``epoch``."""
    return next(p for p in phases if p.first_epoch <= epoch < p.first_epoch + p.epochs)


@dataclass(frozen=True)
class SizeStage:
    """Progressive resizing: ``epochs`` epochs from ``first_epoch`` on images of ``size`` px."""

    first_epoch: int
    epochs: int
    size: int


def plan_sizes(cfg: RunConfig, final_size: int) -> list[SizeStage]:
    """The image size of every epoch: one stage at ``final_size``, or one per ``img_size``.

    Small images first is the fast.ai progressive-resizing recipe: early epochs cost less and
    the last size, the one that predicts, gets the final epochs. ``img_size_epochs`` sets the
    epochs per size; by default ``epochs`` is split evenly, the remainder to the last size.
    """
    sizes = list(cfg.img_size) if isinstance(cfg.img_size, list) else [final_size]
    if len(sizes) == 1:
        if cfg.img_size_epochs and cfg.img_size_epochs != [cfg.epochs]:
            raise ConfigError(f"--img-size-epochs {cfg.img_size_epochs}: needs several "
                              "--img-size values (progressive resizing), e.g. 128,160,224")
        return [SizeStage(0, cfg.epochs, final_size)]
    counts = list(cfg.img_size_epochs)
    if not counts:
        if cfg.epochs < len(sizes):
            raise ConfigError(f"--img-size {','.join(map(str, sizes))}: {len(sizes)} sizes "
                              f"need at least {len(sizes)} --epochs (one per size), got "
                              f"{cfg.epochs}")
        each = cfg.epochs // len(sizes)
        counts = [each] * (len(sizes) - 1) + [cfg.epochs - each * (len(sizes) - 1)]
    if len(counts) != len(sizes) or sum(counts) != cfg.epochs:
        raise ConfigError(f"--img-size-epochs {counts}: one count per --img-size "
                          f"({len(sizes)} sizes) summing to --epochs {cfg.epochs}")
    stages, first = [], 0
    for size, n in zip(sizes, counts, strict=True):
        stages.append(SizeStage(first, n, size))
        first += n
    return stages


def size_of(stages: list[SizeStage], epoch: int) -> int:
    """The image size that trains ``epoch``."""
    return next(s.size for s in stages if s.first_epoch <= epoch < s.first_epoch + s.epochs)


@dataclass(frozen=True)
class Segment:
    """A run of epochs with one phase and one image size: the unit a Keras ``fit`` call trains."""

    name: str
    phase: Phase
    first_epoch: int
    epochs: int
    size: int


def plan_segments(phases: list[Phase], stages: list[SizeStage]) -> list[Segment]:
    """Phases cut by size stages. Without progressive resizing a segment is a phase, named
    like it; with it, ``full@160`` says which phase at which size."""
    cuts = sorted({0, *(p.first_epoch for p in phases), *(s.first_epoch for s in stages)})
    end = phases[-1].first_epoch + phases[-1].epochs
    segments = []
    for a, b in zip(cuts, [*cuts[1:], end], strict=True):
        phase = phase_of(phases, a)
        size = size_of(stages, a)
        name = phase.name if len(stages) == 1 else f"{phase.name}@{size}"
        segments.append(Segment(name, phase, a, b - a, size))
    return segments
