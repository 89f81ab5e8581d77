"""The probe family, ``probe/<timm model>``: frozen features + a scikit-learn head per fold.

Fast checks in this process (heads, config); the end-to-end chain on the demo subset's real PNG
files (run_folds.py with a kill-free resume after fold 0, stack.py, predict.py, serve.py, the
run predictor against the stored OOF rows) runs in subprocesses, as tests/test_serve.py does:
torch never shares the pytest process with TensorFlow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from backbones.probe.heads import HEADS, LinearHead, fit_head, load_head, save_head
from oof.config import RunConfig, make_config, parse_config
from oof.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]
RUN = "probe-resnet10t_32px"


def _features(n_classes: int, n: int = 90, d: int = 24, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    centres = rng.normal(size=(n_classes, d))
    return (centres[y] + rng.normal(scale=1.5, size=(n, d))).astype(np.float32), y


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("n_classes", [2, 4])
def test_head_is_scikit_learns_arithmetic_saved_without_pickles(tmp_path: Path, head: str,
                                                                n_classes: int) -> None:
    """The saved arrays, put back into the scikit-learn estimator, give its own predict_proba;
    the file loads with allow_pickle=False and predicts the same bits; a class the fold's
    training rows lack gets probability 0."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
    from sklearn.linear_model import LogisticRegression

    x, y = _features(n_classes)
    y = np.where(y == n_classes - 1, n_classes, y)  # class index n_classes-1 absent
    fitted = fit_head(head, x, y, n_classes + 1, seed=3, threads=1)
    proba = fitted.predict_proba(x)
    assert proba.shape == (len(x), n_classes + 1)
    assert np.allclose(proba.sum(1), 1) and (proba[:, n_classes - 1] == 0).all()
    assert (proba.argmax(1) == y).mean() > 0.8
    est = LogisticRegression() if head == "logreg" else LinearDiscriminantAnalysis()
    est.coef_, est.intercept_, est.classes_ = fitted.coef, fitted.intercept, fitted.classes
    if head == "lda":
        est.priors_ = np.full(len(fitted.classes), 1 / len(fitted.classes))
    want = est.predict_proba((x - fitted.mean) / fitted.scale)
    assert np.abs(proba[:, fitted.classes] - want).max() < 1e-12

    path = tmp_path / "fold0.probe.npz"
    save_head(path, fitted, {"fold": 0})
    with np.load(path, allow_pickle=False) as z:  # would raise on any object array
        assert sorted(z.files) == ["classes", "coef", "intercept", "mean", "meta", "scale"]
    loaded, meta = load_head(path)
    assert np.array_equal(loaded.predict_proba(x), proba)
    assert meta["fold"] == 0 and meta["info"]["head"] == head


def test_logreg_c_is_chosen_by_seeded_inner_cv_on_the_training_rows() -> None:
    """The inner CV's choice is recorded with its scores, is the best of them, and is the same
    for the same seed (stratified, shuffled, seeded folds)."""
    x, y = _features(3, n=60, d=40)
    a = fit_head("logreg", x, y, 3, seed=5, threads=1)
    b = fit_head("logreg", x, y, 3, seed=5, threads=1)
    scores = a.info["inner_log_loss"]
    assert a.info["inner_folds"] == 5 and len(scores) == 11
    assert f"{a.info['C']:.4g}" == min(scores, key=scores.get)
    assert np.array_equal(a.coef, b.coef) and a.info == b.info


def test_lda_scores_are_tempered_by_inner_cv() -> None:
    """Shrinkage LDA on more features than images is overconfident; the temperature its inner
    CV picks (the best of its recorded scores) lowers the held-out log loss of the raw scores."""
    from dataclasses import replace

    from oof.metrics import log_loss

    x, y = _features(4, n=400, d=300, seed=1)
    x = x + np.random.default_rng(2).normal(scale=6.0, size=x.shape)  # classes overlap
    head = fit_head("lda", x[:100], y[:100], 4, seed=0, threads=1)
    t, scores = head.info["temperature"], head.info["inner_log_loss"]
    assert f"{t:.4g}" == min(scores, key=scores.get) and t > 1
    raw = replace(head, coef=head.coef * t, intercept=head.intercept * t)
    assert log_loss(y[100:], head.predict_proba(x[100:])) < log_loss(y[100:],
                                                                     raw.predict_proba(x[100:]))


