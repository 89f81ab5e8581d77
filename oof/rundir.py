"""The run directory: the OOF contract on disk.

Layout of ``<run root>/<run>/``::

    config.yaml          resolved config the run was started with
    meta.json            config, versions, seeds, fold fingerprint, classes, per-fold metrics
    parts/foldK.*        per-fold OOF rows, test predictions and history; foldK.json marks done
    oof.parquet          id, label, fold, <run>__<class>...   (every training id exactly once)
    test.parquet         id, <run>__<class>...                (mean of the fold models)
    test_folds.parquet   id, fold, <run>__<class>...          (each fold model's test prediction;
                                                              a stack's: see FOLD_K_ONLY)
    history.csv          fold, epoch, metrics per epoch
    views_oof.parquet    optional (``--tta-save-views``): id, label, fold, view, <run>__<class>...
    views_test_folds.parquet   id, fold, view, <run>__<class>...  (each TTA view alone; the
                         OOF and test matrices above average the views)
    refit/               optional (``--refit-full``): one model on ALL training rows, no OOF of
                         its own; test.parquet (its test prediction, columns as above),
                         views_test.parquet (with --tta-save-views: id, view, columns),
                         history.csv, refit.json (written last: the marker); its weights are
                         checkpoints/refit<suffix>; meta.json "refit" describes it

Rows no fold predicted are NaN, never 0 (leak-aware, as AutoGluon's bagged models do: a 0 would
look like a confident prediction to a stacker). Every file is written atomically, and a fold's
JSON marker is written last, so a killed fold leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oof.atomic import write_atomic, write_json
from oof.errors import DataError, RunMismatchError
from oof.folds import FOLDS_FILE, Folds, fold_fingerprint
from oof.metrics import scores

log = logging.getLogger(__name__)

META_FILE = "meta.json"
REFIT_DIR = "refit"
REFIT_MARKER = "refit.json"
PARQUET_META_KEY = b"foldstack"
# A stack's meta "test_folds" when row k of its test_folds.parquet is fold stacker k (fitted
# without fold k) applied to its inputs' rows k: made by fold-k models only, at any level. Stacks
# written before it (issue 28) hold fold stacker k applied to the fold-mean test there, which
# includes models trained on fold k. A level-1 run's row k is always its fold-k model's.
FOLD_K_ONLY = "fold-k models only/v1"


def column_names(run: str, classes: list[str]) -> list[str]:
    return [f"{run}__{c}" for c in classes]


@dataclass
class FoldPart:
    """What one fold contributes: predictions for its held-out rows and for the test set."""

    fold: int
    val_ids: np.ndarray
    val_proba: np.ndarray
    test_proba: np.ndarray
    history: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    views: dict[str, Any] | None = None  # FoldResult.views: names, val (V, n, C), test


@dataclass
class Run:
    """A complete run loaded from disk: what a notebook, a stacker or the analysis needs."""

    path: Path
    name: str
    classes: list[str]
    ids: np.ndarray
    labels: np.ndarray  # class names (str)
    y: np.ndarray  # class indices into ``classes``
    folds: np.ndarray
    oof: np.ndarray  # (n_train, n_classes), NaN where no fold predicted
    test_ids: np.ndarray
    test: np.ndarray  # (n_test, n_classes), mean of the fold models
    fingerprint: str
    meta: dict[str, Any]

    @property
    def columns(self) -> list[str]:
        return column_names(self.name, self.classes)

    def test_per_fold(self) -> np.ndarray:
        """(K, n_test, n_classes): each fold model's test prediction, in ``test_ids`` order."""
        df = pd.read_parquet(self.path / "test_folds.parquet")
        k = int(df["fold"].max()) + 1 if len(df) else 0
        out = np.full((k, len(self.test_ids), len(self.classes)), np.nan)
        pos = {i: n for n, i in enumerate(self.test_ids)}
        for f, part in df.groupby("fold"):
            rows = [pos[i] for i in part["id"]]
            out[int(f), rows] = part[self.columns].to_numpy(np.float64)
        return out

    def fold_k_only(self) -> bool:
        """Whether row k of ``test_per_fold()`` came from fold-k models only (no model that saw
        fold k's labels): always for a level-1 run, for a stack only with the FOLD_K_ONLY mark."""
        return int(self.meta.get("level", 1)) < 2 or self.meta.get("test_folds") == FOLD_K_ONLY

    def scores(self) -> dict[str, float]:
        return scores(self.y, self.oof)

    def views_oof(self) -> tuple[list[str], np.ndarray] | None:
        """(view names, (V, n_train, C)): each TTA view's OOF alone, rows in ``ids`` order;
        None for a run without ``--tta-save-views`` (the views' mean is ``oof``)."""
        got = _read_views(self, "views_oof.parquet")
        if got is None:
            return None
        names, df = got
        pos = {i: n for n, i in enumerate(self.ids)}
        out = np.full((len(names), len(self.ids), len(self.classes)), np.nan)
        for v, name in enumerate(names):
            part = df[df["view"] == name]
            out[v, [pos[i] for i in part["id"].astype(str)]] = part[self.columns].to_numpy(
                np.float64)
        return names, out

    def views_test_per_fold(self) -> tuple[list[str], np.ndarray] | None:
        """(view names, (V, K, n_test, C)): each fold model's test prediction by each view
        alone, rows in ``test_ids`` order; None without ``--tta-save-views``."""
        got = _read_views(self, "views_test_folds.parquet")
        if got is None:
            return None
        names, df = got
        k = int(df["fold"].max()) + 1
        pos = {i: n for n, i in enumerate(self.test_ids)}
        out = np.full((len(names), k, len(self.test_ids), len(self.classes)), np.nan)
        for (name, f), part in df.groupby(["view", "fold"], sort=False):
            out[names.index(name), int(f), [pos[i] for i in part["id"].astype(str)]] = part[
                self.columns].to_numpy(np.float64)
        return names, out

    def refit_views_test(self) -> tuple[list[str], np.ndarray] | None:
        """(view names, (V, n_test, C)): the refit model's test prediction by each view alone;
        None without a refit stored with ``--tta-save-views``."""
        if not (self.path / REFIT_DIR / REFIT_MARKER).exists():
            return None
        got = _read_views(self, f"{REFIT_DIR}/views_test.parquet")
        if got is None:
            return None
        names, df = got
        pos = {i: n for n, i in enumerate(self.test_ids)}
        out = np.full((len(names), len(self.test_ids), len(self.classes)), np.nan)
        for v, name in enumerate(names):
            part = df[df["view"] == name]
            out[v, [pos[i] for i in part["id"].astype(str)]] = part[self.columns].to_numpy(
                np.float64)
        return names, out

    def refit_test(self) -> np.ndarray | None:
        """(n_test, C): the ``--refit-full`` model's test prediction in ``test_ids`` order, or
        None when the run has no finished refit (runs before it never do)."""
        return read_refit_test(self.path, self.name, self.classes, self.fingerprint,
                               self.test_ids)


