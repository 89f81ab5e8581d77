"""The backbone contract, run over every registered family (issue 29 item 4).

The cases come from the registry: every name in ``backbones.FAMILIES`` trains the smallest model
its family declares (``Family.example``, a ``backbones.fold.ContractExample``), and a family
without one fails here, named, so a new family gets these checks for free and cannot skip them.

Per family, on a tiny dataset of real PNG scans (60 images, 10 test; 2 folds, 1 epoch, one
thread, hflip TTA), three ``run_folds.py`` processes: torch and TensorFlow never share a
process, and the family must never load the other framework.

- reference: one uninterrupted run (its FoldResults watched as they pass), then the run's
  predictor loaded as predict.py loads it, then the bad configs refused;
- killed: a second run SIGKILLed as fold 1 starts (fold 0's part written);
- resumed: that run again, to the end. Fold 0 is not redone, and every matrix equals the
  reference bit for bit: fold 0 came from a fresh process (same seeds, same bits), fold 1
  after the kill.

The reference runs beside the other two (two processes at a time, one thread each).
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import backbones
from backbones.fold import ContractExample
from tests.conftest import write_demo_subset

REPO = Path(__file__).resolve().parents[1]
FAMILY_NAMES = sorted(backbones.FAMILIES)  # the cases: a family added there is checked here
FOLDS, PER_CLASS, N_TEST = 2, 6, 10


def missing_examples() -> list[str]:
    """Registered families that declare no contract example (each must declare one)."""
    return [name for name in sorted(backbones.FAMILIES)
            if backbones.get_backend(name).example is None]


def example_of(name: str) -> ContractExample:
    family = backbones.get_backend(name)
    if family.example is None:
        pytest.fail(f"family {name!r} ({backbones.FAMILIES[name]}) declares no Family.example "
                    "(backbones.fold.ContractExample): every registered family must, so that "
                    "tests/test_backbone_contract.py checks it")
    return family.example


def run_args(example: ContractExample, data: Path, out: Path) -> list[str]:
    return ["--data", str(data), "--out", str(out), "--backbone", example.backbone,
            "--img-size", str(example.img_size), "--folds", str(FOLDS), "--epochs", "1",
            "--tta", "hflip", "--threads", "1", "--progress", "false", *example.flags]


def env() -> dict[str, str]:
    e = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
         "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    e.pop("KERAS_BACKEND", None)
    e.pop("FOLDSTACK_FAULT_AFTER_WRITES", None)
    return e


REFERENCE = r"""
import json, sys
from pathlib import Path
import numpy as np
import backbones
from backbones.base import FoldResult
from oof.config import RunConfig, parse_config
from oof.datasets import load_dataset
from oof.errors import ConfigError
from oof.rundir import load_run
from runner.run import run_folds
from serve.bundle import _run_entry, decode, import_backends

name, argv, bad, report = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]), sys.argv[4]
r = {}
family = backbones.get_backend(name)
results = []
train_fold = family.train_fold

def watched(job, callbacks=None):  # the runner's own call, its result kept for the checks
    result = train_fold(job, callbacks)
    ckpt = Path(job.checkpoint_path)
    results.append({
        "is_fold_result": isinstance(result, FoldResult),
        "n_val": len(job.y_val), "n_test": len(job.x_test), "classes": len(job.classes),
        "val_shape": list(np.shape(result.val_proba)),
        "test_shape": list(np.shape(result.test_proba)),
        "sums": np.concatenate([np.asarray(result.val_proba, float).sum(1),
                                np.asarray(result.test_proba, float).sum(1)]).tolist(),
        "finite": bool(np.isfinite(result.val_proba).all()
                       and np.isfinite(result.test_proba).all()),
        "history": result.history, "history_csv": Path(job.history_path).is_file(),
        "checkpoint_bytes": ckpt.stat().st_size if ckpt.is_file() else 0,
        "tmp_files": [p.name for p in ckpt.parent.iterdir() if p.name.endswith(".tmp")],
    })
    return result

family.train_fold = watched
summary = run_folds(parse_config(RunConfig, argv, "run_folds.py", ""))
family.train_fold = train_fold
run_dir = summary.run_dir
r.update(run_dir=str(run_dir), folds=results, versions=family.versions(),
         framework=family.framework, spec=json.loads((run_dir / "meta.json").read_text())
         ["backbone"])

