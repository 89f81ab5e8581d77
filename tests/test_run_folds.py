"""End to end: ``run_folds.py`` in a subprocess, training timm/resnet10t on real image files.

Every run is tiny (16 px, 1 epoch, K=3 on 300 demo scans) and runs in its own process, as a user
would run it; torch is never imported into the pytest process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import write_demo_subset
from tests.imaging import make_imagefolder

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_folds.py"
FAST = ["--folds", "3", "--epochs", "1", "--img-size", "16", "--progress", "false"]
RUN_NAME = "timm-resnet10t_16px"


def run_script(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python run_folds.py ARGS`` as a user runs it; stdout and stderr kept apart."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, one clear message on stderr, no traceback."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


def trained_folds(log: str) -> list[int]:
    """Folds the runner announced training ("fold 2/3: ..." is fold index 1)."""
    return [int(line.split("fold ")[1].split("/")[0]) - 1
            for line in log.splitlines() if " runner.run: fold " in line and "/" in line]


@pytest.fixture(scope="module")
def finished(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, subprocess.CompletedProcess, list[str]]:
    """One complete K=3 run on a private copy of the demo subset (shared by several tests)."""
    work = tmp_path_factory.mktemp("e2e")
    data = write_demo_subset(demo_dir, work / "data", 30, 40)
    args = ["--data", str(data), "--out", str(work / "runs"), *FAST]
    proc = run_script(args, work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return work / "runs" / "data" / RUN_NAME, proc, args


@pytest.mark.slow
def test_complete_run_directory(finished: tuple[Path, subprocess.CompletedProcess, list[str]]
                                ) -> None:
    run_dir, proc, _ = finished
    for name in ("oof.parquet", "test.parquet", "test_folds.parquet", "meta.json",
                 "history.csv", "config.yaml"):
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "fold0.safetensors", "fold1.safetensors", "fold2.safetensors"]
    assert not (run_dir / "work").exists()  # scratch space removed once done

    meta = json.loads((run_dir / "meta.json").read_text())
    folds_meta = json.loads((run_dir.parent / "folds.json").read_text())
    assert meta["status"] == "complete" and meta["folds"] == 3
    assert meta["fold_fingerprint"] == folds_meta["fingerprint"]
    assert meta["config"]["epochs"] == 1 and meta["config"]["img_size"] == 16
    assert meta["config"]["backbone"] == "timm/resnet10t"
    assert {"python", "numpy", "torch", "timm"} <= set(meta["versions"])
    assert meta["train_seed"] == 42 and meta["fold_seed"] == 42
    assert meta["classes"] == [str(i) for i in range(10)]
    for k in ("0", "1", "2"):
        info = meta["fold_info"][k]
        assert {"accuracy", "log_loss", "seconds", "train_seconds", "epochs_run"} <= set(info)
        assert info["n_val"] == 100 and info["epochs_run"] == 1
    assert set(meta["oof_metrics"]) == {"accuracy", "log_loss", "macro_f1", "top3"}

    oof = pd.read_parquet(run_dir / "oof.parquet")
    cols = [f"{RUN_NAME}__{i}" for i in range(10)]
    assert list(oof.columns) == ["id", "label", "fold", *cols]
    assert len(oof) == 300 and oof["id"].is_unique
    assert sorted(oof["fold"].value_counts().tolist()) == [100, 100, 100]
    np.testing.assert_allclose(oof[cols].sum(axis=1), 1.0, atol=1e-6)
    test = pd.read_parquet(run_dir / "test.parquet")
    assert len(test) == 40 and list(test.columns) == ["id", *cols]
    per_fold = pd.read_parquet(run_dir / "test_folds.parquet")
    assert len(per_fold) == 120
    mean = per_fold.groupby("id", sort=False)[cols].mean().loc[test["id"]].to_numpy()
    np.testing.assert_allclose(test[cols].to_numpy(), mean, atol=1e-9)

    history = pd.read_csv(run_dir / "history.csv")
    assert {"fold", "epoch", "loss", "accuracy", "val_loss", "val_accuracy"} <= set(history)
    assert sorted(history["fold"]) == [0, 1, 2]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["folds"] == 3 and saved["img_size"] == 16 and saved["progress"] is False

    out = proc.stdout
    assert "| fold | accuracy | log_loss | seconds" in out
    assert out.count("\n| 0 ") + out.count("\n| 1 ") + out.count("\n| 2 ") == 3
    assert "OOF accuracy" in out and str(run_dir) in out
    assert trained_folds(proc.stderr) == [0, 1, 2]


@pytest.mark.slow
def test_same_seeds_give_bit_identical_oof_and_test_with_augmentation(
        finished: tuple[Path, subprocess.CompletedProcess, list[str]], tmp_path: Path) -> None:
    """Rerun fold 1 of the finished run (default 'light' augmentation) in a fresh run root."""
    run_dir, _, args = finished
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["augment"] == "light"
    out = tmp_path / "again"
    again = [*args[:args.index("--out") + 1], str(out), *args[args.index("--out") + 2:]]
    proc = run_script([*again, "--fold", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("fold1_oof.parquet", "fold1_test.parquet"):
        first = pd.read_parquet(run_dir / "parts" / name)
        second = pd.read_parquet(out / "data" / RUN_NAME / "parts" / name)
        pd.testing.assert_frame_equal(first, second, check_exact=True)


@pytest.mark.slow
def test_tta_ema_and_mixing_change_what_they_should(
        finished: tuple[Path, subprocess.CompletedProcess, list[str]], tmp_path: Path) -> None:
    """Fold 1 again with test-time flips, zooms and augmented views: training is identical
    (same seeds), so every difference comes from TTA, and it reaches OOF and test rows alike."""
    run_dir, _, args = finished
    out = tmp_path / "tta"
    again = [*args[:args.index("--out") + 1], str(out), *args[args.index("--out") + 2:]]
    proc = run_script([*again, "--fold", "1", "--tta", "flips", "--tta-scales", "1.2",
                       "--tta-augment", "2"], tmp_path)
    ema = run_script([*again[:again.index("--out") + 1], str(tmp_path / "ema"),
                      *again[again.index("--out") + 2:], "--fold", "1", "--ema", "true"],
                     tmp_path)
    assert ema.returncode == 0, ema.stdout + ema.stderr
    mix = run_script([*again[:again.index("--out") + 1], str(tmp_path / "mix"),
                      *again[again.index("--out") + 2:], "--fold", "1", "--mixup-alpha", "0.4",
                      "--cutmix-alpha", "1.0"], tmp_path)
    assert mix.returncode == 0, mix.stdout + mix.stderr
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("fold1_oof.parquet", "fold1_test.parquet"):
        plain = pd.read_parquet(run_dir / "parts" / name)
        tta = pd.read_parquet(out / "data" / RUN_NAME / "parts" / name)
        classes = [str(c) for c in range(10)]
        assert plain.get("id", plain.index).equals(tta.get("id", tta.index))
        diff = np.abs(plain[classes].to_numpy() - tta[classes].to_numpy())
        assert diff.max() > 1e-3, name
        np.testing.assert_allclose(tta[classes].sum(axis=1), 1.0, atol=1e-6)
    history = pd.read_csv(out / "data" / RUN_NAME / "parts" / "fold1_history.csv")
    plain_history = pd.read_csv(run_dir / "parts" / "fold1_history.csv")
    assert history["loss"].tolist() == plain_history["loss"].tolist()
    # --ema: the same training steps, but the averaged weights predict
    ema_parts = tmp_path / "ema" / "data" / RUN_NAME / "parts"
    ema_history = pd.read_csv(ema_parts / "fold1_history.csv")
    assert ema_history["loss"].tolist() == plain_history["loss"].tolist()
    ema_oof = pd.read_parquet(ema_parts / "fold1_oof.parquet")[classes].to_numpy()
    plain_oof = pd.read_parquet(run_dir / "parts" / "fold1_oof.parquet")[classes].to_numpy()
    assert np.abs(ema_oof - plain_oof).max() > 1e-3
    # mixup/cutmix: other pixels and soft targets, so another training loss
    mix_history = pd.read_csv(tmp_path / "mix" / "data" / RUN_NAME / "parts" / "fold1_history.csv")
    assert mix_history["loss"].tolist() != plain_history["loss"].tolist()


@pytest.mark.slow
def test_finished_run_with_other_settings_refused(
        finished: tuple[Path, subprocess.CompletedProcess, list[str]]) -> None:
    run_dir, _, args = finished
    before = (run_dir / "oof.parquet").stat().st_mtime_ns
    proc = run_script([*args, "--epochs", "2"], run_dir.parent)
    assert_user_error(proc, str(run_dir), "epochs: 1 -> 2", "--run-name")
    assert (run_dir / "oof.parquet").stat().st_mtime_ns == before


@pytest.mark.slow
def test_config_file_gives_defaults_flags_override_and_fold_option(
        demo_subset: Path, copy_dataset: Callable[..., Path], tmp_path: Path) -> None:
    data = copy_dataset(demo_subset)
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump({
        "data": str(data), "out": str(tmp_path / "runs"), "folds": 3, "epochs": 1,
        "img-size": 16, "batch_size": 64, "lr": 0.01, "progress": False,
    }))
    proc = run_script(["--config", str(config), "--batch-size", "32", "--fold", "1"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "data" / RUN_NAME
    assert trained_folds(proc.stderr) == [1]
    assert sorted(p.name for p in (run_dir / "parts").glob("fold*.json")) == ["fold1.json"]
    assert not (run_dir / "oof.parquet").exists()
    assert "run incomplete: folds done [1]" in proc.stdout
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["batch_size"] == 32  # the flag wins
    assert saved["lr"] == 0.01 and saved["epochs"] == 1 and saved["img_size"] == 16  # from YAML
    assert saved["config"] == str(config) and saved["fold"] == 1
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "partial" and meta["config"]["batch_size"] == 32


def test_unknown_config_key_refused(tmp_path: Path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("epoch: 3\nimg_size: 16\n")
    proc = run_script(["--config", str(config)], tmp_path)
    assert_user_error(proc, "unknown key(s) 'epoch'", "epochs", str(config))
    assert not (tmp_path / "runs").exists()


def test_help_lists_flags(tmp_path: Path) -> None:
    proc = run_script(["--help"], tmp_path)
    assert proc.returncode == 0
    for flag in ("--data", "--layout", "--out", "--folds", "--seed", "--fold", "--backbone",
                 "--pretrained", "--img-size", "--batch-size", "--epochs", "--lr",
                 "--weight-decay", "--tta", "--config", "--progress"):
        assert flag in proc.stdout, flag
    flat = " ".join(proc.stdout.split())
    assert "--tta {none,hflip,flips}" in flat
    assert "cosine to 1 %," in flat
    assert "training epochs per fold (default: 10)" in flat  # defaults are shown


@pytest.mark.slow
def test_killed_between_folds_resumes_without_redoing(
        demo_subset: Path, copy_dataset: Callable[..., Path], tmp_path: Path) -> None:
    data = copy_dataset(demo_subset)
    args = ["--data", str(data), "--out", str(tmp_path / "runs"), *FAST]
    run_dir = tmp_path / "runs" / "data" / RUN_NAME
    marker = run_dir / "parts" / "fold0.json"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    first_log = (tmp_path / "first.log").read_text()
    assert marker.exists(), first_log
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert trained_folds(first_log)[0] == 0
    # the interrupted state: fold 0 finished, nothing else looks finished
    parts = run_dir / "parts"
    assert sorted(p.name for p in parts.glob("fold*.json")) == ["fold0.json"]
    assert not (run_dir / "oof.parquet").exists()
    assert json.loads((run_dir / "meta.json").read_text())["status"] == "partial"
    stamp, content = marker.stat().st_mtime_ns, marker.read_text()
    fold0_oof = (parts / "fold0_oof.parquet").read_bytes()

    again = run_script(args, tmp_path)
    assert again.returncode == 0, again.stdout + again.stderr
    assert trained_folds(again.stderr) == [1, 2]  # fold 0 not redone
    assert marker.stat().st_mtime_ns == stamp and marker.read_text() == content
    assert (parts / "fold0_oof.parquet").read_bytes() == fold0_oof
    assert "OOF accuracy" in again.stdout
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["status"] == "complete" and sorted(meta["fold_info"]) == ["0", "1", "2"]
    oof = pd.read_parquet(run_dir / "oof.parquet")
    assert len(oof) == 300 and oof["id"].is_unique
    assert not oof.filter(like="__").isna().any().any()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "fold0.safetensors", "fold1.safetensors", "fold2.safetensors"]


@pytest.mark.slow
def test_imagefolder_with_string_classes_and_jpegs(tmp_path: Path) -> None:
    """Only --data and --backbone (plus speed flags): default K=5, default --out runs."""
    data = make_imagefolder(tmp_path / "vehicles", {"sedan": 6, "suv": 5, "truck": 7}, test=3)
    proc = run_script(["--data", str(data), "--backbone", "timm/resnet10t", "--epochs", "1",
                       "--img-size", "16", "--progress", "false"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "runs" / "vehicles" / RUN_NAME
    meta = json.loads((run_dir / "meta.json").read_text())
    assert meta["classes"] == ["sedan", "suv", "truck"] and meta["folds"] == 5
    assert meta["data"]["layout"] == "imagefolder"
    oof = pd.read_parquet(run_dir / "oof.parquet")
    assert len(oof) == 18 and set(oof["label"]) == {"sedan", "suv", "truck"}
    assert f"{RUN_NAME}__sedan" in oof.columns
    test = pd.read_parquet(run_dir / "test.parquet")
    assert list(test["id"]) == ["t0.jpg", "t1.jpg", "t2.jpg"]
    assert "OOF accuracy" in proc.stdout
    assert "img/s" not in proc.stderr and "it/s" not in proc.stderr  # --progress false: no bars


@pytest.mark.slow
def test_bad_images_reported_before_training(demo_subset: Path,
                                             copy_dataset: Callable[..., Path],
                                             tmp_path: Path) -> None:
    data = copy_dataset(demo_subset)
    train = pd.read_csv(data / "train.csv", dtype=str)
    bad = [data / "train" / train["Category"][n] / train["Id"][n] for n in (5, 200)]
    bad[0].write_bytes(b"not an image")
    bad[1].write_bytes(bad[1].read_bytes()[:60])
    proc = run_script(["--data", str(data), "--out", str(tmp_path / "runs"), *FAST], tmp_path)
    assert_user_error(proc, "2 image(s) could not be read", str(bad[0]), str(bad[1]))
    assert trained_folds(proc.stderr) == []
    assert not list((tmp_path / "runs").rglob("fold[0-9]*.json"))  # no fold looks done


@pytest.mark.slow
def test_missing_pretrained_file_is_a_clear_error(tmp_path: Path, demo_subset: Path) -> None:
    proc = run_script(["--data", str(demo_subset), "--out", str(tmp_path / "runs"), *FAST,
                       "--pretrained", "/nonexistent/resnet10t.pth"], tmp_path)
    assert_user_error(proc, "--pretrained /nonexistent/resnet10t.pth: no such weights file")
    assert not list((tmp_path / "runs").rglob("meta.json"))  # failed before the run folder


TIMM_SCRIPT = r"""
import json, sys
import torch, timm
from backbones.timm.model import create_model, resolve_spec
from oof.config import RunConfig
from oof.errors import ConfigError