def _write_parquet(path: Path, df: pd.DataFrame, info: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    meta = dict(table.schema.metadata or {})
    meta[PARQUET_META_KEY] = json.dumps(info).encode()
    write_atomic(path, lambda p: pq.write_table(table.replace_schema_metadata(meta), p))


def write_run(
    path: Path,
    name: str,
    classes: list[str],
    folds: Folds,
    oof: np.ndarray,
    test_ids: np.ndarray,
    test_per_fold: np.ndarray,
    meta: dict[str, Any],
    test: np.ndarray | None = None,
) -> Run:
    """Write the assembled matrices of a run (level 1 or 2) and its meta; return it loaded.

    ``oof`` rows follow ``folds.ids``; ``test_per_fold`` is (K, n_test, C) and its mean over
    folds becomes the run's test prediction unless ``test`` (n_test, C) is given: a stack's test
    prediction is its fold stackers applied to the inputs' fold-mean test, while its
    ``test_per_fold`` rows are fold-k only (FOLD_K_ONLY).
    """
    path = Path(path)
    cols = column_names(name, classes)
    info = {"run": name, "classes": classes, "fingerprint": folds.fingerprint}
    oof_df = pd.DataFrame({"id": folds.ids.astype(str), "label": folds.labels.astype(str),
                           "fold": folds.fold})
    oof_df[cols] = np.asarray(oof, dtype=np.float64)
    _write_parquet(path / "oof.parquet", oof_df, info)
    test_ids = np.asarray(test_ids, dtype=object).astype(str)
    if test is not None:
        test_mean = np.asarray(test, dtype=np.float64)
    else:
        test_mean = (test_per_fold.mean(axis=0) if len(test_per_fold)  # no fold: NaN, never 0
                     else np.full((len(test_ids), len(classes)), np.nan))
    test_df = pd.DataFrame({"id": test_ids})
    test_df[cols] = test_mean
    _write_parquet(path / "test.parquet", test_df, info)
    per_fold = pd.concat(
        [pd.DataFrame({"id": test_ids, "fold": f}).assign(**dict(zip(cols, p.T)))
         for f, p in enumerate(test_per_fold)] or [pd.DataFrame(columns=["id", "fold", *cols])],
        ignore_index=True,
    )
    _write_parquet(path / "test_folds.parquet", per_fold, info)
    y = np.array([classes.index(lab) for lab in folds.labels.astype(str)])
    full_meta = {
        **meta, "run": name, "status": "complete", "classes": classes,
        "fold_fingerprint": folds.fingerprint, "folds": folds.k, "fold_seed": folds.seed,
        "oof_metrics": scores(y, np.asarray(oof, dtype=np.float64)),
        "rows_without_prediction": int(np.isnan(oof).any(axis=1).sum()),
    }
    write_json(path / META_FILE, full_meta)
    return load_run(path)


class RunDir:
    """Per-fold parts of a run in progress, and their assembly into the final matrices."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.parts = self.path / "parts"

    def history_path(self, fold: int) -> Path:
        """Per-fold history CSV; backends may append to it live, ``write_fold`` rewrites it."""
        return self.parts / f"fold{fold}_history.csv"

    def work_dir(self, fold: int) -> Path:
        """Scratch space of a fold in progress (backups for resuming); removed when it is done."""
        return self.path / "work" / f"fold{fold}"

    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def refit_dir(self) -> Path:
        return self.path / REFIT_DIR

    def refit_work_dir(self) -> Path:
        return self.path / "work" / REFIT_DIR

    def refit_done(self) -> bool:
        """A finished refit (its marker is written last): it is never trained again."""
        return (self.refit_dir() / REFIT_MARKER).exists()

    def write_refit(self, name: str, classes: list[str], fingerprint: str, test_ids: np.ndarray,
                    test_proba: np.ndarray, history: list[dict[str, Any]],
                    info: dict[str, Any], views: dict[str, Any] | None = None) -> None:
        """The refit model's test prediction (and each view's, with ``--tta-save-views``) and
        history, then its marker (last). It has no OOF: every training row trained it."""
        cols = column_names(name, classes)
        ids = np.asarray(test_ids, dtype=object).astype(str)
        meta = {"run": name, "classes": classes, "fingerprint": fingerprint}
        df = pd.DataFrame({"id": ids})
        df[cols] = np.asarray(test_proba, dtype=np.float64)
        _write_parquet(self.refit_dir() / "test.parquet", df, meta)
        if views is not None:
            frames = [pd.DataFrame({"id": ids, "view": n}).assign(**dict(zip(cols, p.T)))
                      for n, p in zip(views["names"], views["test"], strict=True)]
            _write_parquet(self.refit_dir() / "views_test.parquet",
                           pd.concat(frames, ignore_index=True), meta)
        hist = pd.DataFrame(history)
        write_atomic(self.refit_dir() / "history.csv", lambda p: hist.to_csv(p, index=False))
        write_json(self.refit_dir() / REFIT_MARKER, info)

    def read_refit_info(self) -> dict[str, Any]:
        return read_json(self.refit_dir() / REFIT_MARKER)

    def is_done(self, fold: int) -> bool:
        return (self.parts / f"fold{fold}.json").exists()

    def done_folds(self) -> list[int]:
        return sorted(int(p.stem[4:]) for p in self.parts.glob("fold*.json"))

    def read_meta(self) -> dict[str, Any]:
        p = self.path / META_FILE
        return read_json(p) if p.exists() else {}

    def write_meta(self, meta: dict[str, Any]) -> None:
        write_json(self.path / META_FILE, meta)

    def write_fold(self, part: FoldPart, classes: list[str]) -> None:
        """Write one fold's predictions, history and info; the JSON marker goes last."""
        k = part.fold
        val = pd.DataFrame({"id": np.asarray(part.val_ids).astype(str)})
        val[list(classes)] = np.asarray(part.val_proba, dtype=np.float64)
        write_atomic(self.parts / f"fold{k}_oof.parquet", lambda p: val.to_parquet(p, index=False))
        tst = pd.DataFrame(np.asarray(part.test_proba, dtype=np.float64), columns=list(classes))
        write_atomic(self.parts / f"fold{k}_test.parquet", lambda p: tst.to_parquet(p, index=False))
        if part.views is not None:  # each view alone: the rows above average them
            for which, ids in (("val", np.asarray(part.val_ids).astype(str)),
                               ("test", np.arange(len(part.test_proba)))):
                frames = []
                for name, proba in zip(part.views["names"], part.views[which], strict=True):
                    df = pd.DataFrame({"view": name, "id": ids})
                    df[list(classes)] = np.asarray(proba, dtype=np.float64)
                    frames.append(df)
                table = pd.concat(frames, ignore_index=True)
                write_atomic(self.parts / f"fold{k}_views_{which}.parquet",
                             lambda p, t=table: t.to_parquet(p, index=False))
        hist = pd.DataFrame(part.history).assign(fold=k)
        write_atomic(self.history_path(k), lambda p: hist.to_csv(p, index=False))
        write_json(self.parts / f"fold{k}.json", {"fold": k, **part.info})

    def read_fold_info(self, fold: int) -> dict[str, Any]:
        return json.loads((self.parts / f"fold{fold}.json").read_text())

    def assemble(
        self, name: str, classes: list[str], folds: Folds, test_ids: np.ndarray,
        meta: dict[str, Any],
    ) -> Run:
        """Join all finished folds into the run's matrices (only called when all are done).

        Only a fold's JSON marker makes it finished: parts of a fold killed mid-write are not
        read, and a missing fold is refused here rather than assembled as a hole.
        """
        missing = [k for k in range(folds.k) if not self.is_done(k)]
        if missing:
            raise RunMismatchError(
                f"{self.path}: folds {missing} are not finished (no parts/fold<k>.json); "
                "rerun the run's command to train them before assembling"
            )
        pos = {i: n for n, i in enumerate(folds.ids.astype(str))}
        oof = np.full((len(folds.ids), len(classes)), np.nan)
        per_fold = np.full((folds.k, len(test_ids), len(classes)), np.nan)
        histories = []
        for k in range(folds.k):
            val = pd.read_parquet(self.parts / f"fold{k}_oof.parquet")
            rows = np.array([pos[i] for i in val["id"]], dtype=np.int64)
            if not (folds.fold[rows] == k).all():
                raise RunMismatchError(f"{self.parts}: fold {k} predicted rows outside fold {k}")
            oof[rows] = val[list(classes)].to_numpy(np.float64)
            per_fold[k] = pd.read_parquet(self.parts / f"fold{k}_test.parquet")[list(classes)]
            if self.history_path(k).exists() and self.history_path(k).stat().st_size > 1:
                histories.append(pd.read_csv(self.history_path(k)))
        if histories:
            hist = pd.concat(histories, ignore_index=True)
            front = [c for c in ("fold", "epoch") if c in hist.columns]
            hist = hist[front + [c for c in hist.columns if c not in front]]
            write_atomic(self.path / "history.csv", lambda p: hist.to_csv(p, index=False))
        meta = {**meta, "fold_info": {k: self.read_fold_info(k) for k in range(folds.k)}}
        self._assemble_views(name, classes, folds, test_ids)
        return write_run(self.path, name, classes, folds, oof, test_ids, per_fold, meta)

    def _assemble_views(self, name: str, classes: list[str], folds: Folds,
                        test_ids: np.ndarray) -> None:
        """views_oof.parquet and views_test_folds.parquet, when every fold stored its views."""
        parts = [(self.parts / f"fold{k}_views_val.parquet",
                  self.parts / f"fold{k}_views_test.parquet") for k in range(folds.k)]
        if not all(v.exists() and t.exists() for v, t in parts):
            return
        cols = column_names(name, classes)
        info = {"run": name, "classes": classes, "fingerprint": folds.fingerprint}
        label = dict(zip(folds.ids.astype(str), folds.labels.astype(str)))
        val = pd.concat([pd.read_parquet(v) for v, _ in parts], ignore_index=True)
        fold_of = dict(zip(folds.ids.astype(str), folds.fold))
        ids = val["id"].astype(str)
        oof = pd.DataFrame({"id": ids, "label": ids.map(label), "fold": ids.map(fold_of),
                            "view": val["view"]})
        oof[cols] = val[list(classes)].to_numpy(np.float64)
        _write_parquet(self.path / "views_oof.parquet", oof, info)
        test_ids = np.asarray(test_ids, dtype=object).astype(str)
        frames = []
        for k, (_, t) in enumerate(parts):
            df = pd.read_parquet(t)
            out = pd.DataFrame({"id": test_ids[df["id"].to_numpy(np.int64)], "fold": k,
                                "view": df["view"]})
            out[cols] = df[list(classes)].to_numpy(np.float64)
            frames.append(out)
        _write_parquet(self.path / "views_test_folds.parquet", pd.concat(frames,
                                                                         ignore_index=True), info)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a truncated or edited file is a DataError naming it."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: damaged JSON ({exc}); the file was truncated or edited: "
                        "rerun the command that wrote it") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _read_views(run: Run, file: str) -> tuple[list[str], pd.DataFrame] | None:
    """A per-view file of ``run`` (None if absent), checked to be this run's; view names in
    the order stored."""
    path = run.path / file
    if not path.exists():
        return None
    df, info = _read_parquet_info(path, ["id", "view"])
    if (info["run"], info["classes"], info["fingerprint"]) != (run.name, run.classes,
                                                               run.fingerprint):
        raise DataError(f"{path}: written for run {info['run']!r} (classes {info['classes']}, "
                        f"folds {info['fingerprint']}), not this run's {run.name!r}")
    return list(dict.fromkeys(df["view"].astype(str))), df


