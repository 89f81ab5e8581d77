#!/usr/bin/env python
"""Bit identity across a refactor (issue 29 item 5): same configs, seeds and thread count give
the same OOF and test probabilities, bit for bit, before and after.

Why a script and not a test: the promise is about two trees (the code before a refactor and
after it), and the demo configs take ~20 min on one thread. ``record`` runs a fixed list of
configs, each ``run_folds.py`` in its own fresh process (TensorFlow fixes its thread pool once
per process) with ``--threads 1`` and fixed seeds, and writes the sha256 of every probability
array of each run folder: ``oof.parquet``, ``test.parquet``, ``test_folds.parquet`` and every
fold's ``parts/fold<k>_oof.parquet`` / ``fold<k>_test.parquet``. The hash is of the float64
numpy bytes of the ``<run>__<class>`` columns with the rows sorted by (id, fold), never of the
parquet bytes (their metadata carries library versions). ``compare`` runs the same configs in
the current tree and reports, per array, identical or the number of differing values and the
largest absolute difference (read from the recorded run folders, which it needs for that).

    python bench/bit_identity.py record  --out DIR  --hashes BEFORE.json [--only GROUP|NAME ...]
    python bench/bit_identity.py compare --out DIR2 --hashes BEFORE.json [--only GROUP|NAME ...]

Groups: ``timm`` and ``keras`` (small configs on 300 Fashion-MNIST images that cover the paths
a fold goes through: phases with layer decay from a local weights file, progressive resizing,
EMA, mixup/cutmix, flip and scale TTA, precise BatchNorm on and off, predict weights best and
last, the Keras compiled step reused across folds) and ``demo`` (configs/demo/*.yaml, as
``make demo`` runs them but on one thread; they need the Fashion-MNIST demo data, fetched once
into the foldstack cache). ``--update`` adds to an existing hashes file instead of refusing it.
Inputs (data files, weights files, config files) are hashed too, so a changed input is told
apart from a changed result. Exit status: 0 identical, 1 a difference, 2 bad usage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from oof.atomic import write_json  # noqa: E402
from oof.demo import ensure_fashion_demo  # noqa: E402

SEED = 42
THREADS = 1
SMALL_DATA = "fashion-small"  # 30 train images per class, 4 test per class
KERAS = "keras/MobileNetV3Small"
COMMON = ["--seed", str(SEED), "--folds", "3", "--batch-size", "32"]
# name -> (group, run_folds.py arguments); {data}, {timm_weights}, {keras_weights} are filled in
CONFIGS: dict[str, tuple[str, list[str]]] = {
    "timm_phases_best": ("timm", [
        "--data", "{data}", *COMMON, "--backbone", "timm/resnet10t",
        "--pretrained", "{timm_weights}", "--img-size", "16,24", "--epochs", "3",
        "--head-epochs", "1", "--layer-decay", "0.8", "--freeze-bn", "false", "--ema", "true",
        "--ema-decay", "0.9",
        "--mixup-alpha", "0.4", "--cutmix-alpha", "1.0", "--mix-prob", "0.8", "--tta", "flips",
        "--tta-scales", "1.15", "--bn-recalibrate", "true", "--predict-weights", "best"]),
    "timm_scratch_last": ("timm", [
        "--data", "{data}", *COMMON, "--backbone", "timm/resnet10t", "--img-size", "24",
        "--epochs", "2", "--augment", "flip", "--cutmix-alpha", "1.0", "--tta", "hflip",
        "--tta-scales", "1.2", "--bn-recalibrate", "false", "--predict-weights", "last"]),
    "keras_phases_last": ("keras", [
        "--data", "{data}", *COMMON, "--backbone", KERAS, "--pretrained", "{keras_weights}",
        "--img-size", "32,40", "--epochs", "3", "--head-epochs", "1", "--freeze-bn", "false",
        "--tta", "hflip", "--tta-scales", "1.15", "--predict-weights", "last"]),
    "keras_mix_best": ("keras", [
        "--data", "{data}", *COMMON, "--backbone", KERAS, "--img-size", "32", "--epochs", "2",
        "--ema", "true", "--ema-decay", "0.9", "--mixup-alpha", "0.4", "--cutmix-alpha", "1.0",
        "--bn-recalibrate", "false", "--bn-momentum", "0.5", "--predict-weights", "best"]),
    "keras_plain": ("keras", [  # one phase: the traced step is reused by folds 1 and 2
        "--data", "{data}", *COMMON, "--backbone", KERAS, "--img-size", "32", "--epochs", "1"]),
    **{f"demo_{p.stem}": ("demo", ["--config", f"configs/demo/{p.name}"])
       for p in sorted((ROOT / "configs" / "demo").glob("*.yaml"))},
}
GROUPS = ("timm", "keras", "demo")
ROW_KEYS = ("id", "fold", "label")  # the other columns of a probability parquet are classes

TIMM_WEIGHTS = r"""
import sys, torch, timm
torch.manual_seed(5)
model = timm.create_model("resnet10t", pretrained=False)
for m in model.modules():  # non-trivial BatchNorm statistics, as pretrained weights have
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
from safetensors.torch import save_file
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[1])
"""
KERAS_WEIGHTS = r"""
import sys, keras
keras.utils.set_random_seed(5)
keras.applications.MobileNetV3Small(include_top=False, weights=None,
                                    input_shape=(32, 32, 3)).save_weights(sys.argv[1])