path = sys.argv[1]
source = timm.create_model("resnet10t", pretrained=False)  # 1000-class head, seeded below
torch.manual_seed(123)
for p in source.parameters():
    torch.nn.init.normal_(p)
torch.save(source.state_dict(), path)
spec = resolve_spec("resnet10t", RunConfig(pretrained=path, img_size=16))
torch.manual_seed(0)
loaded = create_model(spec, num_classes=7)
scratch = create_model(resolve_spec("resnet10t", RunConfig(img_size=16)), num_classes=7)
try:
    resolve_spec("resnet10x", RunConfig())
    unknown = ""
except ConfigError as exc:
    unknown = str(exc)
print(json.dumps({
    "same_as_file": bool(torch.equal(loaded.conv1[0].weight, source.conv1[0].weight)),
    "same_as_scratch": bool(torch.equal(loaded.conv1[0].weight, scratch.conv1[0].weight)),
    "head": [loaded.fc.out_features, scratch.fc.out_features],
    # a new head on pretrained features starts at zero (uniform predictions), from scratch not
    "zero_head": [bool(torch.count_nonzero(m.fc.weight) == 0) for m in (loaded, scratch)],
    "uniform": bool(torch.allclose(loaded.eval()(torch.rand(2, 3, 16, 16)).softmax(1),
                                   torch.full((2, 7), 1 / 7))),
    "unknown": unknown,
    "tensorflow_loaded": "tensorflow" in sys.modules,
}))
"""


@pytest.mark.slow
def test_pretrained_file_loads_offline_and_unknown_name_suggests(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", TIMM_SCRIPT, str(tmp_path / "w.pth")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["same_as_file"] and not result["same_as_scratch"]
    assert result["head"] == [7, 7]  # a fresh head for this dataset's classes
    assert result["zero_head"] == [True, False] and result["uniform"]
    assert "timm has no such model" in result["unknown"]
    assert "resnet10t" in result["unknown"].split("closest:")[1]
    assert not result["tensorflow_loaded"]


# --------------------------------------------------------------------------- resume guards
# (in process: runner.run is framework-free, so these need no training)


def test_resume_guard_accepts_same_settings_and_omitted_fold_flags(tmp_path: Path) -> None:
    from oof.config import RunConfig, config_dict
    from oof.errors import ConfigError
    from oof.folds import make_folds
    from oof.rundir import RunDir
    from runner.run import _check_same_config

    folds = make_folds([f"i{n}" for n in range(12)], ["a", "b"] * 6, 3, 5)
    run = RunDir(tmp_path / "run")
    first = RunConfig(folds=3, seed=5, epochs=1, img_size=16, fold=0, progress=False)
    run.write_meta({"config": config_dict(first), "fold_fingerprint": folds.fingerprint})
    # other fold, progress bar, and folds/seed left to the stored folds.csv: same run
    _check_same_config(run, RunConfig(epochs=1, img_size=16, fold=2), folds)
    with pytest.raises(ConfigError, match=r"lr: None -> 0.1.*--run-name NEW_NAME"):
        _check_same_config(run, RunConfig(epochs=1, img_size=16, lr=0.1), folds)


def test_thread_count_is_a_number_recorded_and_a_rerun_must_keep_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The thread count orders a fold's float sums: left out, it resolves to a number (the
    OMP_NUM_THREADS a user set, else the cores); a rerun with another count is refused, naming
    the flag that resumes it; a run started before counts were recorded resumes with any."""
    from oof.config import RunConfig, config_dict
    from oof.errors import ConfigError
    from oof.folds import make_folds
    from oof.rundir import RunDir
    from runner.run import _check_same_config, default_threads, with_threads

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3 and with_threads(RunConfig()).threads == 3
    assert with_threads(RunConfig(threads=5)).threads == 5
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == len(os.sched_getaffinity(0))

    folds = make_folds([f"i{n}" for n in range(12)], ["a", "b"] * 6, 3, 5)
    run = RunDir(tmp_path / "run")
    started = config_dict(RunConfig(epochs=1, threads=2))
    run.write_meta({"config": started, "fold_fingerprint": folds.fingerprint})
    _check_same_config(run, RunConfig(epochs=1, threads=2), folds)
    with pytest.raises(ConfigError, match=r"threads: 2 -> 1\).* pass --threads 2 "):
        _check_same_config(run, RunConfig(epochs=1, threads=1), folds)
    for old in ({**started, "threads": None}, {k: v for k, v in started.items()
                                                if k != "threads"}):
        run.write_meta({"config": old, "fold_fingerprint": folds.fingerprint})
        _check_same_config(run, RunConfig(epochs=1, threads=1), folds)