def read_refit_test(path: Path, name: str, classes: list[str], fingerprint: str,
                    test_ids: np.ndarray) -> np.ndarray | None:
    """The refit model's test probabilities of run folder ``path`` in ``test_ids`` order, None
    without a finished refit; a file of another run, class order or folds is refused."""
    where = Path(path) / REFIT_DIR / "test.parquet"
    if not (Path(path) / REFIT_DIR / REFIT_MARKER).exists():
        return None
    df, info = _read_parquet_info(where, ["id"])
    if (info["run"], info["classes"], info["fingerprint"]) != (name, classes, fingerprint):
        raise DataError(f"{where}: written for run {info['run']!r} (classes {info['classes']}, "
                        f"folds {info['fingerprint']}), not this run's {name!r}")
    pos = {i: n for n, i in enumerate(df["id"].astype(str))}
    missing = [i for i in np.asarray(test_ids).astype(str) if i not in pos]
    if missing or len(pos) != len(test_ids):
        raise DataError(f"{where}: its test ids differ from the run's test.parquet "
                        f"(e.g. {missing[:3]})")
    rows = [pos[i] for i in np.asarray(test_ids).astype(str)]
    return df[column_names(name, classes)].to_numpy(np.float64)[rows]


def _read_parquet_info(path: Path, required: list[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Table + foldstack metadata; a missing, truncated or foreign file is a DataError naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not path.exists():
        raise DataError(f"{path}: missing; the run folder is damaged: rerun its command")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({type(exc).__name__}: {exc}); "
                        "it was truncated or overwritten: rerun the command that wrote it"
                        ) from None
    raw = (table.schema.metadata or {}).get(PARQUET_META_KEY)
    if raw is None:
        raise DataError(f"{path}: not written by foldstack (no class order in its metadata)")
    try:
        info = json.loads(raw)
        info = {"run": str(info["run"]), "classes": [str(c) for c in info["classes"]],
                "fingerprint": str(info["fingerprint"])}
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"{path}: damaged foldstack metadata ({exc})") from None
    cols = [*required, *column_names(info["run"], info["classes"])]
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: columns {missing} missing")
    return table.to_pandas(), info


