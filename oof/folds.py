"""Fold assignment, stored once per run root so every backbone trains on the same folds."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from oof.atomic import write_atomic, write_json
from oof.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_FOLDS = 5
DEFAULT_SEED = 42
FOLDS_FILE = "folds.csv"
FOLDS_META = "folds.json"


def fold_fingerprint(ids: np.ndarray, folds: np.ndarray, k: int, seed: int) -> str:
    """Hash of the sorted (id, fold) pairs plus K and seed: equal hash, equal folds."""
    digest = hashlib.sha256(f"k={k};seed={seed}".encode())
    for i, f in sorted(zip(map(str, ids), map(int, folds))):
        digest.update(f"\n{i}\t{f}".encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Folds:
    """The stored assignment: one row per training id."""

    ids: np.ndarray
    labels: np.ndarray
    fold: np.ndarray
    k: int
    seed: int
    fingerprint: str
    group: str = "none"  # "phash": near-duplicate groups were kept inside one fold

    def split(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Row indices (train, held-out) of fold ``k``."""
        held = self.fold == k
        return np.flatnonzero(~held), np.flatnonzero(held)


def check_class_sizes(labels: list[str], k: int) -> None:
    """Refuse labels that K stratified folds cannot split, naming the class: a single class
    (nothing to classify), or a class with fewer than K images (a fold without it). Cheap, so
    ``run_folds`` calls it before decoding a single image."""
    if k < 2:
        raise ConfigError(f"--folds {k}: need at least 2 folds")
    counts = pd.Series(labels).value_counts()
    if len(counts) == 1:
        raise DataError(f"only one class, {counts.index[0]!r} ({counts.iloc[0]} images): a "
                        "classifier needs at least 2 classes")
    small = counts[counts < k]
    if len(small):
        detail = ", ".join(f"{c!r} has {n}" for c, n in small.items())
        raise DataError(f"--folds {k}: every class needs at least {k} images; {detail}")


def _check_grouped(fold: np.ndarray, labels: list[str], k: int, n_groups: int) -> None:
    """Grouped folds cannot promise what stratified ones do: refuse an empty fold, or a class
    whose groups all landed in one fold (that fold's model, and the level-2 stacker fitted
    without it, would never see the class), naming the classes."""
    empty = sorted(set(range(k)) - set(fold.tolist()))
    if empty:
        raise DataError(f"--folds {k} with near-duplicate groups: the {n_groups} groups left "
                        f"fold(s) {empty} empty; use fewer --folds, or --folds-group none")
    lab = np.asarray(labels, dtype=object)
    lonely = [c for c in pd.unique(lab) if len(np.unique(fold[lab == c])) < 2]
    if lonely:
        names = ", ".join(repr(c) for c in lonely)
        raise DataError(f"--folds {k} with near-duplicate groups: every image of class(es) "
                        f"{names} is in one fold (their near-duplicate groups cannot be spread), "
                        "so no model would learn them for that fold; use fewer --folds, or "
                        "--folds-group none")


