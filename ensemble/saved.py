"""The fitted final stacker on disk: joblib file + JSON record of what it was fitted on.

``stack.py`` used to fit the chosen stacker and drop it; a practitioner could not apply what won.
It is now saved next to the stack's report with everything a loader must check before trusting
it: the level-1 runs in column order (names, fold fingerprint), the class order, and the library
versions (a scikit-learn pickle is only promised to load in the version that wrote it). The
joblib file is a pickle, so its SHA-256 is recorded and checked before it is unpickled.

Framework-free (level 2): the fold models that feed this stacker are loaded by ``serve.bundle``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ensemble.cost import Variant
from oof.atomic import write_atomic, write_json
from oof.errors import DataError, RunMismatchError

STACKER_FILE = "stacker.joblib"
STACKER_INFO = "stacker.json"
LEVEL2_LIBRARIES = ("numpy", "scikit-learn", "lightgbm", "joblib", "scipy")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def installed_versions(names: tuple[str, ...] = LEVEL2_LIBRARIES) -> dict[str, str]:
    """Versions of ``names`` installed here (absent ones left out), plus Python's."""
    out = {"python": platform.python_version()}
    for n in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[n] = metadata.version(n)
    return out


def version_mismatches(recorded: dict[str, str], installed: dict[str, str]) -> list[str]:
    """``name: recorded -> installed`` for each recorded library installed at another version
    (Python compared by major.minor only; a local build tag such as torch's ``+cu132`` is
    ignored: CPU and CUDA builds read the same weights; a library not installed is reported)."""
    out = []
    for name, want in sorted(recorded.items()):
        have = installed.get(name)
        if name == "python":
            want, have = ".".join(want.split(".")[:2]), ".".join((have or "").split(".")[:2])
        if (have or "").split("+")[0] != want.split("+")[0]:
            out.append(f"{name}: saved with {want}, installed {have or 'none'}")
    return out


@dataclass
class SavedStacker:
    """A loaded final stacker and its record (``info``: runs, classes, fingerprint...)."""

    stacker: Any
    info: dict[str, Any]

    @property
    def runs(self) -> list[str]:
        return [r["run"] for r in self.info["runs"]]

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        from ensemble.evaluate import full_proba

        return full_proba(self.stacker, X, len(self.info["classes"]))


def stacker_record(stacker: Any, method: str, runs: list[Any], classes: list[str],
                   fingerprint: str, level2_scores: dict[str, float],
                   file: str = STACKER_FILE) -> dict[str, Any]:
    """What ``stacker.json`` says of a fitted stacker (its file's SHA-256 is added on saving).

    ``runs`` are ``oof.rundir.Run`` objects (a ``VariantRun`` records its variant);
    ``level2_scores`` the method's honest CV scores. A ``TemperatureScaled`` stacker shows the
    method's parameters and ``temperature``.
    """
    from ensemble.calibrate import TemperatureScaled

    scaled = isinstance(stacker, TemperatureScaled)
    inner = stacker.estimator if scaled else stacker
    return {
        "file": file, "sha256": None, "method": method,
        "params": {k: v for k, v in inner.get_params().items()
                   if isinstance(v, (str, int, float, bool, type(None)))},
        "temperature": float(stacker.temperature) if scaled else None,
        "classes": list(classes), "fold_fingerprint": fingerprint,
        "runs": [{"run": r.name, "path": str(r.path), "fingerprint": r.fingerprint,
                  "level": int(r.meta.get("level", 1)),
                  # how the run is served (fold models or refit, which views): ensemble.variants
                  "variant": getattr(r, "variant", Variant()).to_dict()} for r in runs],
        "level2_scores": level2_scores, "versions": installed_versions(),
    }


def save_stacker(out_dir: Path, stacker: Any, method: str, runs: list[Any], classes: list[str],
                 fingerprint: str, level2_scores: dict[str, float],
                 file: str = STACKER_FILE) -> Path:
    """Write ``stacker`` (fitted on the OOF of ``runs``, hstacked in that order) and its record
    (``stacker_record``). A ``TemperatureScaled`` stacker is pickled whole (whatever loads it
    applies its T)."""
    import joblib

    path = Path(out_dir) / file
    write_atomic(path, lambda p: joblib.dump(stacker, p))
    info = {**stacker_record(stacker, method, runs, classes, fingerprint, level2_scores, file),
            "sha256": sha256_of(path)}
    write_json(Path(out_dir) / file.replace(".joblib", ".json"), info)
    return path