def _first_duplicate(values: np.ndarray) -> tuple[int, int] | None:
    """(row, first row) of the first value seen twice, or None."""
    seen: dict[Any, int] = {}
    for row, v in enumerate(values):
        if v in seen:
            return row, seen[v]
        seen[v] = row
    return None


def _check_rows(path: Path, df: pd.DataFrame, classes: list[str], meta: dict[str, Any]) -> None:
    """Ids unique, labels known, folds whole numbers in 0..K-1."""
    ids = df["id"].astype(str).to_numpy(object)
    dup = _first_duplicate(ids)
    if dup:
        raise DataError(f"{path}: row {dup[0]}: id {ids[dup[0]]!r} appears twice (also row "
                        f"{dup[1]}); every training id must appear exactly once")
    known = set(classes)
    bad = [i for i, lab in enumerate(df["label"].astype(str)) if lab not in known]
    if bad:
        raise DataError(f"{path}: row {bad[0]}: label {df['label'].iloc[bad[0]]!r} is not one of "
                        f"the run's classes {classes}")
    k = meta.get("folds")
    fold = pd.to_numeric(df["fold"], errors="coerce").to_numpy(np.float64)
    out = ~np.isfinite(fold) | (fold != np.round(fold)) | (fold < 0)
    if isinstance(k, int):
        out |= fold >= k
    if out.any():
        r = int(np.flatnonzero(out)[0])
        raise DataError(f"{path}: row {r}: fold {df['fold'].iloc[r]} is not in 0..{k}-1")