# the predictor as predict.py / serve.py load a run of a stack: its entry, the family's
# run predictor, the images decoded from their files as served files are
data = load_dataset(argv[argv.index("--data") + 1], "auto", None)
run = load_run(run_dir)
entry = _run_entry(run_dir, run.name)
import_backends({entry.family})
predictor = family.load_run_predictor(entry.meta, entry.checkpoints, 1, "cpu")
paths = dict(zip(data.train["id"].astype(str), data.train["path"]))
got = predictor.predict_proba(decode([paths[i] for i in run.ids], entry.input_size))
test_paths = dict(zip(data.test["id"].astype(str), data.test["path"]))
got_test = predictor.predict_proba(decode([test_paths[i] for i in run.test_ids],
                                          entry.input_size))
r["predictor"] = {
    "shape": list(got.shape), "test_shape": list(got_test.shape),
    "oof": [float(np.abs(got[k][run.folds == k] - run.oof[run.folds == k]).max())
            for k in range(len(got))],
    "test_folds": float(np.abs(got_test - run.test_per_fold()).max()),
    "test_mean": float(np.abs(got_test.mean(0) - run.test).max()),
}
r["modules"] = sorted(m for m in ("torch", "tensorflow") if m in sys.modules)

# after the run: checking a bad value may start the framework (Keras builds the model to count
# its BatchNorm layers), and TensorFlow's thread count is then fixed for the process
r["refused"] = []
for flag, value, where in bad:  # refused before anything is written under --out
    args = [*argv, flag, value]
    args[args.index("--out") + 1] = where
    try:
        run_folds(parse_config(RunConfig, args, "run_folds.py", ""))
        r["refused"].append([flag, value, "ACCEPTED", ""])
    except ConfigError as exc:
        r["refused"].append([flag, value, "ConfigError", str(exc)])
    except Exception as exc:
        r["refused"].append([flag, value, type(exc).__name__, str(exc)])
Path(report).write_text(json.dumps(r, default=str))
"""


def read_parts(run_dir: Path, fold: int) -> dict[str, tuple[bytes, int]]:
    """Fold ``fold``'s part files and checkpoint(s): bytes and modification time."""
    files = [*(run_dir / "parts").glob(f"fold{fold}[._]*"),
             *(run_dir / "checkpoints").glob(f"fold{fold}[._]*")]
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(files)}


def matrices(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(run_dir / f"{name}.parquet")
            for name in ("oof", "test", "test_folds")}