def test_bad_head_inputs_are_refused(tmp_path: Path) -> None:
    x, y = _features(3, n=30)
    y[0] = 2  # class 2 gets 11 images, class 0 keeps 9
    y[y == 1] = 0
    y[5] = 1  # one image of class 1
    with pytest.raises(DataError, match=r"fold 2: class index\(es\) \[1\] have one training"):
        fit_head("logreg", x, y, 3, seed=0, where="fold 2")
    bad = tmp_path / "fold0.probe.npz"
    np.savez(bad, mean=np.zeros(2), scale=np.array([object()], dtype=object))
    with pytest.raises(DataError, match="fold0.probe.npz: not a readable probe head"):
        load_head(bad)


def test_bad_probe_head_is_refused_naming_the_flag(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_config(RunConfig, ["--probe-head", "svm"], "run_folds.py", "")
    assert exit_.value.code == 2
    assert "--probe-head: invalid choice: 'svm'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"probe_head='svm'; choose one of \['logreg', 'lda'\]"):
        make_config(RunConfig, {"probe_head": "svm"})
    proc = subprocess.run([sys.executable, "run_folds.py", "--backbone", "probe/resnet10t",
                           "--probe-head", "knn", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--probe-head" in proc.stderr, proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())


def test_head_is_a_linear_head_dataclass() -> None:
    """Guard for the no-pickle format: a head is plain arrays and JSON-able info."""
    x, y = _features(3, n=30)
    h = fit_head("lda", x, y, 3, seed=0)
    assert isinstance(h, LinearHead)
    assert all(isinstance(getattr(h, k), np.ndarray) for k in ("mean", "scale", "coef",
                                                                "intercept", "classes"))
    json.dumps(h.info)


# ------------------------------------------------------------------------------ end to end


def _py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _env() -> dict[str, str]:
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("KERAS_BACKEND", None)
    return env


CHAIN = r"""
import json, logging, sys
from pathlib import Path
import numpy as np
import backbones
from ensemble.cli import cli as stack_cli
from oof.config import RunConfig, parse_config
from oof.datasets import load_dataset
from oof.images import decode_images
from oof.rundir import load_run
from runner.run import run_folds
from serve.bundle import export_bundle
from serve.predict import predict_files

data_dir, out = sys.argv[1], Path(sys.argv[2])
lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
logging.getLogger("runner.run").addHandler(handler)
logging.getLogger("runner.run").setLevel(logging.INFO)
argv = ["--data", data_dir, "--out", str(out), "--folds", "3", "--backbone", "probe/resnet10t",
        "--img-size", "32", "--tta", "hflip", "--probe-head", "lda", "--progress", "false",
        "--threads", "1"]
run_folds(parse_config(RunConfig, argv + ["--fold", "0"], "run_folds.py", ""))
run_dir = out / Path(data_dir).name / sys.argv[3]
stamp = (run_dir / "parts" / "fold0_oof.parquet").stat().st_mtime_ns
lines.clear()
run_folds(parse_config(RunConfig, argv, "run_folds.py", ""))
resumed = list(lines)
assert stack_cli(["--data", data_dir, "--out", str(out), "--method", "logreg", "--compare",
                  "false"], prog="stack.py") == 0
export_bundle(out / Path(data_dir).name / "stack-logreg", out / "bundle")

data = load_dataset(data_dir, "auto", None)
run = load_run(run_dir)
family = backbones.get_backend("probe")
ckpts = [run.path / "checkpoints" / family.checkpoint_name(k) for k in range(3)]
pred = family.load_run_predictor(run.meta, ckpts, 1)
calls = []
pred.extractor.model.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
paths = dict(zip(data.train["id"].astype(str), data.train["path"]))
size = run.meta["backbone"]["input_size"]
x = decode_images([paths[i] for i in run.ids], size)
got = pred.predict_proba(x)
test_paths = list(data.test.set_index("id").loc[run.test_ids, "path"])
got_test = pred.predict_proba(decode_images(test_paths, size))
oof = max(float(np.abs(got[k][run.folds == k] - run.oof[run.folds == k]).max())
          for k in range(3))
test = float(np.abs(got_test - run.test_per_fold()).max())
predict_files(out / "bundle", [Path(data_dir) / "test_upload"], out / "preds.csv")

# the feature store: a probe run of the same extractor reads it (no pass); a run without it
# gives the same probabilities bit for bit; a damaged store file is computed again
from backbones.probe.features import FeatureExtractor
from oof.images import RowView
from recipe.tta import tta_views

def passes(name):
    info = load_run(out / Path(data_dir).name / name).meta["fold_info"]
    return [info[str(k)]["feature_passes"] for k in range(3)]

def same(a, b):
    a, b = load_run(out / Path(data_dir).name / a), load_run(out / Path(data_dir).name / b)
    return bool(np.array_equal(a.oof, b.oof) and np.array_equal(a.test, b.test))

store = sorted((out / Path(data_dir).name / "cache" / "features").glob("*.npy"))
store[0].write_bytes(store[0].read_bytes()[:200])  # as if truncated on disk
run_folds(parse_config(RunConfig, argv + ["--run-name", "shared"], "run_folds.py", ""))
run_folds(parse_config(RunConfig, argv + ["--run-name", "per-fold", "--probe-feature-store",
                                          "false"], "run_folds.py", ""))
views = tta_views("none", [], 1, "flip", 32, 0)
rows = RowView(np.load(next((out / Path(data_dir).name / "cache").glob("*.npy")),
                       mmap_mode="r"), [0, 1])
storable = [FeatureExtractor.storable(rows, views[:1]), FeatureExtractor.storable(rows, views),
            FeatureExtractor.storable(np.asarray(rows), views[:1])]
print(json.dumps({"store_files": [p.name for p in store], "storable": storable,
                  "passes": {n: passes(n) for n in (sys.argv[3], "shared", "per-fold")},
                  "same": [same(sys.argv[3], n) for n in ("shared", "per-fold")],
                  "store_after": len(list(store[0].parent.glob("*.npy"))),
                  "oof": oof, "test": test, "shape": list(got.shape), "calls": calls,
                  "n": len(x), "n_test": len(test_paths), "resumed_log": resumed,
                  "fold0_stamp_before": stamp,
                  "fold0_stamp_after": (run_dir / "parts" / "fold0_oof.parquet").stat()
                  .st_mtime_ns}))
"""


@pytest.fixture(scope="module")
def chain(demo_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One subprocess (torch imported once): fold 0 alone, then the whole run (the resume must
    not redo fold 0), its stack, the stack exported as a bundle, the run predictor on every
    training and test image, and predict.py's library call on the bundle. The lda head keeps
    the fits short; logreg's inner CV is checked above and in bench/probe_vs_logreg.py."""
    out = tmp_path_factory.mktemp("probe_runs")
    proc = _py("-c", CHAIN, str(demo_subset), str(out), RUN)
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    r["run"] = out / demo_subset.name / RUN
    r["out"] = out
    r["preds"] = pd.read_csv(out / "preds.csv", dtype={"id": str, "label": str}).set_index("id")
    return r


@pytest.mark.slow
def test_probe_run_resumes_without_redoing_fold_0(chain: dict) -> None:
    from oof.rundir import load_run

    run = chain["run"]
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["backbone"]["family"] == "probe"
    assert meta["passes_per_image"] == 2  # hflip: 2 extractor passes shared by the 3 heads
    assert chain["fold0_stamp_before"] == chain["fold0_stamp_after"]
    log = "\n".join(chain["resumed_log"])
    assert "fold 0 done" not in log and "fold 1 done" in log and "fold 2 done" in log
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["extractor.safetensors", *(f"fold{k}.probe.npz" for k in range(3))]
    for k in range(3):  # the heads load without pickles
        with np.load(run / "checkpoints" / f"fold{k}.probe.npz", allow_pickle=False) as z:
            assert json.loads(str(z["meta"]))["fold"] == k
    assert load_run(run).scores()["accuracy"] > 0.5  # 10 classes: chance is 0.1


@pytest.mark.slow
def test_run_predictor_equals_stored_rows_with_one_pass_per_image(chain: dict) -> None:
    """The K heads read one feature pass: forward calls = batches x 2 views (hflip), each
    image once per view, not K times; every fold's held-out rows and test rows equal what the
    run stored, to 1e-6."""
    r = chain
    assert r["oof"] < 1e-6 and r["test"] < 1e-6, r
    assert r["shape"] == [3, r["n"], 10]
    assert sum(r["calls"]) == 2 * (r["n"] + r["n_test"])
    assert len(r["calls"]) == 2 * (-(-r["n"] // 128) + -(-r["n_test"] // 128))


@pytest.mark.slow
def test_features_are_extracted_once_per_image_and_view_and_equal_a_pass_per_fold(
        chain: dict) -> None:
    """Fold 0 fills the run root's feature store (every training and test image once per
    view: 2 with hflip); folds 1 and 2, resumed in the same process, make no pass. A second
    probe run of the same extractor reads the store, but for one file truncated meanwhile,
    which it computes again. A run with --probe-feature-store false passes in every fold; both
    give the first run's OOF and test probabilities bit for bit. Random TTA views depend on the
    row, not the pixels: they are not stored; nor are in-memory arrays."""
    n, n_test = chain["n"], chain["n_test"]
    batches = 2 * (-(-n // 128) + -(-n_test // 128))
    assert chain["passes"][RUN] == [batches, 0, 0]
    shared = chain["passes"]["shared"]
    assert 0 < shared[0] < batches and shared[1:] == [0, 0]  # the damaged file alone
    assert all(p > 0 for p in chain["passes"]["per-fold"])
    assert sum(chain["passes"]["per-fold"]) > 2 * batches  # K passes over the training rows
    assert chain["same"] == [True, True]
    files = chain["store_files"]
    assert len(files) == 4 == chain["store_after"]
    assert sorted(f.rsplit("_", 1)[1] for f in files) == ["hflip.npy"] * 2 + ["identity.npy"] * 2
    assert chain["storable"] == [True, False, False]


@pytest.mark.slow
def test_predict_and_serve_a_probe_bundle(chain: dict, demo_subset: Path) -> None:
    """predict.py on the exported bundle (its extractor inside) = the stack's own test
    probabilities; held-out accuracy well above chance; serve.py answers like predict.py."""
    import requests

    from tests.test_serve import _serving

    got, bundle = chain["preds"], chain["out"] / "bundle"
    assert (bundle / "runs" / RUN / "extractor.safetensors").is_file()
    sub = pd.read_csv(chain["run"].parent / "stack-logreg" / "submission_proba.csv",
                      dtype={"Id": str})
    classes = [str(c) for c in range(10)]
    assert np.abs(got.loc[sub["Id"], classes].to_numpy() - sub[classes].to_numpy()).max() < 1e-6
    truth = pd.read_csv(demo_subset / "test_labels.csv", dtype=str).set_index("Id")
    assert (got["label"] == truth.loc[got.index].iloc[:, 0]).mean() > 0.5
    # serve.py against predict.py on the same two files: the same batch of 2 and the same
    # default threads. A batch of 2 and predict.py's batch of 64 may differ at float32 rounding
    # (convolution kernels chosen by batch size; 1.3e-6 on a 2-core Intel Xeon), hence 1e-5 there.
    files = sorted((demo_subset / "test_upload").iterdir())[:2]
    pair = chain["out"] / "pair.csv"
    _py("predict.py", str(bundle), *map(str, files), "--out", str(pair))
    same = pd.read_csv(pair, dtype={"id": str, "label": str}).set_index("id")
    with _serving(bundle) as url:
        resp = requests.post(url + "/predict", timeout=60,
                             files=[("file", (f.name, f.read_bytes())) for f in files])
    assert resp.status_code == 200, resp.text[:500]
    for row in resp.json()["predictions"]:
        probs = np.array([row["probabilities"][c] for c in classes])
        assert np.abs(probs - same.loc[row["name"], classes].to_numpy(float)).max() < 1e-6
        assert np.abs(probs - got.loc[row["name"], classes].to_numpy(float)).max() < 1e-5
