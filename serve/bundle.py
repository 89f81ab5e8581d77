"""A stack folder (or an exported bundle) loaded as one object that predicts images.

``Ensemble.load(STACK_DIR).predict_proba(images)`` runs every level-1 run's fold models (their
mean, as for the test set), each with its own preprocessing and TTA, then the saved stacker, so a
served image gets exactly the arithmetic the stack's test rows got. Like AutoGluon's
``TabularPredictor.load``, loading checks what it loads: the library versions recorded when the
models were saved (a pickled scikit-learn estimator is only promised to load in its own
version), the fold fingerprint and class order shared by every run and the stacker, and, for an
exported bundle, the SHA-256 of every file before any of them is read.

A stack made under a budget may serve a run another way than as trained (``stacker.json``
runs[i].variant, ``ensemble.cost.Variant``): by its one ``--refit-full`` model, and/or on a subset
of its TTA views; the run's entry then loads that checkpoint and keeps those views only, so the
served probabilities are the ones the stack's test rows were made of.

A level-1 run folder loads too (``describe_run``): the run alone, by its refit model where it
has one, so a ``--refit-full`` run or a distilled student is served as the one model it is.

``python -m serve.bundle STACK_DIR --out DIR [--subset greedy]`` (or ``foldstack-bundle``; options
in ``serve.config.BundleConfig``) exports a self-contained folder (manifest, stacker, each run's
meta and fold weights) that runs without the run root.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ensemble.cost import Cost, Variant, variant_cost
from ensemble.saved import (
    STACKER_FILE,
    STACKER_INFO,
    SavedStacker,
    installed_versions,
    load_stacker,
    read_stacker_info,
    save_stacker,
    sha256_of,
    version_mismatches,
)
from oof.atomic import write_json
from oof.distill import student_entry
from oof.errors import ConfigError, DataError, RunMismatchError
from serve.config import parse_subset

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "foldstack-bundle/1"


class RunPredictor(Protocol):
    """What a family's ``load_run_predictor`` returns: every fold model of one run."""

    input_size: int

    def predict_proba(self, images: np.ndarray) -> np.ndarray:
        """(K, N, C): each fold model's probabilities, fold order."""
        ...


@dataclass
class RunEntry:
    """One level-1 run of the ensemble: its meta.json, its fold checkpoints (fold order) and
    the other files its family's predictor reads (``Family.run_files``: the probe's extractor)."""

    name: str
    meta: dict[str, Any]
    checkpoints: list[Path]
    files: list[Path] = field(default_factory=list)
    variant: Variant = field(default_factory=Variant)  # fold models or refit, which views

    @property
    def cost(self) -> Cost:
        """Passes and milliseconds per image of this run as it is served."""
        return variant_cost(self.meta, self.variant)

    @property
    def family(self) -> str:
        return str(self.meta["backbone"]["family"])

    @property
    def input_size(self) -> int:
        return int(self.meta["backbone"]["input_size"])


@dataclass
class Prediction:
    """The ensemble's probabilities and each run's own (fold-mean) vote, rows = images."""

    proba: np.ndarray
    runs: dict[str, np.ndarray]
    classes: list[str]

    def labels(self) -> list[str]:
        return [self.classes[i] for i in self.proba.argmax(axis=1)]


# ------------------------------------------------------------------------------ describing


def _run_entry(run_path: Path, name: str, variant: Variant | None = None) -> RunEntry:
    meta_path = run_path / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{meta_path}: cannot read the run's meta ({exc})") from exc
    if int(meta.get("level", 1)) != 1 or "backbone" not in meta:
        raise RunMismatchError(f"{run_path}: run {name!r} is a level-{meta.get('level')} stack; "
                               "only stacks of level-1 runs (fold models) can be served")
    family = _family(meta, run_path)
    variant = variant or Variant()
    if variant.models == "refit":
        if not (meta.get("refit") or {}).get("checkpoint"):
            raise DataError(f"run {name!r} ({run_path}): served by its refit model, but its "
                            "meta.json records none (run_folds.py --refit-full)")
        ckpts = [run_path / str(meta["refit"]["checkpoint"])]
    else:
        ckpts = [run_path / "checkpoints" / family.checkpoint_name(k)
                 for k in range(int(meta["folds"]))]
    files = [run_path / "checkpoints" / f for f in family.run_files(meta)]
    missing = [str(p) for p in ckpts + files if not p.exists()]
    if missing:
        old = [p for p in missing if Path(p).with_suffix(".pt").exists()]
        hint = (" (this run has pickled .pt checkpoints from an older foldstack: retrain it so "
                "its folds are saved as safetensors)") if old else ""
        raise DataError(f"run {name!r}: missing fold checkpoint(s) {missing}{hint}")
    return RunEntry(name, meta, ckpts, files, variant)