def _check_fingerprint(path: Path, df: pd.DataFrame, meta: dict[str, Any],
                       fingerprint: str) -> None:
    """The (id, fold) rows hash to the recorded fingerprint: no row added, dropped or moved."""
    k, seed = meta.get("folds"), meta.get("fold_seed")
    ids = df["id"].astype(str).to_numpy(object)
    fold = df["fold"].to_numpy(np.int64)
    if isinstance(k, int) and isinstance(seed, int):
        actual = fold_fingerprint(ids, fold.astype(np.int64), k, seed)
        if actual != fingerprint:
            raise DataError(
                f"{path}: its {len(ids)} (id, fold) rows do not match the run's fold fingerprint "
                f"({actual} != {fingerprint}): rows were added, removed or moved to other folds")


def load_run(path: str | Path, folds: Folds | None = None) -> Run:
    """Load a complete run folder: ids, labels, folds, class names, OOF and test probabilities.

    ``meta.json`` and the parquet metadata both record the class order and fold fingerprint:
    they are cross-checked, so an edit to either is caught here, naming the file. With the run
    root's stored ``folds`` (of the same fingerprint), a missing or foreign id is named too.
    """
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.exists():
        raise RunMismatchError(f"{path}: not a run folder (no {META_FILE})")
    meta = read_json(meta_path)
    if meta.get("status") != "complete":
        done = sorted(int(p.stem[4:]) for p in (path / "parts").glob("fold*.json"))
        raise RunMismatchError(
            f"{path}: run is incomplete (folds done: {done} of {meta.get('folds', '?')}); "
            "rerun its run_folds.py command to finish it"
        )
    oof_path, test_path = path / "oof.parquet", path / "test.parquet"
    oof_df, info = _read_parquet_info(oof_path, ["id", "label", "fold"])
    test_df, test_info = _read_parquet_info(test_path, ["id"])
    for key, label in (("run", "run name"), ("classes", "class order"),
                       ("fingerprint", "fold fingerprint")):
        in_meta = meta.get("fold_fingerprint" if key == "fingerprint" else key)
        if in_meta != info[key]:
            raise DataError(f"{meta_path}: {label} {in_meta!r} != {info[key]!r} recorded in "
                            f"{oof_path}: one of the two files was edited")
        if test_info[key] != info[key]:
            raise DataError(f"{test_path}: {label} {test_info[key]!r} != {info[key]!r} of "
                            f"{oof_path}: the files come from different runs")
    name, classes = info["run"], list(info["classes"])
    cols = column_names(name, classes)
    _check_rows(oof_path, oof_df, classes, meta)
    if folds is not None and folds.fingerprint == info["fingerprint"]:
        _check_against(oof_path, oof_df, folds)
    _check_fingerprint(oof_path, oof_df, meta, info["fingerprint"])
    test_ids = test_df["id"].astype(str).to_numpy(object)
    dup = _first_duplicate(test_ids)
    if dup:
        raise DataError(f"{test_path}: row {dup[0]}: test id {test_ids[dup[0]]!r} appears twice "
                        f"(also row {dup[1]})")
    labels = oof_df["label"].astype(str).to_numpy(object)
    index = {c: i for i, c in enumerate(classes)}
    return Run(
        path=path, name=name, classes=classes,
        ids=oof_df["id"].astype(str).to_numpy(object), labels=labels,
        y=np.array([index[lab] for lab in labels], dtype=np.int64),
        folds=oof_df["fold"].to_numpy(np.int64), oof=oof_df[cols].to_numpy(np.float64),
        test_ids=test_ids, test=test_df[cols].to_numpy(np.float64),
        fingerprint=info["fingerprint"], meta=meta,
    )


