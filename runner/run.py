"""Running one backbone over the stored folds: the library behind ``run_folds.py``.

Framework-free: the backbone family module is imported only through ``backbones.resolve``, so a
timm run never loads TensorFlow and a Keras run never loads torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oof.atomic import disk_full_error, is_disk_full
from oof.config import RunConfig, config_dict, field_default, save_config
from oof.datasets import ImageDataset, load_dataset
from oof.distill import Teacher, distill_targets, load_teacher
from oof.errors import BusyError, ConfigError, DataError
from oof.folds import DEFAULT_FOLDS, Folds, check_class_sizes, ensure_folds, load_folds
from oof.images import cached_images
from oof.pseudo import PseudoSource, check_source, load_pseudo_source
from oof.rundir import Run, RunDir, load_run
from recipe import plan_sizes
from recipe.losses import parse_class_weights
from runner.refit import check_refit
from runner.tasks import FoldImages, load_fold_images, train_one_fold
from runner.tasks import fold_rows as _fold_rows

log = logging.getLogger(__name__)

# Keys that may change between invocations of one run without changing what it computes.
# ``folds`` and ``seed`` are checked through the stored folds' fingerprint instead: leaving them
# out on a rerun means "the stored ones" (``ensure_folds`` already refused different values).
# ``threads`` is not one of them: the thread count of a fold job orders its float reductions.
RESUMABLE_KEYS = {"config", "fold", "progress", "num_workers", "device", "out", "data",
                  "folds", "seed", "folds_group", "lr_find", "write_augment", "tensorboard",
                  "mlflow", "verbose", "refit_full", "remeasure_cost",
                  "probe_feature_store"}


@dataclass
class RunSummary:
    """What ``run_folds`` returns: per-fold rows for the final table and the OOF score."""

    run_dir: Path
    fold_rows: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False
    oof_scores: dict[str, float] = field(default_factory=dict)
    run: Run | None = None
    mlflow_run_id: str | None = None
    refit: dict[str, Any] | None = None  # meta.json's "refit" (``--refit-full``)


def library_versions() -> dict[str, str]:
    names = ("numpy", "pandas", "scikit-learn", "pyarrow", "albumentations", "Pillow")
    out = {"python": platform.python_version()}
    for n in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[n] = metadata.version(n)
    return out


def default_threads() -> int:
    """The thread count of a run that names none: ``OMP_NUM_THREADS`` when set (torch and
    TensorFlow size their pools from it too), else the cores this process may run on."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def with_threads(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its thread count as a number, resolved once where the run is planned.

    The count decides how a fold's float sums are split, so it is part of what the run computes:
    it is recorded in the run's config, every executor trains with it, and a rerun with another
    count is refused (``_check_same_config``).
    """
    return cfg if cfg.threads is not None else dataclasses.replace(cfg, threads=default_threads())


def run_root_for(cfg: RunConfig, dataset: ImageDataset) -> Path:
    return Path(cfg.out) / dataset.name


def duplicate_groups(dataset: ImageDataset, root: Path) -> np.ndarray:
    """One group number per training image: near-duplicates (perceptual hash) share one."""
    from oof.duplicates import group_ids, perceptual_hashes

    t0 = time.perf_counter()
    hashes = perceptual_hashes(list(dataset.train["path"]), root / "cache")
    groups = group_ids(hashes)
    log.info("perceptual hashes of %d images in %.1fs: %d near-duplicate groups of 2+",
             len(hashes), time.perf_counter() - t0,
             int((np.bincount(groups) > 1).sum()))
    return groups


def refuse_unsplittable(dataset: ImageDataset, root: Path, k: int | None) -> None:
    """Refuse one class, or a class smaller than K, before decoding an image or loading a
    framework, so the refusal leaves nothing under ``--out``; stored folds were already checked."""
    if load_folds(root) is None:
        check_class_sizes(list(dataset.train["label"]), k or DEFAULT_FOLDS)


def decode_first(dataset: ImageDataset, size: int, root: Path, resize: str = "squash",
                 with_test: bool = True, progress: bool = True) -> None:
    """Decode (and cache) every image before anything else is written to the run root.

    ``with_test=False`` decodes the training set only (a progressive-resizing stage size: only
    the last size predicts the test set).

    A corrupt, truncated, empty or text "image" is then refused while the run root holds no
    folds.csv or meta.json from this call; a cache file made for the test set is removed again
    when the train set fails (and the folders made by this call).
    """
    cache = root / "cache"
    made = next((p for p in reversed([root, *root.parents]) if not p.exists()), None)
    had_cache = cache.is_dir()
    before = set(cache.iterdir()) if had_cache else set()
    errors = []
    sets = (("test", dataset.test["path"]),) if with_test else ()
    for what, paths in (*sets, ("train", dataset.train["path"])):
        try:
            cached_images(list(paths), size, cache, resize, progress=progress)
        except DataError as exc:  # report both sets' bad files in one message
            errors.append(f"{what} set: {exc}")
    if errors:
        if made is not None:  # --out itself may be new: remove the topmost folder made here
            shutil.rmtree(made, ignore_errors=True)
        elif cache.is_dir():
            for p in set(cache.iterdir()) - before:
                p.unlink(missing_ok=True)
            if not had_cache:
                cache.rmdir()
        raise DataError("\n".join(errors))


@contextlib.contextmanager
def fold_locks(run: RunDir, todo: list[int]) -> Iterator[None]:
    """Hold one lock file per fold to train, so a second process on the same fold refuses.

    Two processes training one fold would interleave its live history and race on its
    checkpoints. ``filelock`` locks are released by the OS when a process dies, even by kill -9,
    so a crashed run never leaves a stale lock behind.
    """
    from filelock import FileLock, Timeout

    lock_dir = run.path / ".locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        for k in todo:
            lock = FileLock(lock_dir / f"fold{k}.lock")
            try:
                held.enter_context(lock.acquire(timeout=0))
            except Timeout:
                raise BusyError(
                    f"fold {k} of {run.path} is being trained by another process (lock "
                    f"{lock.lock_file} is held); wait for it to finish, or pass --fold N for "
                    "another fold"
                ) from None
        yield


def _check_same_config(run: RunDir, cfg: RunConfig, folds: Folds) -> None:
    """A run folder belongs to one config and one fold assignment: refuse anything else."""
    meta = run.read_meta()
    trained_on = meta.get("fold_fingerprint")
    if trained_on and trained_on != folds.fingerprint:
        raise ConfigError(
            f"{run.path} was trained on folds {trained_on}, but the run root's folds.csv now "
            f"has fingerprint {folds.fingerprint}. Delete the run folder to retrain it on the "
            "current folds, or use another --out."
        )
    stored = meta.get("config")
    if not stored:
        return
    now = config_dict(cfg)
    # a key added since the run started (``resize``) reads as its default, which it then was
    was = {k: stored.get(k, field_default(RunConfig, k)) for k in now}
    if was["threads"] is None:  # started before thread counts were recorded: any count, as then
        log.info("%s has no recorded thread count; its folds from now on run on %s threads",
                 run.path, now["threads"])
        was["threads"] = now["threads"]
    diff = [f"{k}: {was[k]!r} -> {now.get(k)!r}" for k in now
            if k not in RESUMABLE_KEYS and was[k] != now.get(k)]
    if diff:
        resume = (f" To resume it, pass --threads {was['threads']} (its folds computed on that "
                  "many threads, and another count sums floats in another order)."
                  if was["threads"] != now["threads"] else "")
        raise ConfigError(
            f"{run.path} was started with other settings ({'; '.join(diff)}).{resume} "
            "Pass --run-name NEW_NAME for a new run, or delete the folder to start over."
        )


@dataclass
class PreparedRun:
    """A run folder ready for its fold jobs: dataset, folds, backbone and the meta written."""

    cfg: RunConfig
    dataset: ImageDataset
    root: Path
    spec: Any
    backend: Any
    folds: Folds
    run: RunDir
    meta: dict[str, Any]
    pseudo: PseudoSource | None = None  # --pseudo-labels: per-fold test probabilities
    pseudo_test_rows: np.ndarray | None = None  # the source's rows -> the dataset's test rows
    extra_paths: list[str] | None = None  # --extra-train images, joining every training side
    extra_y: np.ndarray | None = None
    targets: np.ndarray | None = None  # --distill-from: (folds.csv rows, C) soft targets

    @property
    def train_seed(self) -> int:
        return int(self.meta["train_seed"])

    def todo(self) -> list[int]:
        """Folds asked for (``--fold`` or all) that are not done yet."""
        asked = [self.cfg.fold] if self.cfg.fold is not None else range(self.folds.k)
        return [k for k in asked if not self.run.is_done(k)]


def extra_training_set(cfg: RunConfig, dataset: ImageDataset
                       ) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """The ``--extra-train`` images, their labels as this dataset's class indices, and what the
    run records about them; unknown or unmapped class names are refused, naming them."""
    flag = f"--extra-train {cfg.extra_train}"
    try:
        extra = load_dataset(cfg.extra_train)
    except DataError as exc:
        raise DataError(f"{flag}: {exc}") from exc
    mapping: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in cfg.extra_train_classes.split(","))):
        theirs, sep, ours = item.partition("=")
        if not sep:
            raise ConfigError(f"--extra-train-classes {cfg.extra_train_classes}: '{item}' is "
                              "not THEIRS=OURS")
        mapping[theirs.strip()] = ours.strip()
    index = dataset.class_index
    labels = [mapping.get(str(c), str(c)) for c in extra.train["label"]]
    unknown = sorted({lab for lab in labels if lab not in index})
    if unknown:
        raise ConfigError(f"{flag}: classes {unknown} are not among this dataset's "
                          f"{dataset.classes}; map them with --extra-train-classes THEIRS=OURS")
    counts = pd.Series(labels).value_counts().sort_index()
    info = {"path": str(extra.root), "layout": extra.layout, "n": len(labels),
            "per_class": {str(k): int(v) for k, v in counts.items()}, "mapping": mapping}
    return ([str(p) for p in extra.train["path"]],
            np.array([index[lab] for lab in labels], dtype=np.int64), info)


def _teacher(cfg: RunConfig, backend: Any, dataset: ImageDataset, folds: Folds
             ) -> tuple[Teacher | None, np.ndarray | None]:
    """``--distill-from``: the teacher (checked against the run root's folds and classes) and
    each folds.csv row's soft target, made from the teacher's OOF row of that id only."""
    if not cfg.distill_from:
        return None, None
    flag = f"--distill-from {cfg.distill_from}"
    for other, name in ((cfg.pseudo_labels, "--pseudo-labels"),
                        (cfg.extra_train, "--extra-train")):
        if other:  # rows without an OOF row of the teacher: no leak-free target for them
            raise ConfigError(f"{flag} with {name}: those images have no out-of-fold "
                              "prediction of the teacher to learn from; drop one of the two")
    if not backend.soft_targets:
        raise ConfigError(f"{flag}: the {backend.name} family cannot train on soft targets yet "
                          "(its data path takes integer labels)")
    teacher = load_teacher(cfg.distill_from, folds, dataset.classes)
    _, y = _fold_rows(dataset, folds)
    return teacher, distill_targets(teacher, y, cfg.distill_alpha, cfg.distill_temperature,
                                    cfg.label_smoothing)


def prepare_run(cfg: RunConfig) -> PreparedRun:
    """Everything before the first fold: validate and decode the data, folds, run folder, meta.

    Idempotent (a second call reuses the image cache, folds.csv and meta), so every fold job of
    an executor may call it, on any worker.
    """
    import backbones

    cfg = with_threads(cfg)  # a plan's runs come resolved by the driver; a local run here
    dataset = load_dataset(cfg.data, cfg.layout, cfg.test)
    parse_class_weights(cfg.class_weights, dataset.classes)  # names this dataset's classes?
    check_refit(cfg)
    pseudo = load_pseudo_source(cfg.pseudo_labels) if cfg.pseudo_labels else None
    extra_paths, extra_y, extra_info = (extra_training_set(cfg, dataset) if cfg.extra_train
                                        else (None, None, None))
    root = run_root_for(cfg, dataset)
    refuse_unsplittable(dataset, root, cfg.folds)
    spec, backend = backbones.resolve(cfg)
    sizes = [s.size for s in plan_sizes(cfg, spec.input_size)]  # refuses a bad size plan
    for size in dict.fromkeys([spec.input_size, *sizes]):  # the predicting size first
        decode_first(dataset, size, root, cfg.resize, with_test=size == spec.input_size,
                     progress=cfg.progress)
        if extra_paths:  # validated and cached before the run folder is written
            try:
                cached_images(extra_paths, size, root / "cache", cfg.resize,
                              progress=cfg.progress)
            except DataError as exc:
                raise DataError(f"--extra-train {cfg.extra_train}: {exc}") from exc
    folds = ensure_folds(root, list(dataset.train["id"]), list(dataset.train["label"]),
                         cfg.folds, cfg.seed, cfg.folds_group,
                         make_groups=lambda: duplicate_groups(dataset, root))
    if cfg.fold is not None and not 0 <= cfg.fold < folds.k:
        raise ConfigError(f"--fold {cfg.fold}: folds are numbered 0..{folds.k - 1}")
    pseudo_rows = (check_source(pseudo, dataset.classes, folds.fingerprint,
                                np.asarray(dataset.test["id"], dtype=str))
                   if pseudo is not None else None)
    teacher, targets = _teacher(cfg, backend, dataset, folds)
    run = RunDir(root / cfg.resolved_run_name(spec.input_size))
    _check_same_config(run, cfg, folds)
    meta = {
        "run": run.path.name, "status": "partial", "level": 1, "backbone": spec.to_dict(),
        "config": config_dict(cfg), "versions": {**library_versions(), **backend.versions()},
        "train_seed": cfg.train_seed if cfg.train_seed is not None else folds.seed,
        "fold_fingerprint": folds.fingerprint, "folds": folds.k, "fold_seed": folds.seed,
        "fold_group": folds.group,
        "classes": dataset.classes,
        "data": {"name": dataset.name, "layout": dataset.layout, "root": str(dataset.root),
                 "n_train": len(dataset.train), "n_test": len(dataset.test)},
    }
    if pseudo is not None:  # where the pseudo-labels came from: stack.py checks it
        meta["pseudo_labels"] = pseudo.describe(cfg.pseudo_threshold)
    if extra_info is not None:
        meta["extra_train"] = extra_info
    if teacher is not None:  # a distilled student: tables flag it, its OOF is optimistic
        meta["student"] = True
        meta["teacher"] = teacher.describe(cfg.distill_alpha, cfg.distill_temperature)
    if not run.path.exists() or run.read_meta().get("status") != "complete":
        run.write_meta(meta)
        save_config(cfg, run.path / "config.yaml")
    return PreparedRun(cfg, dataset, root, spec, backend, folds, run, meta, pseudo, pseudo_rows,
                       extra_paths, extra_y, targets)


def train_locked(prep: PreparedRun, todo: list[int],
                 images: FoldImages | None = None) -> list[int]:
    """Train folds ``todo`` under their fold locks; returns the folds trained here.

    Both executors come through here: the local one with every fold to do, a Ray worker with
    one. A fold finished meanwhile by another process is skipped.
    """
    if not todo:
        return []
    with fold_locks(prep.run, todo):
        todo = [k for k in todo if not prep.run.is_done(k)]  # done meanwhile by another process
        try:
            _train_folds(prep, todo, images)
        except Exception as exc:  # a full disk met outside oof.atomic (a framework's writer)
            if is_disk_full(exc):
                raise disk_full_error(exc, getattr(exc, "filename", None)) from exc
            raise
    return todo


def finish_run(prep: PreparedRun) -> RunSummary:
    """The per-fold table, and the assembled run once every fold is done."""
    run, folds, dataset = prep.run, prep.folds, prep.dataset
    summary = RunSummary(run_dir=run.path)
    for k in run.done_folds():
        info = run.read_fold_info(k)
        summary.fold_rows.append({"fold": k, **{m: info.get(m) for m in
                                  ("accuracy", "log_loss", "seconds", "epochs_run")}})
    if len(run.done_folds()) == folds.k:
        test_ids = np.asarray(dataset.test["id"], dtype=object)
        if run.read_meta().get("status") != "complete":
            # the cost is measured before assembling, so meta.json is written once, with it
            meta = {**prep.meta, **measure_cost(prep)}
            summary.run = run.assemble(run.path.name, dataset.classes, folds, test_ids, meta)
            shutil.rmtree(run.path / "work", ignore_errors=True)
        else:
            summary.run = load_run(run.path)
            # a run from before issue 30, or a cost to time again on a quiet machine
            if "passes_per_image" not in summary.run.meta or prep.cfg.remeasure_cost:
                run.write_meta({**summary.run.meta, **measure_cost(prep)})
                summary.run = load_run(run.path)
        if prep.cfg.refit_full:
            from runner.refit import train_refit

            refit = train_refit(prep)
            ms = summary.run.meta.get("ms_per_pass")
            if ms is not None:  # one model on the run's views: the run's latest timing
                refit = {**refit, "ms_per_image": float(ms) * int(refit["passes_per_image"])}
            if summary.run.meta.get("refit") != refit:
                run.write_meta({**summary.run.meta, "refit": refit})
                summary.run = load_run(run.path)
            summary.refit = refit
        summary.complete = True
        summary.oof_scores = summary.run.scores()
    if prep.cfg.mlflow:
        from runner.tracking import track_run

        summary.mlflow_run_id = track_run(prep.cfg.mlflow, run, summary.complete)
    return summary


def measure_cost(prep: PreparedRun) -> dict[str, Any]:
    """meta.json's cost keys (``runner.cost``), timed on the run's first test images (its
    training images when it has no test set) at its thread count."""
    from runner.cost import run_cost

    images = load_fold_images(prep)
    timed = images.test if len(images.test) else images.train
    return run_cost(prep.backend, prep.meta, prep.run.checkpoint_dir(), prep.folds.k, timed,
                    int(prep.cfg.threads or default_threads()))


def run_folds(cfg: RunConfig) -> RunSummary:
    """Train ``cfg.backbone`` on each stored fold not yet done, then assemble the run."""
    prep = prepare_run(cfg)
    train_locked(prep, prep.todo())
    return finish_run(prep)


def _train_folds(prep: PreparedRun, todo: list[int], images: FoldImages | None = None) -> None:
    t0 = time.perf_counter()
    # Decoding validates every image, train and test, before the first epoch.
    images = images or load_fold_images(prep)
    log.info("images ready in %.1fs", time.perf_counter() - t0)
    for k in todo:
        train_one_fold(prep, images, k)


@dataclass
class LRFindSummary:
    """What ``lr_find`` returns: the curve, its suggestion and where they were written."""

    result: Any
    json_path: Path
    plot_path: Path


def write_augment(cfg: RunConfig) -> Path:
    """``--write-augment FILE``: the ``--augment`` pipeline as an albumentations file to edit, at
    the size the run predicts at (the backbone's default when ``--img-size`` is not given)."""
    import backbones
    from recipe.augment import save_augment

    spec, _ = backbones.resolve(cfg)
    return save_augment(cfg.augment, spec.input_size, cfg.write_augment)


def lr_find(cfg: RunConfig) -> LRFindSummary:
    """The LR range test (``run_folds.py --lr-find``) on fold 0's training rows.

    One batch per learning rate on a geometric ramp from 1e-7 to 1, for the phase that trains
    every layer; the curve (``lr_find.png``), the numbers and the suggested ``--lr`` go into the
    run folder's ``lr_find/``. No fold is trained and no OOF is written.
    """
    import backbones
    from backbones.base import FoldJob
    from recipe.lr_find import LR_FIND_DIR, lr_ramp, save, suggest

    dataset = load_dataset(cfg.data, cfg.layout, cfg.test)
    parse_class_weights(cfg.class_weights, dataset.classes)  # names this dataset's classes?
    root = run_root_for(cfg, dataset)
    refuse_unsplittable(dataset, root, cfg.folds)
    spec, backend = backbones.resolve(cfg)
    x_all = cached_images(list(dataset.train["path"]), spec.input_size, root / "cache",
                          cfg.resize, progress=cfg.progress)
    folds = ensure_folds(root, list(dataset.train["id"]), list(dataset.train["label"]),
                         cfg.folds, cfg.seed, cfg.folds_group,
                         make_groups=lambda: duplicate_groups(dataset, root))
    order, y_all = _fold_rows(dataset, folds)
    tr, _ = folds.split(0)
    run_path = root / cfg.resolved_run_name(spec.input_size)
    seed = cfg.train_seed if cfg.train_seed is not None else folds.seed
    job = FoldJob(spec=spec, cfg=cfg, fold=0, classes=dataset.classes,
                  x_train=np.asarray(x_all[order[tr]]), y_train=y_all[tr],
                  x_val=np.asarray(x_all[order[tr[:0]]]), y_val=y_all[tr[:0]],
                  x_test=np.asarray(x_all[order[tr[:0]]]), checkpoint_path=Path(os.devnull),
                  work_dir=run_path / "work" / "lr_find", history_path=Path(os.devnull),
                  seed=seed)
    lrs = lr_ramp()
    log.info("LR range test: %d batches of %d, LR %.0e to %.0e", len(lrs), cfg.batch_size,
             lrs[0], lrs[-1])
    result = suggest(list(lrs), backend.lr_range_test(job, lrs))
    data, plot = save(result, run_path / LR_FIND_DIR, f"LR range test: {run_path.name}")
    return LRFindSummary(result, data, plot)