"""


def child_env() -> dict[str, str]:
    """One thread everywhere, no GPU, fixed hash seed: the same environment in both trees."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}  # this tree's code, not the editable install's
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        env[var] = str(THREADS)
    env.pop("FOLDSTACK_FAULT_AFTER_WRITES", None)
    return env


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_sha(folder: Path) -> str:
    """sha256 over the relative paths and bytes of every file below ``folder``."""
    h = hashlib.sha256()
    for p in sorted(q for q in folder.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(folder)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def prepare_inputs(out: Path, names: list[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The small dataset and the two local weights files (written once per ``out``), as the
    placeholders of CONFIGS, and the sha256 of every input the chosen configs read."""
    fill: dict[str, str] = {}
    shas: dict[str, str] = {}
    if any(CONFIGS[n][0] != "demo" for n in names):
        data = ensure_fashion_demo(out / "data" / SMALL_DATA, train_per_class=30,
                                   test_per_class=4)
        fill["data"] = str(data)
        shas["data"] = tree_sha(data)
        for key, script, fname in (("timm_weights", TIMM_WEIGHTS, "resnet10t.safetensors"),
                                   ("keras_weights", KERAS_WEIGHTS, "mnv3s.weights.h5")):
            path = out / "weights" / fname
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run([sys.executable, "-c", script, str(path)], cwd=ROOT,
                               env=child_env(), check=True, capture_output=True, timeout=600)
            fill[key] = str(path)
            shas[key] = file_sha(path)
    for n in names:
        for i, arg in enumerate(CONFIGS[n][1][:-1]):
            if arg == "--config":
                shas[CONFIGS[n][1][i + 1]] = file_sha(ROOT / CONFIGS[n][1][i + 1])
    return fill, shas


def read_probas(path: Path) -> tuple[np.ndarray, list[str], str]:
    """A parquet's probability columns as float64, rows in (id, fold) order (a fold's test part
    has no id: its rows are in test order); the class names (column names less the run
    prefix) and a sha256 of the row keys (id, fold, label)."""
    df = pd.read_parquet(path)
    keys = [c for c in ("id", "fold") if c in df.columns]
    if keys:
        df = df.sort_values(keys, kind="mergesort").reset_index(drop=True)
    cols = [c for c in df.columns if c not in ROW_KEYS]
    rows = df[[c for c in ROW_KEYS if c in df.columns]].astype(str)
    rows_sha = hashlib.sha256("\n".join("\t".join(r) for r in rows.itertuples(index=False))
                              .encode()).hexdigest()
    arr = np.ascontiguousarray(df[cols].to_numpy(dtype=np.float64))
    return arr, [c.split("__", 1)[-1] for c in cols], rows_sha


def array_files(run_dir: Path) -> list[Path]:
    names = ["oof.parquet", "test.parquet", "test_folds.parquet"]
    found = [run_dir / n for n in names if (run_dir / n).exists()]
    return found + sorted((run_dir / "parts").glob("fold*_oof.parquet")) + sorted(
        (run_dir / "parts").glob("fold*_test.parquet"))


def hash_run(run_dir: Path) -> dict:
    """sha256, shape, classes and row keys of every probability array, plus what the run says
    it did (threads, seeds, per-fold paths), the latter for the reader only."""
    arrays = {}
    for path in array_files(run_dir):
        arr, classes, rows_sha = read_probas(path)
        arrays[str(path.relative_to(run_dir))] = {
            "sha256": hashlib.sha256(arr.tobytes()).hexdigest(), "shape": list(arr.shape),
            "classes": classes, "rows_sha256": rows_sha}
    meta = json.loads((run_dir / "meta.json").read_text())
    wanted = ("phases", "predict_weights", "weights", "best_epoch", "bn_recalibrated_layers",
              "compiled_step_reused", "epochs_run", "ema")
    folds = {k: {w: (v.get(w) if w != "phases" else [p.get("name") for p in v.get(w) or []])
                 for w in wanted if w in v} for k, v in meta.get("fold_info", {}).items()}
    return {"arrays": arrays, "threads": meta["config"].get("threads"),
            "train_seed": meta.get("train_seed"), "fold_seed": meta.get("fold_seed"),
            "fold_fingerprint": meta.get("fold_fingerprint"), "fold_info": folds}


def run_config(name: str, out: Path, fill: dict[str, str]) -> tuple[Path, float]:
    """``run_folds.py`` for one config in a fresh process; its run folder and seconds."""
    args = [a.format(**fill) for a in CONFIGS[name][1]]
    runs = out / "runs"
    cmd = [sys.executable, "run_folds.py", *args, "--out", str(runs), "--run-name", name,
           "--threads", str(THREADS), "--progress", "false"]
    data_name = Path(fill["data"]).name if "{data}" in CONFIGS[name][1] else "demo-fashion"
    run_dir = runs / data_name / name
    if run_dir.exists():
        raise SystemExit(f"{run_dir} exists: a run folder would be resumed, not trained; "
                         "give a fresh --out")
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as fh:
        fh.write(" ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise SystemExit(f"{name}: run_folds.py exited {proc.returncode}; log {log}:\n{tail}")
    return run_dir, time.monotonic() - start


def git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def chosen(only: list[str] | None, available: list[str]) -> list[str]:
    if not only:
        return available
    bad = [o for o in only if o not in GROUPS and o not in CONFIGS]
    if bad:
        raise SystemExit(f"--only {' '.join(bad)}: not a group ({', '.join(GROUPS)}) nor a "
                         f"config ({', '.join(CONFIGS)})")
    return [n for n in available if n in only or CONFIGS[n][0] in only]


def record(out: Path, hashes: Path, only: list[str] | None, update: bool) -> int:
    names = chosen(only, list(CONFIGS))
    if hashes.exists() and not update:
        raise SystemExit(f"{hashes} exists: pass --update to add to it")
    doc = json.loads(hashes.read_text()) if hashes.exists() else {"runs": {}, "inputs": {}}
    fill, shas = prepare_inputs(out, names)
    doc.update(commit=git_head(), tree=str(ROOT), threads=THREADS, seed=SEED)
    doc["inputs"].update(shas)
    for name in names:
        run_dir, seconds = run_config(name, out, fill)
        doc["runs"][name] = {"group": CONFIGS[name][0], "run_dir": str(run_dir),
                             "seconds": round(seconds, 1), **hash_run(run_dir)}
        write_json(hashes, doc)  # after each config: a partial file is still usable
        print(f"{name}: recorded {len(doc['runs'][name]['arrays'])} arrays ({seconds:.0f} s)",
              flush=True)
    return 0


def diff(before_dir: Path, after_dir: Path, rel: str) -> str:
    """How two arrays differ: the count of unequal values and the largest absolute difference."""
    try:
        a, ca, ra = read_probas(before_dir / rel)
    except (OSError, ValueError) as exc:
        return f"(before array unreadable: {exc})"
    b, cb, rb = read_probas(after_dir / rel)
    if a.shape != b.shape or ca != cb or ra != rb:
        return f"shape/classes/rows differ: {a.shape} {ca} vs {b.shape} {cb}"
    unequal = ~((a == b) | (np.isnan(a) & np.isnan(b)))
    return (f"{int(unequal.sum())}/{a.size} values differ, max abs diff "
            f"{float(np.nanmax(np.abs(a - b))):.3g}")


def compare(out: Path, hashes: Path, only: list[str] | None) -> int:
    before = json.loads(hashes.read_text())
    names = chosen(only, [n for n in before["runs"] if n in CONFIGS])
    missing = [n for n in chosen(only, list(CONFIGS)) if n not in before["runs"]]
    fill, shas = prepare_inputs(out, names)
    report = {"before_commit": before.get("commit"), "commit": git_head(), "tree": str(ROOT),
              "inputs_differ": sorted(k for k, v in shas.items()
                                      if before["inputs"].get(k) != v),
              "not_recorded": missing, "runs": {}}
    if report["inputs_differ"]:
        print(f"WARNING: inputs differ from the record: {report['inputs_differ']}", flush=True)
    differ = 0
    for name in names:
        run_dir, seconds = run_config(name, out, fill)
        now, then = hash_run(run_dir), before["runs"][name]
        lines = {}
        for rel in sorted(set(then["arrays"]) | set(now["arrays"])):
            a, b = then["arrays"].get(rel), now["arrays"].get(rel)
            if a is None or b is None:
                lines[rel] = "only before" if b is None else "only after"
            elif a == b:
                lines[rel] = "identical"
            else:
                lines[rel] = diff(Path(then["run_dir"]), run_dir, rel)
        if now["threads"] != then["threads"]:
            lines["threads"] = f"{then['threads']} before, {now['threads']} after"
        bad = {k: v for k, v in lines.items() if v != "identical"}
        differ += bool(bad)
        report["runs"][name] = {"identical": not bad, "arrays": lines,
                                "seconds": round(seconds, 1), "fold_info": now["fold_info"]}
        write_json(out / "compare.json", report)
        status = "IDENTICAL" if not bad else "DIFFERS"
        print(f"{name}: {status} ({len(lines) - len(bad)}/{len(lines)} arrays identical, "
              f"{seconds:.0f} s)", flush=True)
        for rel, what in bad.items():
            print(f"    {rel}: {what}", flush=True)
    print(f"{len(names) - differ}/{len(names)} configs identical to {hashes} "
          f"(recorded at {before.get('commit', '?')[:10]}, now {report['commit'][:10]})"
          + (f"; not recorded: {', '.join(missing)}" if missing else ""), flush=True)
    return 1 if differ or report["inputs_differ"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("record", "compare"))
    parser.add_argument("--out", type=Path, required=True,
                        help="fresh folder for the data, weights, run folders and logs")
    parser.add_argument("--hashes", type=Path, required=True,
                        help="record: JSON to write; compare: the recorded JSON")
    parser.add_argument("--only", nargs="+", metavar="GROUP_OR_NAME",
                        help=f"groups ({', '.join(GROUPS)}) or config names "
                             f"({', '.join(CONFIGS)}); default all")
    parser.add_argument("--update", action="store_true",
                        help="record: add to an existing hashes file")
    args = parser.parse_args(argv)
    if args.command == "record":
        return record(args.out, args.hashes, args.only, args.update)
    return compare(args.out, args.hashes, args.only)


if __name__ == "__main__":
    sys.exit(main())