def keep_views(predictor: Any, views: tuple[str, ...], where: str) -> None:
    """Serve ``predictor`` (a family's run predictor) on the named TTA views only, in their
    trained order: each fold predictor's ``views`` (or the run predictor's own, the probe's)."""
    holders = list(getattr(predictor, "folds", None) or [predictor])
    for h in holders:
        have = getattr(h, "views", None)
        if have is None:
            raise RunMismatchError(f"{where}: its family's predictor cannot serve a subset of "
                                   "TTA views")
        names = [v.name for v in have]
        unknown = [v for v in views if v not in names]
        if unknown:
            raise RunMismatchError(f"{where}: no TTA view(s) {unknown}; it predicts with "
                                   f"{names}")
        h.views = [v for v in have if v.name in views]


def _family(meta: dict[str, Any], where: Path) -> Any:
    """The registered family that trained a run (its light registry entry: no framework)."""
    import backbones

    name = str(meta["backbone"].get("family", ""))
    if name not in backbones.FAMILIES:
        raise RunMismatchError(f"{where}: unknown backbone family {name!r}; known: "
                               f"{sorted(backbones.FAMILIES)}")
    return backbones.get_backend(name)


def _check_consistent(entries: list[RunEntry], info: dict[str, Any], where: Path) -> None:
    """Every run must match the stacker's record: name order, fingerprint, class order."""
    names = [r["run"] for r in info["runs"]]
    if [e.name for e in entries] != names:
        raise RunMismatchError(f"{where}: runs {[e.name for e in entries]} != the stacker's "
                               f"inputs {names}")
    problems = []
    for e in entries:
        if e.meta.get("fold_fingerprint") != info["fold_fingerprint"]:
            problems.append(f"{e.name}: fold fingerprint {e.meta.get('fold_fingerprint')} != "
                            f"{info['fold_fingerprint']} of the stacker")
        if list(e.meta.get("classes", [])) != list(info["classes"]):
            problems.append(f"{e.name}: class order {e.meta.get('classes')} != "
                            f"{info['classes']} of the stacker")
    if problems:
        raise RunMismatchError(f"{where}: these runs do not match the stacker:\n  "
                               + "\n  ".join(problems))


def import_backends(families: set[str]) -> None:
    """Load the frameworks of the families serving needs, in the order their ``load_rank``
    asks (two frameworks in one process may only load in one order: see ``Family``)."""
    import backbones

    for family in sorted((backbones.get_backend(f) for f in families),
                         key=lambda f: (f.load_rank, f.name)):
        family.load()


def _framework_versions(family: str) -> dict[str, str]:
    """Installed versions of the family's ``libraries`` from package metadata: checking them
    must not cost a TensorFlow import (seconds) before a bundle is refused or exported; the
    family's own report where the metadata lacks one (e.g. tensorflow as tensorflow-cpu)."""
    from importlib import metadata

    import backbones

    out = {}
    for name in backbones.get_backend(family).libraries:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            import_backends({family})
            return backbones.get_backend(family).versions()
    return out


def _check_run_versions(entries: list[RunEntry], allow: bool) -> None:
    bad = []
    families: dict[str, dict[str, str]] = {}
    for e in entries:
        if e.family not in families:
            families[e.family] = _framework_versions(e.family)
        recorded = {k: v for k, v in e.meta.get("versions", {}).items()
                    if k in families[e.family]}
        bad += [f"{e.name}: {m}" for m in version_mismatches(recorded, families[e.family])]
    if bad and not allow:
        raise RunMismatchError("fold models saved with other library versions:\n  "
                               + "\n  ".join(bad)
                               + "\ninstall those versions, or pass --allow-version-mismatch")
    for b in bad:
        log.warning("version mismatch allowed: %s", b)


# ------------------------------------------------------------------------------ decoding


