"""A killed timm fold's state: everything the next epoch depends on, one file per fold, written
atomically at the end of each epoch (the template's memory travels inside it)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from oof.atomic import atomic_path
from recipe.phases import Phase

if TYPE_CHECKING:
    from backbones.timm.train import Trainer

log = logging.getLogger(__name__)
RESUME_FILE = "resume.pt"


def save_resume_state(path: Path, trainer: Trainer, epoch: int, memory: dict[str, Any]) -> None:
    """Weights, optimiser, LR curve, grad scaler, EMA, torch's RNG and the template's
    ``memory`` (history, stop flag, the callbacks' memory)."""
    state = {
        "next_epoch": epoch + 1, "phase": trainer.phase.name if trainer.phase else None,
        "model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(), "scaler": trainer.scaler.state_dict(),
        "history": memory["history"], "stop_training": memory["stop_training"],
        "global_step": trainer.global_step,
        "ema": trainer.ema.state_dict() if trainer.ema is not None else None,
        "callbacks": memory["callbacks"],
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


def restore(trainer: Trainer, state: dict[str, Any], phases: list[Phase]) -> None:
    """Put the trainer back where ``state`` left it (the phase it was in, then its optimiser)."""
    trainer.model.load_state_dict(state["model"])
    trainer.start_phase(next(p for p in phases if p.name == state["phase"]))
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.global_step = state["global_step"]
    if trainer.ema is not None:
        trainer.ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