def find_runs(run_root: str | Path, complete_only: bool = True) -> list[Path]:
    """Run folders under a run root (those with a meta.json), complete ones only by default."""
    found = []
    for meta in sorted(Path(run_root).glob(f"*/{META_FILE}")):
        status = read_json(meta).get("status")
        if status == "complete" or not complete_only:
            found.append(meta.parent)
    return found


def _check_against(where: Path, df: pd.DataFrame, folds: Folds) -> None:
    """The OOF rows have exactly the stored folds' ids, folds and labels; name the first
    difference."""
    ids = df["id"].astype(str).to_numpy(object)
    stored = {i: n for n, i in enumerate(folds.ids.astype(str))}
    have = set(ids)
    extra = [(n, i) for n, i in enumerate(ids) if i not in stored]
    if extra:
        raise DataError(f"{where}: row {extra[0][0]}: id {extra[0][1]!r} is not in {FOLDS_FILE}")
    missing = [str(i) for i in folds.ids.astype(str) if i not in have]
    if missing:
        raise DataError(f"{where}: {len(missing)} training id(s) of {FOLDS_FILE} have no row, "
                        f"e.g. {missing[:3]}")
    pos = np.array([stored[i] for i in ids], dtype=np.int64)
    fold = pd.to_numeric(df["fold"], errors="coerce").to_numpy(np.float64)
    moved = np.flatnonzero(folds.fold[pos] != fold)
    if len(moved):
        n = int(moved[0])
        raise DataError(f"{where}: row {n}: id {ids[n]!r} is in fold {df['fold'].iloc[n]}, "
                        f"{FOLDS_FILE} says {folds.fold[pos[n]]}")
    labels = df["label"].astype(str).to_numpy(object)
    relabel = np.flatnonzero(folds.labels.astype(str)[pos] != labels)
    if len(relabel):
        n = int(relabel[0])
        raise DataError(f"{where}: row {n}: id {ids[n]!r} has label {labels[n]!r}, "
                        f"{FOLDS_FILE} says {folds.labels[pos[n]]!r}")