def decode(images: Sequence[Any], size: int, names: Sequence[str] | None = None) -> np.ndarray:
    """(N, size, size, 3) uint8 from paths, encoded bytes or RGB arrays.

    Files and bytes go through ``oof.images.read_rgb``, the decoder that made the training and
    test caches (EXIF turn, colour conversion, JPEG draft, bilinear squash), so a served file
    gives the pixels the stack's own test rows were predicted from. One bad image -> DataError
    naming it.
    """
    from PIL import Image

    from oof.images import read_rgb

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, item in enumerate(images):
        name = names[i] if names is not None else (
            str(item) if isinstance(item, (str, os.PathLike)) else f"image {i}")
        try:
            if isinstance(item, np.ndarray):
                arr = np.asarray(item)
                if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
                    raise ValueError(f"expected uint8 (H, W, 3) RGB, got {arr.dtype} "
                                     f"{arr.shape}")
                if arr.shape[:2] != (size, size):
                    arr = np.asarray(Image.fromarray(arr).resize(
                        (size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))
                out[i] = arr
            elif isinstance(item, (bytes, bytearray, memoryview)):
                out[i] = read_rgb(io.BytesIO(bytes(item)), size)  # type: ignore[arg-type]
            else:
                out[i] = read_rgb(item, size)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is the image's fault
            raise DataError(f"{name}: cannot be read as an image ({type(exc).__name__}: "
                            f"{str(exc)[:200]})") from exc
    return out


# ------------------------------------------------------------------------------ the ensemble


@dataclass
class Ensemble:
    """Fold models of every run + the final stacker, loaded once; see the module docstring."""

    root: Path
    manifest: dict[str, Any]
    runs: list[RunEntry]
    stacker: SavedStacker | Any
    predictors: dict[str, RunPredictor] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def run_names(self) -> list[str]:
        return [r.name for r in self.runs]

    @property
    def sizes(self) -> list[int]:
        return sorted({r.input_size for r in self.runs})

    # -- loading

    @classmethod
    def load(cls, path: str | Path, *, subset: str | list[str] | None = None,
             allow_version_mismatch: bool = False, threads: int | None = None,
             device: str = "cpu") -> Ensemble:
        """A bundle folder (with manifest.json), a stack folder written by ``stack.py``, or a
        level-1 run folder (``describe_run``: its refit model where it has one).

        ``subset``: 'greedy' (the runs greedy selection keeps) or run names; only for a stack
        folder (a bundle's subset is chosen when it is exported).
        """
        path = Path(path)
        subset = parse_subset(subset)
        if not path.is_dir():
            raise ConfigError(f"{path}: no such stack or bundle folder")
        if (path / MANIFEST).exists():
            if subset:
                raise ConfigError(f"--subset: {path} is an exported bundle: its runs were "
                                  "chosen at export (manifest subset: "
                                  f"{_read_manifest(path).get('subset')}); export another one")
            ens = cls._load_bundle(path, allow_version_mismatch)
        else:
            ens = cls._load_folder(path, subset, allow_version_mismatch)
        ens._load_models(threads, device)
        return ens

    @classmethod
    def _load_folder(cls, folder: Path, subset: str | list[str] | None,
                     allow: bool) -> Ensemble:
        """A stack folder or a level-1 run folder, as ``describe`` reads either."""
        manifest, entries, saved = describe(folder, subset, allow)
        _check_run_versions(entries, allow)
        return cls(folder, manifest, entries, saved)

    @classmethod
    def _load_bundle(cls, root: Path, allow: bool) -> Ensemble:
        manifest = _read_manifest(root)
        verify_files(root, manifest)
        bad = version_mismatches(manifest["versions"], installed_versions(
            tuple(k for k in manifest["versions"] if k != "python")))
        if bad and not allow:
            raise RunMismatchError(f"{root}: bundle saved with other library versions "
                                   f"({'; '.join(bad)}); install those versions, or pass "
                                   "--allow-version-mismatch")
        entries = [RunEntry(r["name"], _resolve_augment(json.loads((root / r["meta"]).read_text()),
                                                        root),
                            [root / c["file"] for c in r["checkpoints"]],
                            [root / f for f in r.get("files", [])],
                            Variant.from_dict(r.get("variant")))
                   for r in manifest["runs"]]
        saved = load_stacker(root, STACKER_FILE, allow_version_mismatch=allow)
        _check_consistent(entries, saved.info, root)
        if saved.info["fold_fingerprint"] != manifest["fold_fingerprint"]:
            raise RunMismatchError(f"{root}: stacker fingerprint differs from the manifest's")
        _check_run_versions(entries, allow)
        return cls(root, manifest, entries, saved)

    def _load_models(self, threads: int | None, device: str) -> None:
        import backbones

        # half the cores each by default: a framework's pool that spins after its call must
        # not starve the other's (measured on 2 busy cores: timm 15 ms at 1 thread, 120 at 2)
        threads = threads or max(1, (os.cpu_count() or 2) // 2)
        t0 = time.perf_counter()
        import_backends({e.family for e in self.runs})
        for e in self.runs:
            family = backbones.get_backend(e.family)
            self.predictors[e.name] = family.load_run_predictor(e.meta, e.checkpoints, threads,
                                                                device)
            if e.variant.views is not None:
                keep_views(self.predictors[e.name], e.variant.views,
                           f"run {e.name!r} served as {e.variant.label}")
        log.info("loaded %d fold models of %d runs in %.1fs",
                 sum(len(e.checkpoints) for e in self.runs), len(self.runs),
                 time.perf_counter() - t0)

    # -- predicting

    def decode(self, images: Sequence[Any], names: Sequence[str] | None = None
               ) -> dict[int, np.ndarray]:
        """Images decoded once per input size the runs need."""
        return {s: decode(images, s, names) for s in self.sizes}

    def predict_decoded(self, decoded: dict[int, np.ndarray]) -> Prediction:
        """Each run's fold-mean (its refit model's prediction when served by it), then the
        stacker on the runs side by side (stacker order)."""
        votes: dict[str, np.ndarray] = {}
        for e in self.runs:
            x = decoded[e.input_size]
            votes[e.name] = np.asarray(self.predictors[e.name].predict_proba(x)).mean(axis=0)
        X = np.hstack([votes[e.name] for e in self.runs])
        return Prediction(self.stacker.predict_proba(X), votes, self.classes)

    def predict(self, images: Sequence[Any], names: Sequence[str] | None = None) -> Prediction:
        return self.predict_decoded(self.decode(images, names))

    def predict_proba(self, images: Sequence[Any]) -> np.ndarray:
        """(N, C) probabilities for paths, encoded bytes or uint8 RGB arrays."""
        return self.predict(images).proba

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` shows: models, classes, versions, scores, subset, and the cost
        (forward passes and milliseconds per image, issue 30 item 1) of each run as served and
        of the whole ensemble (ms blank where a run's was not measured)."""
        m = self.manifest
        return {"status": "ok", "classes": self.classes, "fold_fingerprint":
                m["fold_fingerprint"],
                "models": [{"run": e.name, "backbone": e.meta["backbone"]["name"],
                            "input_size": e.input_size, "folds": int(e.meta["folds"]),
                            "tta": e.meta["config"].get("tta"), "served_as": e.variant.label,
                            "models": len(e.checkpoints),
                            "views": None if e.variant.views is None else list(e.variant.views),
                            **e.cost.row(), **student_entry(e.meta)} for e in self.runs],
                "cost": sum((e.cost for e in self.runs), Cost(0, 0.0)).row(),
                "stacker": {"method": m["stacker"]["method"],
                            "level2_scores": m["stacker"]["level2_scores"]},
                "subset": m.get("subset"), "versions": m["versions"],
                "run_versions": {e.name: e.meta.get("versions", {}) for e in self.runs}}


# ------------------------------------------------------------------------------ manifest


def describe_stack(stack_dir: Path, subset: str | list[str] | None = None,
                   allow_version_mismatch: bool = False
                   ) -> tuple[dict[str, Any], list[RunEntry], Any]:
    """The manifest of a stack folder (runs read where stack.py found them) and its stacker.

    With ``subset``, the stacker is refitted on the kept runs and the manifest shows the
    subset's honest level-2 score beside the full stack's.
    """
    from ensemble.saved import fit_subset

    stack_dir = Path(stack_dir)
    subset = parse_subset(subset)
    info = read_stacker_info(stack_dir)
    if isinstance(subset, list):
        names = [r["run"] for r in info["runs"]]
        unknown = [n for n in subset if n not in names]
        if unknown:
            raise ConfigError(f"--subset {','.join(subset)}: {stack_dir} has no run(s) "
                              f"{unknown}; its runs are {names}")
    saved = load_stacker(stack_dir, allow_version_mismatch=allow_version_mismatch)
    subset_info = None
    if subset:
        fitted = fit_subset(stack_dir, None if subset == "greedy" else subset)
        keep = fitted.kept
        subset_info = {"rule": fitted.rule, "kept": fitted.kept, "dropped": fitted.dropped,
                       "level2_scores": fitted.level2_scores,
                       "full_level2_scores": fitted.full_level2_scores,
                       "cost": fitted.cost, "full_cost": fitted.full_cost}
        info = {**info, "runs": [r for r in info["runs"] if r["run"] in keep],
                "level2_scores": fitted.level2_scores}
        saved = SavedStacker(fitted.stacker, info)
        log.info("serving %d of %d runs (%s): level-2 %s vs %s with all runs", len(keep),
                 len(keep) + len(fitted.dropped), subset_info["rule"], fitted.level2_scores,
                 fitted.full_level2_scores)
    entries = [_run_entry(Path(r["path"]), r["run"], Variant.from_dict(r.get("variant")))
               for r in info["runs"]]
    _check_consistent(entries, info, stack_dir)
    return _manifest(stack_dir, info, entries, subset_info), entries, saved


def describe_run(run_dir: Path, subset: str | list[str] | None = None
                 ) -> tuple[dict[str, Any], list[RunEntry], Any]:
    """A level-1 run folder served alone, as a stack of one run (issue 30 item 4: a run folder
    is a predictor too): by its ``--refit-full`` model when it has a finished one (one model,
    the point of a refit run or a distilled student), else by the mean of its fold models, as
    its test rows were made. The "stacker" is the mean of that one run; its level-2 scores are
    the run's OOF scores (a refit model is estimated by them; a student's are optimistic)."""
    from ensemble.saved import stacker_record
    from ensemble.stackers import make_stacker
    from ensemble.variants import has_refit, variant_run
    from oof.metrics import scores
    from oof.rundir import load_run

    run_dir = Path(run_dir)
    if parse_subset(subset):
        raise ConfigError(f"--subset: {run_dir} is one run folder; a subset needs a stack folder")
    run = load_run(run_dir)
    served = variant_run(run, Variant("refit") if has_refit(run) else Variant())
    rows = ~np.isnan(served.oof).any(axis=1)
    stacker = make_stacker("mean").fit(served.oof[rows], run.y[rows])
    info = stacker_record(stacker, "mean", [served], run.classes, run.fingerprint,
                          scores(run.y[rows], served.oof[rows]))
    entries = [_run_entry(run_dir, run.name, getattr(served, "variant", None))]
    _check_consistent(entries, info, run_dir)
    return _manifest(run_dir, info, entries, None), entries, SavedStacker(stacker, info)


def describe(path: Path, subset: str | list[str] | None = None,
             allow_version_mismatch: bool = False) -> tuple[dict[str, Any], list[RunEntry], Any]:
    """A stack folder's manifest (``describe_stack``), or a level-1 run folder's
    (``describe_run``): a folder with ``meta.json`` of level 1 and no ``stacker.json``."""
    path = Path(path)
    meta = path / "meta.json"
    if not (path / STACKER_INFO).exists() and meta.exists():
        try:
            level = int(json.loads(meta.read_text()).get("level", 1))
        except (OSError, ValueError, AttributeError) as exc:
            raise DataError(f"{meta}: cannot read the run's meta ({exc})") from exc
        if level == 1:
            return describe_run(path, subset)
    return describe_stack(path, subset, allow_version_mismatch)


def _manifest(source: Path, info: dict[str, Any], entries: list[RunEntry],
              subset_info: dict[str, Any] | None) -> dict[str, Any]:
    """The manifest of what ``source`` (a stack or run folder) serves: the stacker's record,
    each run as served (variant, cost, checkpoints, files), the whole's cost."""
    return {
        "format": FORMAT, "source": str(source.resolve()), "classes": info["classes"],
        "fold_fingerprint": info["fold_fingerprint"],
        "stacker": {"file": STACKER_FILE, "method": info["method"], "params": info["params"],
                    "level2_scores": info["level2_scores"]},
        "subset": subset_info, "versions": info["versions"],
        "runs": [{"name": e.name, "backbone": e.meta["backbone"]["name"],
                  "input_size": e.input_size, "meta": f"runs/{e.name}/meta.json",
                  "variant": e.variant.to_dict(), **e.cost.row(), **student_entry(e.meta),
                  "checkpoints": [{"fold": "refit" if e.variant.models == "refit" else k,
                                   "file": f"runs/{e.name}/{p.name}"}
                                  for k, p in enumerate(e.checkpoints)],
                  "files": [f"runs/{e.name}/{p.name}" for p in e.files]}
                 for e in entries],
        "cost": sum((e.cost for e in entries), Cost(0, 0.0)).row(),
    }


def _read_manifest(root: Path) -> dict[str, Any]:
    p = root / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"{p}: damaged bundle manifest ({type(exc).__name__}: {exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise RunMismatchError(f"{p}: not a {FORMAT} manifest (format "
                               f"{manifest.get('format') if isinstance(manifest, dict) else '?'})")
    return manifest


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists exists with its recorded SHA-256, before any is read."""
    problems = []
    for rel, digest in sorted(manifest.get("files", {}).items()):
        p = root / rel
        if not p.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_of(p) != digest:
            problems.append(f"{rel}: damaged or replaced (SHA-256 differs from the manifest)")
    if problems or not manifest.get("files"):
        raise DataError(f"{root}: damaged bundle, nothing was loaded:\n  "
                        + "\n  ".join(problems or ["the manifest lists no files"]))


AUGMENT_SUFFIXES = (".json", ".yaml", ".yml")  # = backbones.augment.PIPELINE_SUFFIXES


def _with_bundled_augment(entry: RunEntry, root: Path) -> dict[str, Any]:
    """The run's meta, its augmentation pipeline file copied in when TTA draws views from it
    (``--tta-augment N`` with ``--augment FILE``): the bundle must not need the original path."""
    meta = json.loads(json.dumps(entry.meta))
    cfg = meta.get("config", {})
    source = Path(str(cfg.get("augment", "")))
    if cfg.get("tta_augment") and source.suffix.lower() in AUGMENT_SUFFIXES:
        if not source.is_file():
            raise DataError(f"run {entry.name!r}: its TTA pipeline {source} is missing")
        rel = f"runs/{entry.name}/augment{source.suffix.lower()}"
        shutil.copyfile(source, root / rel)
        cfg["augment"] = rel
    return meta


def _resolve_augment(meta: dict[str, Any], root: Path) -> dict[str, Any]:
    """A bundled pipeline path is relative to the bundle: make it absolute for the backend."""
    cfg = meta.get("config", {})
    aug = str(cfg.get("augment", ""))
    if aug.startswith("runs/") and (root / aug).is_file():
        cfg["augment"] = str(root / aug)
    return meta


def export_bundle(stack_dir: str | Path, out: str | Path,
                  subset: str | list[str] | None = None) -> Path:
    """Copy what serving needs into ``out`` (which must not exist), atomically.

    The folder is assembled next to ``out`` and renamed into place, so a kill leaves no
    half-bundle under the final name.
    """
    out = Path(out)
    if out.exists():
        raise ConfigError(f"--out {out}: already exists; choose a new folder")
    manifest, entries, saved = describe(Path(stack_dir), subset)
    _check_run_versions(entries, allow=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        from ensemble.variants import load_variant_run

        runs = [load_variant_run(r) for r in saved.info["runs"]]  # variants recorded again
        save_stacker(tmp, saved.stacker, saved.info["method"], runs, saved.info["classes"],
                     saved.info["fold_fingerprint"], saved.info["level2_scores"])
        for e, r in zip(entries, manifest["runs"]):
            (tmp / "runs" / e.name).mkdir(parents=True)
            write_json(tmp / r["meta"], _with_bundled_augment(e, tmp))
            for ck, spec in zip(e.checkpoints, r["checkpoints"]):
                shutil.copyfile(ck, tmp / spec["file"])
            for src, rel in zip(e.files, r["files"]):
                shutil.copyfile(src, tmp / rel)
        manifest["versions"] = {**saved.info["versions"], **json.loads(
            (tmp / "stacker.json").read_text())["versions"]}
        manifest["files"] = {str(p.relative_to(tmp)): sha256_of(p)
                             for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest["exported"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        write_json(tmp / MANIFEST, manifest)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


if __name__ == "__main__":
    import sys

    from serve.cli import bundle_cli

    sys.exit(bundle_cli(prog="python -m serve.bundle"))
