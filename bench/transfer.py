"""Issue 9's check: linear probe vs full fine-tuning from step 0 vs the default recipe.

Why: with a few hundred real photos, fine-tuning every layer at one LR from step 0 wrecks the
pretrained features; a logistic regression on frozen features is the baseline any recipe must
hold. All columns use the SAME stored folds (``<out>/<dataset>/folds.csv``) and the same real
ImageNet weights (EfficientNet-Lite0, see bench/convert_lite0.py).

Sizes chosen for a 2-core CPU (whole bench well under an hour): photos 128 px, K=3, 6 epochs;
Fashion-MNIST 64 px, 10 classes x 250 images, K=3, 6 epochs.

Usage: nice -n 10 python -m bench.transfer [--only photos|fashion] [--out DIR]
           [--columns COLUMN ...] [--train-seeds 42 1 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.convert_lite0 import converted_weights
from bench.devdata import build_fashion, build_photos

BACKBONE = "tf_efficientnet_lite0"


def extract_features(paths: list[str], weights: Path, img_size: int, batch: int = 32) -> np.ndarray:
    """Pooled features of the frozen pretrained backbone (timm's own preprocessing constants)."""
    import timm
    import torch
    from PIL import Image

    torch.manual_seed(0)
    model = timm.create_model(BACKBONE, pretrained=True, num_classes=0,
                              pretrained_cfg_overlay={"file": str(weights)}).eval()
    cfg = model.pretrained_cfg
    mean = np.asarray(cfg["mean"], np.float32)[:, None, None]
    std = np.asarray(cfg["std"], np.float32)[:, None, None]
    out = []
    with torch.inference_mode():
        for i in range(0, len(paths), batch):
            arrs = [np.asarray(Image.open(p).convert("RGB").resize((img_size, img_size),
                                                                    Image.BILINEAR), np.float32)
                    .transpose(2, 0, 1) / 255.0 for p in paths[i:i + batch]]
            x = torch.from_numpy((np.stack(arrs) - mean) / std)
            out.append(model(x).numpy())
    return np.concatenate(out)


def linear_probe(features: np.ndarray, labels: np.ndarray, fold: np.ndarray,
                 c: float = 1.0) -> dict[str, float]:
    """Logistic regression per stored fold; OOF accuracy and log loss over all rows."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, log_loss
    from sklearn.preprocessing import StandardScaler

    classes = np.unique(labels)
    oof = np.zeros((len(labels), len(classes)))
    for k in np.unique(fold):
        tr, ho = fold != k, fold == k
        scaler = StandardScaler().fit(features[tr])
        clf = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(features[tr]),
                                                         labels[tr])
        oof[np.ix_(ho, np.searchsorted(classes, clf.classes_))] = clf.predict_proba(
            scaler.transform(features[ho]))
    oof /= oof.sum(1, keepdims=True)  # float32-rounded rows: renormalise for log_loss
    pred = classes[oof.argmax(1)]
    return {"accuracy": float(accuracy_score(labels, pred)),
            "log_loss": float(log_loss(labels, oof, labels=classes))}


def probe_on_folds(run_root: Path, data: Path, weights: Path, img_size: int,
                   c: float = 1.0) -> dict[str, float]:
    """Probe over the folds stored in ``run_root`` (made by the first fine-tuning run)."""
    from oof.datasets import load_dataset
    from oof.folds import load_folds

    folds = load_folds(run_root)
    if folds is None:
        raise FileNotFoundError(f"{run_root}: no folds.csv yet")
    train = load_dataset(data).train.set_index("id")
    rows = train.loc[[str(i) for i in folds.ids]]
    feats = extract_features(list(rows["path"]), weights, img_size)
    return linear_probe(feats, rows["label"].to_numpy(), folds.fold, c)


def fine_tune(data: Path, out: Path, weights: Path, name: str, extra: list[str],
              img_size: int, folds: int, epochs: int) -> tuple[dict[str, float], Path, float]:
    """One run_folds run (the library call run_folds.py makes); returns OOF scores and run root."""
    from oof.config import RunConfig, parse_config
    from runner.run import run_folds

    argv = ["--data", str(data), "--out", str(out), "--backbone", f"timm/{BACKBONE}",
            "--pretrained", str(weights), "--img-size", str(img_size), "--folds", str(folds),
            "--epochs", str(epochs), "--run-name", name, "--progress", "false", *extra]
    t0 = time.perf_counter()
    summary = run_folds(parse_config(RunConfig, argv, "run_folds.py", ""))
    return summary.oof_scores, Path(summary.run_dir).parent, time.perf_counter() - t0


SETS = {
    "photos": dict(build=lambda: build_photos(40, 3), img_size=128, folds=3, epochs=6),
    "fashion": dict(build=lambda: build_fashion(250, 100), img_size=64, folds=3, epochs=6),
}
COLUMNS = {
    # the trainer before issue 9: every layer from step 0 at one LR, 2e-3, BatchNorm trained
    "full FT from step 0": ["--head-epochs", "0", "--layer-decay", "1.0", "--freeze-bn", "false",
                            "--lr", "2e-3"],
    "default, BN trained": ["--freeze-bn", "false"],
    "default recipe": [],
    "default at --lr 2e-3": ["--lr", "2e-3"],  # the fine-tuning default before issue 9's seeds
}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", choices=sorted(SETS))
    ap.add_argument("--out", default="runs_transfer")
    ap.add_argument("--columns", nargs="+", choices=sorted(COLUMNS), default=list(COLUMNS),
                    metavar="COLUMN", help=f"fine-tuning columns (default all: {list(COLUMNS)})")
    ap.add_argument("--train-seeds", nargs="+", type=int, default=[None],
                    help="one run per seed of weights and batches (--train-seed), the folds "
                    "fixed; the table shows the mean and each seed's accuracy (default: one run, "
                    "the fold seed)")
    args = ap.parse_args(argv)
    weights = converted_weights()
    for name, s in SETS.items():
        if args.only and name != args.only:
            continue
        data = s["build"]()
        rows = []
        root = None
        for col in args.columns:
            runs = []
            for seed in args.train_seeds:
                extra = [*COLUMNS[col], *(() if seed is None else ("--train-seed", str(seed)))]
                run_name = col.replace(" ", "_") + ("" if seed is None else f"_seed{seed}")
                scores, root, secs = fine_tune(data, Path(args.out), weights, run_name, extra,
                                               s["img_size"], s["folds"], s["epochs"])
                runs.append((scores["accuracy"], scores["log_loss"], secs))
            acc, ll, secs = (np.mean(v, axis=0) for v in zip(*runs))
            rows.append((col, acc, ll, secs, [r[0] for r in runs]))
        t0 = time.perf_counter()
        p = probe_on_folds(root, data, weights, s["img_size"])
        rows.insert(0, ("linear probe", p["accuracy"], p["log_loss"], time.perf_counter() - t0,
                        []))
        print(f"\n{name}: {data} ({s['img_size']} px, K={s['folds']}, {s['epochs']} epochs, "
              f"train seeds {args.train_seeds}: mean, then each seed's accuracy)")
        print(f"{'column':24s} {'accuracy':>9s} {'log loss':>9s} {'seconds':>8s}")
        for col, acc, ll, secs, each in rows:
            print(f"{col:24s} {acc:9.4f} {ll:9.4f} {secs:8.0f}  "
                  + " ".join(f"{a:.4f}" for a in (each if len(each) > 1 else [])))


if __name__ == "__main__":
    main()