def check_compatible(runs: list[Run], atol: float = 1e-4) -> None:
    """Refuse a set of runs that cannot be stacked or compared, naming each run and why."""
    if not runs:
        raise RunMismatchError("no runs to combine")
    problems = []
    ref = runs[0]
    names = [r.name for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        problems.append(f"run names used twice: {dup} (column names must be unique)")
    for r in runs:
        where = f"{r.name} ({r.path})"
        if r.fingerprint != ref.fingerprint:
            problems.append(f"{where}: fold fingerprint {r.fingerprint} != {ref.fingerprint} "
                            f"of {ref.name}: trained on other folds")
        if r.classes != ref.classes:
            problems.append(f"{where}: class order {r.classes} != {ref.classes} of {ref.name}")
        if len(r.ids) != len(ref.ids) or (r.ids != ref.ids).any():
            problems.append(f"{where}: training ids differ from {ref.name}")
        elif (r.folds != ref.folds).any():
            problems.append(f"{where}: fold column differs from {ref.name}")
        elif (r.labels != ref.labels).any():
            problems.append(f"{where}: {int((r.labels != ref.labels).sum())} training labels "
                            f"differ from {ref.name}")
        if len(r.test_ids) != len(ref.test_ids) or (r.test_ids != ref.test_ids).any():
            problems.append(f"{where}: test ids differ from {ref.name}")
        nan_rows = int(np.isnan(r.oof).any(axis=1).sum())
        if nan_rows:
            problems.append(f"{where}: {nan_rows} OOF rows have no prediction (folds missing)")
        nan_test = int(np.isnan(r.test).any(axis=1).sum())
        if nan_test:
            problems.append(f"{where}: {nan_test} test rows have no prediction (NaN)")
        for label, mat in (("OOF", r.oof), ("test", r.test)):
            finite = np.isfinite(mat)
            if not finite[~np.isnan(mat)].all():
                problems.append(f"{where}: {label} probabilities contain inf")
            sums = mat[finite.all(axis=1)].sum(axis=1)
            if len(sums) and (np.abs(sums - 1) > atol).any():
                problems.append(f"{where}: {int((np.abs(sums - 1) > atol).sum())} {label} rows "
                                "do not sum to 1")
            if (mat[finite] < 0).any():
                problems.append(f"{where}: negative {label} probabilities")
    if problems:
        raise RunMismatchError("these runs cannot be combined:\n  " + "\n  ".join(problems))
