"""The loss, defined once for both frameworks: cross-entropy or focal, label smoothing, and
per-class weights.

Both backends compute ``mean_i(w_i * l_i)`` over a batch, where ``l_i`` is the (smoothed,
possibly mixed) cross-entropy or focal loss of image ``i`` and ``w_i = sum_c t_ic * w_c`` its
class weight under the soft target ``t_i`` (the class's own weight for an unmixed image). Keras
gets ``w_i`` as sample weights; timm multiplies it in. ``focal_loss_numpy`` is the reference both
are tested against.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from oof.errors import ConfigError

LOSSES = ("ce", "focal")


def parse_class_weights(value: str | Mapping[str, float], classes: Sequence[str]
                        ) -> dict[str, float] | str:
    """``none`` | ``balanced`` | ``CLASS=W,CLASS=W`` (or a YAML mapping) -> checked form."""
    if isinstance(value, str) and value.strip().lower() in ("none", "balanced", ""):
        return value.strip().lower() or "none"
    flag = f"--class-weights {value}"
    if isinstance(value, str):
        pairs = {}
        for item in value.split(","):
            name, sep, weight = item.partition("=")
            if not sep:
                raise ConfigError(f"{flag}: expected none, balanced or CLASS=WEIGHT,... "
                                  f"('{item}' has no '=')")
            try:
                pairs[name.strip()] = float(weight)
            except ValueError:
                raise ConfigError(f"{flag}: weight of '{name.strip()}' is not a number: "
                                  f"'{weight}'") from None
        value = pairs
    unknown = sorted(set(value) - set(classes))
    if unknown:
        raise ConfigError(f"{flag}: no such class {unknown} (classes: {list(classes)})")
    bad = {k: w for k, w in value.items() if not (np.isfinite(w) and w > 0)}
    if bad:
        raise ConfigError(f"{flag}: weights must be positive numbers: {bad}")
    return dict(value)


def class_weight_vector(value: str | Mapping[str, float], classes: Sequence[str],
                        labels: np.ndarray) -> np.ndarray | None:
    """One weight per class (float32), or None for unweighted.

    ``balanced`` is scikit-learn's ``n / (K * n_c)`` over this fold's training labels, so the
    mean weight over the training images is 1 and the LR keeps its meaning.
    """
    parsed = parse_class_weights(value, classes)
    if parsed == "none":
        return None
    if parsed == "balanced":
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
        present = counts > 0
        out = np.ones(len(classes), dtype=np.float64)
        out[present] = len(labels) / (present.sum() * counts[present])
        return out.astype(np.float32)
    return np.asarray([parsed.get(c, 1.0) for c in classes], dtype=np.float32)


def smooth(targets: np.ndarray, label_smoothing: float) -> np.ndarray:
    """Soft targets with label smoothing, as torch and Keras apply it."""
    k = targets.shape[1]
    return targets * (1.0 - label_smoothing) + label_smoothing / k


def focal_loss_numpy(probs: np.ndarray, targets: np.ndarray, gamma: float,
                     label_smoothing: float = 0.0,
                     class_weights: np.ndarray | None = None) -> float:
    """Reference: ``mean_i w_i * sum_c -t_ic (1 - p_ic)^gamma log p_ic`` (gamma 0 = CE)."""
    t = smooth(np.asarray(targets, np.float64), label_smoothing)
    p = np.clip(np.asarray(probs, np.float64), 1e-7, 1.0)
    per_image = -(t * (1.0 - p) ** gamma * np.log(p)).sum(axis=1)
    w = np.ones(len(p)) if class_weights is None else np.asarray(targets) @ class_weights
    return float((w * per_image).mean())