def make_folds(ids: list[str], labels: list[str], k: int, seed: int,
               groups: np.ndarray | None = None) -> Folds:
    """StratifiedKFold with shuffling; refuses one class, or classes smaller than K, naming them.

    With ``groups`` (e.g. near-duplicate groups from ``oof.duplicates``) StratifiedGroupKFold
    keeps every group inside one fold, so no image is held out while its twin is trained on;
    an empty fold, or a class left in one fold, is refused (``_check_grouped``).
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    check_class_sizes(labels, k)
    fold = np.full(len(ids), -1, dtype=np.int64)
    if groups is None:
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(
            np.zeros(len(labels)), labels)
    else:
        n_groups = len(np.unique(groups))
        if n_groups < k:
            raise DataError(f"--folds {k}: only {n_groups} near-duplicate groups, fewer than K")
        splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(
            np.zeros(len(labels)), labels, groups)
    for f, (_, held) in enumerate(splits):
        fold[held] = f
    if groups is not None:
        _check_grouped(fold, labels, k, n_groups)
    ids_arr, labels_arr = np.asarray(ids, dtype=object), np.asarray(labels, dtype=object)
    return Folds(ids_arr, labels_arr, fold, k, seed, fold_fingerprint(ids_arr, fold, k, seed),
                 "none" if groups is None else "phash")


def load_folds(run_root: Path) -> Folds | None:
    """Read ``folds.csv`` + ``folds.json``; verify the stored fingerprint against the rows."""
    path, meta_path = Path(run_root) / FOLDS_FILE, Path(run_root) / FOLDS_META
    if not path.exists():
        return None
    if not meta_path.exists():
        # write_folds writes folds.json first and folds.csv last, so a folds.csv alone is an
        # interrupted write (by an older version): while no run was trained on it, the folds are
        # simply made again; once a run exists, its K and seed are unknown, so refuse.
        trained = sorted(p.parent.name for p in Path(run_root).glob("*/meta.json"))
        if trained:
            raise DataError(f"{path}: exists but {meta_path.name} (K, seed, fingerprint) is "
                            f"missing, and run(s) {trained} were trained on it; restore "
                            f"{meta_path.name}, or start a new run root with --out")
        log.warning("%s without %s: an interrupted write; making the folds again", path,
                    meta_path.name)
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON object was expected, not {type(meta).__name__}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{meta_path}: not a readable folds record ({exc}); it was edited or "
                        "damaged: restore it, or start a new run root with --out") from exc
    try:
        df = pd.read_csv(path, dtype={"id": str, "label": str, "fold": np.int64},
                         keep_default_na=False)
        folds = Folds(
            df["id"].to_numpy(object), df["label"].to_numpy(object), df["fold"].to_numpy(),
            int(meta["k"]), int(meta["seed"]), meta["fingerprint"], meta.get("group", "none"),
        )
    except (ValueError, KeyError, pd.errors.ParserError) as exc:
        raise DataError(f"{path}: not a folds file of id,label,fold rows ({type(exc).__name__}: "
                        f"{exc}); it was edited by hand") from exc
    actual = fold_fingerprint(folds.ids, folds.fold, folds.k, folds.seed)
    if actual != folds.fingerprint:
        raise DataError(
            f"{path}: rows do not match the fingerprint in {meta_path.name} "
            f"({actual} != {folds.fingerprint}); the file was edited by hand"
        )
    return folds


def write_folds(run_root: Path, folds: Folds) -> None:
    """Write folds.json, then folds.csv: the CSV is the commit marker of the pair.

    A kill between the two writes leaves only folds.json, which ``load_folds`` ignores (no CSV,
    no folds), so the next run makes and writes the same folds again instead of refusing.
    """
    run_root = Path(run_root)
    df = pd.DataFrame({"id": folds.ids, "label": folds.labels, "fold": folds.fold})
    write_json(
        run_root / FOLDS_META,
        {"k": folds.k, "seed": folds.seed, "fingerprint": folds.fingerprint, "rows": len(df),
         "group": folds.group},
    )
    write_atomic(run_root / FOLDS_FILE, lambda p: df.to_csv(p, index=False))


def ensure_folds(
    run_root: Path, ids: list[str], labels: list[str], k: int | None, seed: int | None,
    group: str | None = None, make_groups: Callable[[], np.ndarray] | None = None,
) -> Folds:
    """Reuse the run root's folds, or create them; refuse a different K/seed/grouping or dataset.

    ``make_groups`` is called only when new folds are made with ``group='phash'`` (hashing every
    image is not free), and returns one group number per entry of ``ids``.
    """
    existing = load_folds(run_root)
    if existing is None:
        groups = None
        if group not in (None, "none"):
            if make_groups is None:
                raise ConfigError(f"--folds-group {group}: no way to compute the groups was given")
            groups = make_groups()
        folds = make_folds(ids, labels, k or DEFAULT_FOLDS, DEFAULT_SEED if seed is None else seed,
                           groups)
        write_folds(run_root, folds)
        return folds
    asked = {"--folds": (k, existing.k), "--seed": (seed, existing.seed),
             "--folds-group": (group, existing.group)}
    clash = [f"{flag} {new} (stored: {old})" for flag, (new, old) in asked.items()
             if new is not None and new != old]
    if clash:
        raise ConfigError(
            f"{Path(run_root) / FOLDS_FILE} already fixes K={existing.k}, seed={existing.seed}, "
            f"grouping={existing.group}; "
            f"asked for {', '.join(clash)}. Runs in one run root must share folds to be stacked: "
            f"drop the flag, or start a new run root with --out OTHER_DIR."
        )
    if sorted(map(str, ids)) != sorted(map(str, existing.ids)):
        raise DataError(
            f"{Path(run_root) / FOLDS_FILE}: its ids differ from the dataset's training ids; "
            "the dataset changed since the folds were made: use a new --out"
        )
    stored = dict(zip(existing.ids, existing.labels))
    changed = [i for i, lab in zip(ids, labels) if stored[i] != lab]
    if changed:
        raise DataError(
            f"{Path(run_root) / FOLDS_FILE}: labels changed since the folds were made for "
            f"{len(changed)} id(s), e.g. {changed[:5]}; use a new --out"
        )
    return existing