@pytest.fixture(scope="module")
def tiny(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_subset(demo_dir, tmp_path_factory.mktemp("contract") / "data", PER_CLASS,
                             N_TEST)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def contract(request: pytest.FixtureRequest, tiny: Path,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The three runs of one family (see the module docstring) and what they left."""
    name = request.param
    example = example_of(name)
    t0, cpu0 = time.perf_counter(), children_cpu()
    root = tmp_path_factory.mktemp(f"contract-{name}")
    bad = [("--backbone", example.backbone + "x"), *example.bad]
    bad_outs = [str(root / f"bad{i}") for i in range(len(bad))]
    report, ref_log = root / "reference.json", root / "reference.log"
    with ref_log.open("w") as ref_out:  # a file, not a pipe: nothing waits on its reader
        reference = subprocess.Popen(
            [sys.executable, "-c", REFERENCE, name,
             json.dumps(run_args(example, tiny, root / "a")),
             json.dumps([[f, v, o] for (f, v), o in zip(bad, bad_outs)]), str(report)],
            cwd=root, env=env(), stdout=ref_out, stderr=subprocess.STDOUT)
    try:
        killed = kill_as_fold_1_starts([sys.executable, str(REPO / "run_folds.py"),
                                        *run_args(example, tiny, root / "b")], root)
        run_b = next((root / "b").glob("*/*/meta.json")).parent
        before = read_parts(run_b, 0)
        resumed = subprocess.run([sys.executable, str(REPO / "run_folds.py"),
                                  *run_args(example, tiny, root / "b")], cwd=root, env=env(),
                                 capture_output=True, text=True, timeout=600)
        reference.wait(timeout=600)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    assert reference.returncode == 0, ref_log.read_text()[-5000:]
    assert resumed.returncode == 0, resumed.stderr[-5000:]
    r = json.loads(report.read_text())
    print(f"contract {name}: {time.perf_counter() - t0:.0f} s wall, "
          f"{children_cpu() - cpu0:.0f} s CPU in its three runs")
    return {"name": name, "example": example, "reference": r, "ref_dir": Path(r["run_dir"]),
            "killed": killed, "resumed": resumed.stderr, "run_b": run_b,
            "fold0_before": before, "fold0_after": read_parts(run_b, 0),
            "bad": list(zip(bad, bad_outs)), "tiny": tiny}


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def kill_as_fold_1_starts(cmd: list[str], cwd: Path) -> str:
    """Run ``cmd`` and SIGKILL its process group when it logs the start of fold 1 (fold 0's
    part is written by then); its stderr up to the kill."""
    lines = []
    with subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, start_new_session=True) as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if re.search(rf"fold 2/{FOLDS}: ", line):
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(600)
    log = "".join(lines)
    assert proc.returncode == -signal.SIGKILL, f"not killed at fold 1:\n{log[-5000:]}"
    return log


def test_every_registered_family_declares_an_example(monkeypatch: pytest.MonkeyPatch) -> None:
    """The suite's cases are the registry's names; a family registered without an example is
    named (here a stand-in registered as 'bare', which then fails its contract cases)."""
    assert missing_examples() == [], (
        f"families without Family.example: {missing_examples()}: the contract suite cannot "
        "check them")
    bare = type(backbones.get_backend("timm"))()
    bare.name, bare.example = "bare", None
    monkeypatch.setitem(backbones.FAMILIES, "bare", "backbones.timm")
    monkeypatch.setitem(backbones._REGISTERED, "bare", bare)
    assert missing_examples() == ["bare"]
    with pytest.raises(pytest.fail.Exception, match="family 'bare' .* declares no Family.example"):
        example_of("bare")


@pytest.mark.slow
def test_spec_and_fold_results(contract: dict[str, Any]) -> None:
    """(a) The spec carries the preprocessing; each fold's FoldResult holds a probability row
    per held-out and test image; the checkpoint is published whole; the family loaded its own
    framework and no other."""
    r, ex, name = contract["reference"], contract["example"], contract["name"]
    spec = r["spec"]
    assert spec["name"] == ex.backbone and spec["family"] == name
    assert spec["framework"] == r["framework"] == backbones.get_backend(name).framework
    assert spec["input_size"] == ex.img_size
    assert len(spec["mean"]) == 3 and len(spec["std"]) == 3 and all(s > 0 for s in spec["std"])
    assert spec["preprocessing"]
    assert r["versions"] and all(r["versions"].values())
    assert len(r["folds"]) == FOLDS
    for fold in r["folds"]:
        assert fold["is_fold_result"]
        assert fold["val_shape"] == [fold["n_val"], fold["classes"]]
        assert fold["test_shape"] == [fold["n_test"], fold["classes"]] == [N_TEST, 10]
        assert fold["finite"] and np.allclose(fold["sums"], 1, atol=1e-5)
        assert len(fold["history"]) == 1
        assert {"epoch", "loss", "accuracy", "val_loss"} <= set(fold["history"][0])
        assert fold["history_csv"] and fold["checkpoint_bytes"] > 0 and not fold["tmp_files"]
    assert r["modules"] == [r["framework"]], f"{name} loaded {r['modules']}"


@pytest.mark.slow
def test_oof_and_test_rows_complete(contract: dict[str, Any]) -> None:
    """(b) Every training image has one OOF row, from the fold that held it out; every test
    image one row per fold model and one mean row; no NaN; rows sum to 1."""
    from oof.datasets import load_dataset
    from oof.rundir import load_run

    data = load_dataset(contract["tiny"], "auto", None)
    run = load_run(contract["ref_dir"])
    m = matrices(contract["ref_dir"])
    train_ids = sorted(data.train["id"].astype(str))
    assert sorted(m["oof"]["id"].astype(str)) == train_ids  # each id exactly once
    assert sorted(m["test"]["id"].astype(str)) == sorted(data.test["id"].astype(str))
    assert (m["test_folds"]["fold"].value_counts().sort_index() == N_TEST).all()
    assert sorted(m["test_folds"]["fold"].unique()) == list(range(FOLDS))
    assert sorted(set(run.folds)) == list(range(FOLDS))
    for proba in (run.oof, run.test, run.test_per_fold().reshape(-1, len(run.classes))):
        assert proba.shape[1] == 10 and np.isfinite(proba).all() and (proba >= 0).all()
        assert np.allclose(proba.sum(axis=1), 1, atol=1e-6)
    assert np.allclose(run.test, run.test_per_fold().mean(axis=0), atol=1e-12)


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_fold_0(contract: dict[str, Any]) -> None:
    """(d) SIGKILL as fold 1 starts, rerun: fold 0's part and checkpoint are not rewritten
    (same bytes, same mtime), only fold 1 trains, and the run completes."""
    killed, resumed = contract["killed"], contract["resumed"]
    assert "fold 0 done" in killed and "fold 1 done" not in killed
    before, after = contract["fold0_before"], contract["fold0_after"]
    assert any(f.startswith("parts/fold0.json") for f in before), sorted(before)
    assert any(f.startswith("checkpoints/") for f in before), sorted(before)
    assert after == before, "fold 0's files were rewritten by the resumed run"
    assert "fold 0 done" not in resumed and "fold 1 done" in resumed, resumed[-3000:]
    assert json.loads((contract["run_b"] / "meta.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_same_seeds_same_bits(contract: dict[str, Any]) -> None:
    """(c) The killed-and-resumed run (fold 0 from a fresh process, fold 1 after the kill)
    equals the uninterrupted one bit for bit: OOF, test mean and per-fold test rows."""
    want, got = matrices(contract["ref_dir"]), matrices(contract["run_b"])
    for name in want:
        pd.testing.assert_frame_equal(got[name], want[name], check_exact=True, obj=name)


@pytest.mark.slow
def test_predictor_reproduces_stored_rows(contract: dict[str, Any]) -> None:
    """(e) The run's predictor, loaded as predict.py loads it, gives each fold's stored OOF
    rows on that fold's held-out images, and the stored test rows (per fold and their mean),
    to 1e-6, from the image files."""
    p = contract["reference"]["predictor"]
    assert p["shape"] == [FOLDS, PER_CLASS * 10, 10] and p["test_shape"] == [FOLDS, N_TEST, 10]
    assert max(p["oof"]) < 1e-6 and p["test_folds"] < 1e-6 and p["test_mean"] < 1e-6, p


@pytest.mark.slow
def test_bad_config_refused_before_writing(contract: dict[str, Any]) -> None:
    """(f) A misspelt model name (with the close name as a hint) and the family's own bad
    values raise ConfigError naming the flag and the value; nothing is written under --out."""
    refused = contract["reference"]["refused"]
    assert len(refused) == len(contract["bad"]) >= 1
    model = contract["example"].backbone.split("/", 1)[1]
    for (flag, value, kind, message), (_, out) in zip(refused, contract["bad"]):
        assert kind == "ConfigError", f"{flag} {value}: {kind} {message}"
        assert flag in message and value in message, message
        if flag == "--backbone":
            assert model in message.split(value, 1)[1], f"no close-name hint: {message}"
        assert not Path(out).exists() or not any(Path(out).rglob("*")), \
            f"{flag} {value} wrote {sorted(Path(out).rglob('*'))}"


def test_triton_kept_out_without_a_gpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No GPU driver: ``import triton`` fails fast instead of loading libtriton; with one, or
    with FOLDSTACK_LOAD_TRITON=1, nothing is touched."""
    import backbones

    monkeypatch.delitem(sys.modules, "triton", raising=False)
    monkeypatch.setattr(backbones, "GPU_DEVICE_FILES", (str(tmp_path / "no-such-device"),))
    assert backbones.keep_triton_out_without_gpu()
    with pytest.raises(ImportError):
        import triton  # noqa: F401
    monkeypatch.delitem(sys.modules, "triton")
    monkeypatch.setenv("FOLDSTACK_LOAD_TRITON", "1")
    assert not backbones.keep_triton_out_without_gpu()
    assert "triton" not in sys.modules
    monkeypatch.delenv("FOLDSTACK_LOAD_TRITON")
    (tmp_path / "nvidiactl").touch()
    monkeypatch.setattr(backbones, "GPU_DEVICE_FILES", (str(tmp_path / "nvidiactl"),))
    assert not backbones.keep_triton_out_without_gpu()
    assert "triton" not in sys.modules


@pytest.mark.skipif(any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia",
                                                    "/dev/kfd")), reason="a GPU driver is here")
def test_timm_backend_on_cpu_never_loads_triton() -> None:
    """The timm backend (timm -> torchvision -> torch._dynamo) runs with triton absent."""
    code = ("import sys, backbones.timm.model as tb, torch.utils._triton as t;"
            "m = tb.create_model; print(sys.modules.get('triton'), t.has_triton_package())")
    env = {k: v for k, v in os.environ.items() if k != "FOLDSTACK_LOAD_TRITON"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["None", "False"]