def test_resume_guard_refuses_other_folds(tmp_path: Path) -> None:
    from oof.config import RunConfig
    from oof.errors import ConfigError
    from oof.folds import make_folds
    from oof.rundir import RunDir
    from runner.run import _check_same_config

    ids, labels = [f"i{n}" for n in range(12)], ["a", "b"] * 6
    old, new = make_folds(ids, labels, 3, 5), make_folds(ids, labels, 3, 6)
    run = RunDir(tmp_path / "run")
    run.write_meta({"fold_fingerprint": old.fingerprint})
    with pytest.raises(ConfigError, match=f"trained on folds {old.fingerprint}"):
        _check_same_config(run, RunConfig(), new)


@pytest.mark.slow
def test_timm_fold_killed_mid_fold_resumes_and_ends_as_if_never_killed(
        demo_subset: Path, tmp_path: Path) -> None:
    """kill -9 after a few epochs; the rerun resumes from the last finished epoch (model,
    optimiser, LR curve, EMA, RNG) and its OOF equals an uninterrupted run's, bit for bit."""
    args = ["--data", str(demo_subset), "--folds", "3", "--fold", "0", "--epochs", "8",
            "--img-size", "32", "--batch-size", "16", "--progress", "false", "--ema", "true"]
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    parts = killed / demo_subset.name / "timm-resnet10t_32px" / "parts"
    history = parts / "fold0_history.csv"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), *args, "--out", str(killed)],
                                cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if history.exists() and len(history.read_text().splitlines()) >= 4:
                break  # header and three epochs
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    assert not (parts / "fold0.json").exists()
    again = run_script([*args, "--out", str(killed)], tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming after epoch" in again.stderr
    info = json.loads((parts / "fold0.json").read_text())
    assert info["resumed_from_epoch"] >= 2 and info["epochs_run"] == 8
    assert pd.read_csv(history)["epoch"].tolist() == list(range(8))
    done = run_script([*args, "--out", str(straight)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("fold0_oof.parquet", "fold0_test.parquet"):
        other = straight / demo_subset.name / "timm-resnet10t_32px" / "parts" / name
        pd.testing.assert_frame_equal(pd.read_parquet(parts / name), pd.read_parquet(other),
                                      check_exact=True)


@pytest.mark.slow
def test_timm_honours_yaml_callbacks(demo_subset: Path, tmp_path: Path) -> None:
    """``callbacks:`` in YAML were ignored by timm runs; now they are the loop's callbacks."""
    user_csv = tmp_path / "mine.csv"
    config = tmp_path / "cb.yaml"
    config.write_text(
        "callbacks:\n"
        "  - {name: EarlyStopping, monitor: val_accuracy, patience: 1, min_delta: 1.0}\n"
        f"  - {{name: CSVLogger, filename: '{user_csv}'}}\n")
    proc = run_script(["--data", str(demo_subset), "--out", str(tmp_path / "runs"), "--config",
                       str(config), "--folds", "3", "--fold", "0", "--epochs", "5",
                       "--img-size", "16", "--progress", "false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(next((tmp_path / "runs").rglob("fold0.json")).read_text())
    assert info["epochs_run"] == 2  # no epoch can gain 1.0 accuracy: stopped after patience 1
    assert pd.read_csv(user_csv)["epoch"].tolist() == [0, 1]
    config.write_text("callbacks:\n  - {name: EarlyStoping, patience: 1}\n")
    bad = run_script(["--data", str(demo_subset), "--out", str(tmp_path / "bad"), "--config",
                      str(config), *FAST], tmp_path)
    assert_user_error(bad, "callbacks[0]: timm backbones have no callback 'EarlyStoping'",
                      "did you mean EarlyStopping?")
    assert not list((tmp_path / "bad").rglob("meta.json"))