def read_stacker_info(stack_dir: Path, file: str = STACKER_FILE) -> dict[str, Any]:
    """The record next to a saved stacker; a clear error when the folder has none."""
    p = Path(stack_dir) / file.replace(".joblib", ".json")
    if not p.exists():
        raise RunMismatchError(
            f"{stack_dir}: no {p.name}: not a stack folder written by stack.py since it saves "
            "its final stacker; rerun stack.py (same --data/--out) to write one")
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: damaged stacker record ({exc})") from exc


def load_stacker(stack_dir: Path, file: str = STACKER_FILE, *,
                 allow_version_mismatch: bool = False) -> SavedStacker:
    """Load a saved stacker after checking its hash and the level-2 library versions."""
    import joblib

    info = read_stacker_info(stack_dir, file)
    path = Path(stack_dir) / info["file"]
    if not path.exists():
        raise DataError(f"{path}: missing (named by {STACKER_INFO})")
    if sha256_of(path) != info["sha256"]:
        raise DataError(f"{path}: damaged or replaced (SHA-256 differs from the one recorded in "
                        f"{file.replace('.joblib', '.json')}); it is not unpickled")
    bad = version_mismatches(info["versions"], installed_versions())
    if bad and not allow_version_mismatch:
        raise RunMismatchError(f"{path}: saved with other library versions ({'; '.join(bad)}); "
                               "install those versions, or load with allow_version_mismatch")
    return SavedStacker(joblib.load(path), info)


@dataclass
class Subset:
    """The runs a cheaper service keeps, and the level-2 score of the stack refitted on them."""

    kept: list[str]
    dropped: list[str]
    rule: str
    level2_scores: dict[str, float]
    full_level2_scores: dict[str, float]
    stacker: Any
    cost: dict[str, Any]  # passes and ms_per_image of the kept runs (ensemble.cost)
    full_cost: dict[str, Any]


def fit_subset(stack_dir: Path, keep: list[str] | None = None) -> Subset:
    """Refit the stack's chosen method on a subset of its runs, with its honest level-2 score.

    ``keep=None``: the runs greedy ensemble selection (Caruana) gives a non-zero weight when fit
    on all OOF rows. The score is CV over the same stored folds, so it can be compared with the
    full stack's and shown to whoever chooses the cheaper service. A stack made with
    ``--temperature`` refits its temperature on the subset by the same rule.
    """
    from ensemble.calibrate import TemperatureScaled, cross_val_temperature
    from ensemble.cost import total_cost
    from ensemble.evaluate import cross_val_level2, level1_matrix
    from ensemble.stackers import make_stacker
    from ensemble.variants import load_variant_run

    info = read_stacker_info(stack_dir)
    report = json.loads((Path(stack_dir) / "report.json").read_text())
    runs = [load_variant_run(r) for r in info["runs"]]  # each as the stack serves it
    names = [r.name for r in runs]
    ref = runs[0]
    rule = "explicit list"
    if keep is None:
        cfg = report.get("config", {})
        greedy = make_stacker("greedy", ensemble_size=int(cfg.get("ensemble_size", 25)),
                              metric="log_loss" if cfg.get("metric", "log_loss") == "log_loss"
                              else "accuracy")
        X, _ = level1_matrix(runs)
        greedy.fit(X, ref.y)
        keep = [n for n, w in zip(names, greedy.weights_) if w > 0]
        rule = "runs with non-zero weight in greedy ensemble selection on all OOF rows"
    unknown = sorted(set(keep) - set(names))
    if unknown or not keep:
        raise RunMismatchError(f"subset {keep}: {unknown or 'empty'}; the stack's runs are "
                               f"{names}")
    chosen = [r for r in runs if r.name in keep]
    X, _ = level1_matrix(chosen)
    method = info["method"]
    params = {k: v for k, v in report["final"]["params"].items()}
    level2 = cross_val_level2(method, make_stacker(method, **params), X, ref.y, ref.folds,
                              len(ref.classes), None, [r.name for r in chosen])
    final = make_stacker(method, **params).fit(X, ref.y)
    scores = level2.scores
    mode = report.get("config", {}).get("temperature", "off")
    if mode != "off":
        tcv = cross_val_temperature(level2.oof, ref.y, ref.folds, mode)
        if tcv.applied:
            final, scores = TemperatureScaled(final, tcv.temperature), tcv.scores
    return Subset([r.name for r in chosen], [n for n in names if n not in keep], rule,
                  scores, info["level2_scores"], final, total_cost(chosen).row(),
                  total_cost(runs).row())
