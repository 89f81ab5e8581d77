"""Keras backbones on the OOF contract: every TensorFlow call runs in a subprocess.

TensorFlow never enters the pytest process (nor torch a Keras run), so these tests also check
the isolation the runner promises. Runs are tiny (32 px, 1 epoch, K=3 on the demo subset).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from oof.rundir import check_compatible, load_run
from tests.test_faults import _limit_file_size

ROOT = Path(__file__).resolve().parents[1]
APP = "MobileNetV3Small"  # the smallest keras.applications model; 32 px is its minimum

# Runs run_folds.main, then asserts which framework modules the process loaded.
WRAPPER = """
import sys
import run_folds
forbidden = sys.argv[1].split(",")
rc = run_folds.main(sys.argv[2:])
loaded = [m for m in forbidden if m in sys.modules]
assert not loaded, f"forbidden modules imported: {loaded}"
sys.exit(rc or 0)
"""

PROBE = """
import json, os, sys
import numpy as np
from backbones.keras import callbacks as kcb, data as kd, model as km, optim as ko
from backbones.keras import compiled as kc, runtime as kr
from oof.config import RunConfig
from oof.errors import ConfigError
out = {"torch_loaded": "torch" in sys.modules}
cfg = RunConfig(backbone="keras/" + sys.argv[2], img_size=32)
def error(fn):
    try:
        fn()
    except ConfigError as exc:
        return str(exc)
    return None
out["unknown_app"] = error(lambda: km.resolve_spec("MobileNetV3Smal", cfg))
out["unknown_callback"] = error(lambda: kcb.user_callbacks([{"name": "EarlyStoping"}]))
out["bad_kwargs"] = error(lambda: kcb.user_callbacks([{"name": "EarlyStopping", "bogus": 1}]))
out["plateau_with_cosine"] = error(lambda: ko.make_optimizer(
    RunConfig(callbacks=[{"name": "ReduceLROnPlateau"}]), 10))
es = kcb.user_callbacks([{"name": "EarlyStopping", "kwargs": {"patience": 2}}])[0]
out["early_stopping"] = [type(es).__name__, es.patience, es.restore_best_weights]
out["preprocessing"] = {n: km.resolve_spec(n, cfg).preprocessing
                        for n in ("MobileNetV3Small", "ResNet50", "InceptionV3", "DenseNet121")}
resnet = km.resolve_spec("ResNet50", cfg)
out["resnet_mean_std"] = [resnet.mean, resnet.std]
# a local weights file: the application without top, from scratch, saved then loaded by name
import keras
base = getattr(keras.applications, sys.argv[2])(include_top=False, weights=None,
                                                input_shape=(32, 32, 3))
path = os.path.join(sys.argv[1], "tiny.weights.h5")
base.save_weights(path)
spec = km.resolve_spec(sys.argv[2], RunConfig(img_size=32, pretrained=path))
model = km.build_model(spec, 10)
inner = next(l for l in model.layers if isinstance(l, keras.Model))
out["local_weights_equal"] = all(np.array_equal(a, b) for a, b in
                                 zip(base.get_weights(), inner.get_weights()))
out["bn_momentum"] = sorted({l.momentum for l in km._iter_layers(model)
                             if isinstance(l, keras.layers.BatchNormalization)})
out["missing_file"] = error(lambda: km.resolve_spec(sys.argv[2], RunConfig(pretrained="/no/w.h5")))
out["offline_imagenet"] = error(lambda: km.build_model(
    km.resolve_spec(sys.argv[2], RunConfig(img_size=32, pretrained="auto")), 10))
out["weights_path"] = path
out["optimizers"] = {name: type(ko.make_optimizer(RunConfig(optimizer=name), 10)[0]).__name__
                     for name in ("adamw", "sgd", "adam", "nadam", "rmsprop", "lamb", "lion",
                                  "adamax")}
head_cfg = RunConfig(img_size=32, head_pool="catavgmax", head_hidden=16, head_dropout=0.3)
headed = km.build_model(km.resolve_spec(sys.argv[2], head_cfg), 7)
out["head_layers"] = [l.name for l in headed.layers][-8:]
out["head_shape"] = list(headed.predict(np.zeros((2, 32, 32, 3), np.uint8), verbose=0).shape)
out["head_rates"] = sorted({l.rate for l in headed.layers if isinstance(l, keras.layers.Dropout)})
ema_opt = ko.make_optimizer(RunConfig(ema=True, ema_decay=0.99), 10)[0]
out["ema"] = [bool(ema_opt.use_ema), float(ema_opt.ema_momentum)]
mix_x = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
mixer = kd.EpochBatches(mix_x, np.arange(8) % 4, 4, 8, None, 3, (0.4, 1.0, 1.0))
first, again = mixer.load(np.int64(0)), mixer.load(np.int64(0))
out["mixing"] = {"same": bool(np.array_equal(first[0], again[0])),
                 "soft": bool((first[1].max(axis=1) < 1).any()),
                 "sums": [round(float(v), 5) for v in first[1].sum(axis=1)]}
out["steps_per_execution"] = [kc.steps_per_execution(n) for n in (1, 3, 6, 7, 100)]
# an epoch of 6 steps at 4 per call: the last call runs 2 steps, every batch is trained once
import contextlib, io
from keras import ops
six_x = np.random.default_rng(1).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
six_cfg = RunConfig(backbone="keras/" + sys.argv[2], img_size=32, batch_size=8, augment="light")
loaded = []
six_load = kd.EpochBatches.load
kd.EpochBatches.load = lambda self, b: (loaded.append((self.epoch, int(b))), six_load(self, b))[1]
six_data, six_steps, six_batches = kd.make_train_dataset(six_x, np.arange(48) % 4, 4, six_cfg, 0)
six_model = km.build_model(km.resolve_spec(sys.argv[2], six_cfg), 4)
six_model.compile(optimizer="sgd", loss="categorical_crossentropy",
                  steps_per_execution=kc.steps_per_execution(six_steps))
shown = io.StringIO()
with contextlib.redirect_stdout(shown):
    six_model.fit(six_data, epochs=2, verbose=2, callbacks=[six_batches], shuffle=False)
out["short_last_call"] = {"steps": six_steps, "per_call": six_model.steps_per_execution,
                          "iterations": int(ops.convert_to_numpy(six_model.optimizer.iterations)),
                          "loaded": loaded, "shown": shown.getvalue()}
kd.EpochBatches.load = six_load
out["phase_keys"] = error(lambda: km.resolve_spec(
    sys.argv[2], RunConfig(backbone="keras/" + sys.argv[2], head_epochs=5, epochs=2)))
# BackupAndRestore hands the epoch it restored to fit through Model._initial_epoch, which fit
# prefers to its initial_epoch argument and never clears (kc.forget_restored_epoch clears it)
tiny = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
tiny.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
tiny_xy = (np.zeros((4, 3), np.float32), np.zeros(4, np.int64))
def epochs_run(**kw):
    seen = []
    hook = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen.append(e))
    cbs = [hook] + ([keras.callbacks.BackupAndRestore(os.path.join(sys.argv[1], "bk"),
                                                      delete_checkpoint=False)]
                    if kw.pop("backup", False) else [])
    tiny.fit(*tiny_xy, verbose=0, callbacks=cbs, **kw)
    return seen
epochs_run(epochs=3, backup=True)  # leaves a backup at epoch 3
out["restored_epoch"] = {"resumed": epochs_run(epochs=5, backup=True),
                         "attribute": tiny._initial_epoch,
                         "stale": epochs_run(epochs=2, initial_epoch=0)}
kc.forget_restored_epoch(tiny)
out["restored_epoch"]["forgotten"] = epochs_run(epochs=2, initial_epoch=0)
# TensorFlow's C++ log level: set before its import (only fatal lines by default), a user's
# own TF_CPP_MIN_LOG_LEVEL obeyed, -v (FOLDSTACK_FRAMEWORK_LOGS) shows every line
levels = {"at_import": [os.environ.get("TF_CPP_MIN_LOG_LEVEL"),
                        os.environ.get(kr.OUR_TF_LOG_LEVEL_ENV)]}
os.environ["FOLDSTACK_FRAMEWORK_LOGS"] = "1"
levels["verbose"] = [kr.tensorflow_log_level(), os.environ["TF_CPP_MIN_LOG_LEVEL"]]
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "1"
levels["user"] = [kr.tensorflow_log_level(), os.environ["TF_CPP_MIN_LOG_LEVEL"]]
out["log_levels"] = levels
sys.stderr.flush()
with kr.cpp_log_lines_dropped(3):  # what the C++ libraries write while loading
    os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written "
                b"to STDERR\\nI0000 00:00:1796610651.148829   11355 cudart_stub.cc:31] PLANTED\\n"
                b"E0000 00:00:1796610671.275274   11355 cuda_platform.cc:52] PLANTED\\n"
                b"F0000 00:00:1796610671.275274   11355 x.cc:1] PLANTED fatal\\n"
                b"PLANTED plain\\n")
# a student's targets carry label smoothing on their one-hot part; its loss smooths no more:
# alpha 1 is bit for bit the hard-label loss, alpha 0.5 the smoothed one-hot + teacher mix
from oof.distill import mix_targets
ls_y = np.arange(6) % 10
ls_logits = np.random.default_rng(2).normal(size=(6, 10)).astype(np.float32)
ls_pred = np.exp(ls_logits) / np.exp(ls_logits).sum(axis=1, keepdims=True)
ls_teacher = np.random.default_rng(3).dirichlet(np.ones(10), size=6)
def ls_loss(smoothing, target):
    return float(ko.make_loss(RunConfig(label_smoothing=smoothing))(
        target.astype(np.float32), ls_pred))
hard_loss = ls_loss(0.1, np.eye(10)[ls_y])
mixed = mix_targets(ls_teacher, ls_y, 0.5, 1.0, 0.1)
want = 0.5 * (np.eye(10)[ls_y] * 0.9 + 0.01) + 0.5 * ls_teacher
out["student_smoothing"] = {
    "alpha1_same": ls_loss(0.0, mix_targets(ls_teacher, ls_y, 1.0, 1.0, 0.1)) == hard_loss,
    "alpha05_gap": abs(ls_loss(0.0, mixed) - float(np.mean(-(want * np.log(ls_pred)).sum(1)))),
    "smoothed_again_gap": abs(ls_loss(0.1, mixed) - ls_loss(0.0, mixed))}
# last: TensorFlow has run ops on its default pool, which it cannot resize any more
out["threads_after_init"] = error(lambda: kr.configure_runtime(RunConfig(threads=3)))
print("PROBE" + json.dumps(out))
"""


def _env(**extra: str) -> dict[str, str]:
    """No TF_CPP_MIN_LOG_LEVEL: the Keras runs log as they do for a user, by default."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **extra}
    for name in ("KERAS_BACKEND", "TF_CPP_MIN_LOG_LEVEL", "FOLDSTACK_TF_CPP_MIN_LOG_LEVEL",
                 "FOLDSTACK_FRAMEWORK_LOGS"):
        env.pop(name, None)
    return env


# a C++ log line of TensorFlow (absl): "E0000 00:00:1796610671.275274   11355 cuda_platform..."
CPP_LOG_LINE = re.compile(r"^[IWE]\d{4} \d\d:\d\d:\d+\.\d+ ", re.M)


def _run_folds(forbidden: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``run_folds.py ARGS`` in a fresh interpreter that must not load ``forbidden`` modules;
    its stderr holds no C++ log line of the frameworks (hidden unless ``-v``)."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, forbidden, *args, "--progress", "false"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not CPP_LOG_LINE.search(proc.stderr), proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One TensorFlow subprocess answering the unit-level questions (names, preprocessing,
    callbacks, weights files); offline is simulated with an empty Keras cache and a dead proxy."""
    tmp = tmp_path_factory.mktemp("keras_probe")
    env = _env(KERAS_HOME=str(tmp / "keras_home"), HTTPS_PROXY="http://127.0.0.1:9",
               https_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9",
               http_proxy="http://127.0.0.1:9")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(tmp), APP], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE"))
    return {**json.loads(line[len("PROBE"):]), "stderr": proc.stderr}


def test_names_fail_with_closest(probe: dict) -> None:
    assert "MobileNetV3Small" in probe["unknown_app"]
    assert "EarlyStopping" in probe["unknown_callback"]
    assert "bogus" in probe["bad_kwargs"]
    assert "--schedule constant" in probe["plateau_with_cosine"]
    assert probe["early_stopping"] == ["EarlyStopping", 2, True]
    assert not probe["torch_loaded"]


def test_preprocessing_is_each_applications_own(probe: dict) -> None:
    pre = probe["preprocessing"]
    assert "mobilenet_v3.preprocess_input: identity" in pre["MobileNetV3Small"]
    assert "RGB->BGR" in pre["ResNet50"] and "resnet" in pre["ResNet50"]
    assert "(0.007843, 0.007843, 0.007843) + (-1.0, -1.0, -1.0)" in pre["InceptionV3"]
    assert "densenet.preprocess_input" in pre["DenseNet121"]
    mean, std = probe["resnet_mean_std"]  # caffe mode: BGR means, std 1/255 on the 0..1 scale
    assert mean[0] == pytest.approx(103.939 / 255, abs=1e-4)
    assert std[0] == pytest.approx(1 / 255)


def test_a_thread_count_tensorflow_cannot_apply_is_refused(probe: dict) -> None:
    """TensorFlow fixes its pool at its first op: a fold job on another --threads would run on
    the old count (another float sum order) while its run records the new one."""
    msg = probe["threads_after_init"]
    assert msg and "--threads 3" in msg and "its default threads" in msg


def test_weights_from_a_local_file_and_offline_imagenet(probe: dict) -> None:
    assert probe["local_weights_equal"]
    assert probe["bn_momentum"] == [0.9]
    assert "no such weights file" in probe["missing_file"]
    msg = probe["offline_imagenet"]
    assert msg and "--pretrained auto" in msg and "~/.keras/models" in msg


@pytest.mark.slow
def test_keras_run_stacks_with_a_timm_run(demo_subset: Path, tmp_path: Path, probe: dict) -> None:
    out = tmp_path / "runs"
    common = ["--data", str(demo_subset), "--out", str(out), "--folds", "3", "--epochs", "1"]
    _run_folds("tensorflow,keras", *common, "--backbone", "timm/resnet10t", "--img-size", "16")
    user_csv = tmp_path / "user_history.csv"
    config = tmp_path / "keras.yaml"
    config.write_text(
        "callbacks:\n"
        f"  - {{name: CSVLogger, filename: '{user_csv}'}}\n"
        "  - {name: EarlyStopping, monitor: val_loss, patience: 5}\n"
    )
    _run_folds("torch,timm", *common, "--backbone", f"keras/{APP}", "--img-size", "32",
               "--config", str(config), "--pretrained", probe["weights_path"], "--tta", "hflip",
               "--layer-decay", "1")  # one phase: the traced step is reused across folds
    root = out / demo_subset.name
    timm_run = load_run(root / "timm-resnet10t_16px")
    keras_run = load_run(root / f"keras-{APP}_32px")
    check_compatible([timm_run, keras_run])
    assert (keras_run.ids == timm_run.ids).all() and keras_run.fingerprint == timm_run.fingerprint
    assert keras_run.classes == timm_run.classes
    assert keras_run.oof.shape == timm_run.oof.shape and not pd.isna(keras_run.oof).any()
    meta = keras_run.meta
    assert meta["backbone"]["framework"] == "tensorflow"
    assert "preprocess_input" in meta["backbone"]["preprocessing"]
    assert meta["backbone"]["pretrained"] == probe["weights_path"]
    assert {"tensorflow", "keras"} <= set(meta["versions"])
    # callbacks wrote where they say: history, checkpoints with metadata, the user's CSVLogger
    hist_k = pd.read_csv(keras_run.path / "history.csv")
    hist_t = pd.read_csv(timm_run.path / "history.csv")
    assert set(hist_t.columns) <= set(hist_k.columns)
    assert sorted(hist_k["fold"]) == [0, 1, 2]
    for k in range(3):
        ckpt = keras_run.path / "checkpoints" / f"fold{k}.weights.h5"
        with h5py.File(ckpt, "r") as fh:
            assert json.loads(fh.attrs["foldstack"])["fold"] == k
            assert json.loads(fh.attrs["foldstack"])["predict_weights"] == "last"  # the default
        best = keras_run.path / "checkpoints" / f"fold{k}.best.weights.h5"
        with h5py.File(best, "r") as fh:  # ModelCheckpoint's best weights are in the run too
            assert json.loads(fh.attrs["foldstack"])["predict_weights"] == "best"
    assert len(pd.read_csv(user_csv)) == 1  # the last fold's single epoch
    assert not (keras_run.path / "work").exists()
    info = meta["fold_info"]
    assert [info[str(k)]["compiled_step_reused"] for k in range(3)] == [False, True, True]
    assert all(info[str(k)]["startup_seconds"] >= 0 for k in range(3))
    assert info["2"]["rss_mb"] < info["0"]["rss_mb"] + 300  # folds do not pile up


def _backup_epoch(backup: Path) -> int:
    """Epochs a BackupAndRestore folder holds (0: none yet, or caught mid-write)."""
    try:
        return int(json.loads((backup / "training_metadata.json").read_text())["epoch"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_disk_full_then_a_kill_with_a_damaged_backup_resume_as_if_never_stopped(
        demo_subset: Path, tmp_path: Path, probe: dict) -> None:
    """One pretrained (phased: head, then every layer with layer decay) fold taken through a full
    disk, then a kill -9 in its second phase with a damaged latest backup; the resumed fold ends
    exactly as an uninterrupted one. (Merged from tests/test_faults.py's Keras case: the TF
    processes are the cost, one sequence checks both.)"""
    args = [sys.executable, "run_folds.py", "--data", str(demo_subset), "--out",
            str(tmp_path), "--folds", "3", "--fold", "0", "--epochs", "8", "--backbone",
            f"keras/{APP}", "--img-size", "32", "--progress", "false", "--batch-size", "32",
            "--pretrained", probe["weights_path"], "--head-epochs", "1"]
    history = tmp_path / demo_subset.name / f"keras-{APP}_32px" / "parts" / "fold0_history.csv"
    part = history.parent / "fold0.json"
    # 1. Keras hits the size limit in an HDF5 weights write (the image cache fits under 1 MB,
    #    the weights do not): one clear message naming the file, exit code 2, no SIGSEGV from
    #    h5py's finalizer after the failed write (oof.cli.main_guard)
    full = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=_limit_file_size(1_000_000))
    assert "error: no space left on device while writing" in full.stderr, full.stderr[-3000:]
    assert ".weights.h5" in full.stderr.split("error: no space left")[-1], full.stderr[-3000:]
    assert full.returncode == 2, full.returncode
    assert not part.exists()
    # 2. the rerun is killed -9 in the full phase
    backup = history.parent.parent / "work" / "fold0" / "backup" / "full"
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if _backup_epoch(backup) >= 3:
                break  # three epochs backed up (the head's and two of the full phase): the
                # fold template writes an epoch's history row before BackupAndRestore's backup
            time.sleep(0.2)
        assert proc.poll() is None, "fold finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not part.exists()
    # a kill while BackupAndRestore wrote would leave a truncated latest backup: plant one
    backed_up = json.loads((backup / "training_metadata.json").read_text())["epoch"]
    weights = backup / "latest.weights.h5"
    weights.write_bytes(weights.read_bytes()[:96])
    # 3. resumed from the previous backup: each epoch's history row once
    done = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "is damaged (killed while writing it): resuming from the previous backup" in done.stderr
    info = json.loads(part.read_text())
    assert info["resumed_from_epoch"] == backed_up - 1 >= 2
    assert [p["name"] for p in info["phases"]] == ["head", "full"]
    assert info["epochs_this_session"] == 8 - info["resumed_from_epoch"]
    epochs = pd.read_csv(history)["epoch"].tolist()
    assert epochs == list(range(8))
    oof = pd.read_parquet(history.parent / "fold0_oof.parquet")
    proba = oof.drop(columns="id").to_numpy()  # a part: id, then one column per class
    assert proba.shape == (len(oof), 10)
    assert np.isfinite(proba).all() and np.allclose(proba.sum(axis=1), 1, atol=1e-4)
    # 4. the resumed fold replays the batches and augmentations an uninterrupted one draws
    straight = tmp_path / "straight"
    args[args.index("--out") + 1] = str(straight)
    done = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for name in ("fold0_oof.parquet", "fold0_test.parquet"):
        resumed = pd.read_parquet(part.parent / name)
        uninterrupted = pd.read_parquet(straight / demo_subset.name / f"keras-{APP}_32px"
                                        / "parts" / name)
        pd.testing.assert_frame_equal(resumed, uninterrupted, check_exact=True)


@pytest.mark.slow
def test_short_run_predicts_held_out_rows_far_above_chance(demo_dir: Path, tmp_path: Path) -> None:
    """Two epochs on the digits: held-out rows must not collapse to the class prior.

    Before precise BatchNorm (``recalibrate_batchnorm``) this run scored OOF accuracy 0.10 with
    val_loss ~ ln 10 while training accuracy reached 0.7: the moving variances still held their
    initial 1.0 where MobileNetV3's depthwise activations have variance ~1e-4.
    """
    _run_folds("torch,timm", "--data", str(demo_dir), "--out", str(tmp_path), "--folds", "3",
               "--epochs", "2", "--backbone", f"keras/{APP}", "--img-size", "32")
    run = load_run(tmp_path / demo_dir.name / f"keras-{APP}_32px")
    assert run.scores()["accuracy"] > 0.6, run.scores()
    assert run.scores()["log_loss"] < 1.5, run.scores()
    assert all(run.meta["fold_info"][str(k)]["bn_recalibrated_layers"] > 30 for k in range(3))


def test_a_students_targets_are_smoothed_once(probe: dict) -> None:
    """Keras side of oof.distill: with the loss's smoothing off, alpha 1 gives the hard-label
    loss bit for bit, alpha 0.5 the loss of the smoothed one-hot mixed with the teacher's row;
    smoothing again (the old behaviour) would move it."""
    got = probe["student_smoothing"]
    assert got["alpha1_same"]
    assert got["alpha05_gap"] < 1e-5
    assert got["smoothed_again_gap"] > 1e-3


def test_every_optimizer_name_is_a_keras_optimizer(probe: dict) -> None:
    assert probe["optimizers"] == {
        "adamw": "AdamW", "sgd": "SGD", "adam": "Adam", "nadam": "Nadam", "rmsprop": "RMSprop",
        "lamb": "Lamb", "lion": "Lion", "adamax": "Adamax"}


def test_bad_fine_tuning_phase_keys_are_refused_before_any_work(probe: dict) -> None:
    assert "--head-epochs 5: more than --epochs 2" in probe["phase_keys"]


def test_an_epoch_that_is_not_a_multiple_of_steps_per_execution_trains_every_batch(
        probe: dict) -> None:
    """4 steps per call on a 6-step epoch: the second call runs 2 steps, each batch of each
    epoch is loaded and trained once, and the progress line counts 6/6, not 8/6."""
    assert probe["steps_per_execution"] == [1, 3, 4, 4, 4]
    run = probe["short_last_call"]
    assert (run["steps"], run["per_call"], run["iterations"]) == (6, 4, 12)
    assert sorted(run["loaded"]) == [[e, b] for e in range(2) for b in range(6)]
    assert run["shown"].count("6/6") == 2 and "8/6" not in run["shown"]


def test_head_options_build_the_keras_head(probe: dict) -> None:
    assert probe["head_shape"] == [2, 7]
    assert probe["head_layers"] == ["pool_avg", "pool_max", "pool", "head_dropout", "head_hidden",
                                    "head_bn", "head_act", "head_hidden_dropout", "logits",
                                    "proba"][-8:]
    assert probe["head_rates"] == [0.3]


def test_ema_option_is_keras_optimizer_ema(probe: dict) -> None:
    assert probe["ema"] == [True, 0.99]


def test_keras_batches_mix_as_timm_does(probe: dict) -> None:
    """The same numpy mix_batch, seeded by (seed, epoch, batch), feeds the Keras pipeline."""
    assert probe["mixing"]["same"] and probe["mixing"]["soft"]
    assert probe["mixing"]["sums"] == [1.0] * 8


def test_fit_starts_at_its_initial_epoch_after_a_restored_fold(probe: dict) -> None:
    """Pins the private ``Model._initial_epoch`` that ``kc.forget_restored_epoch`` writes: if
    Keras stops setting it on a restore, or stops preferring it to ``initial_epoch``, this
    fails and the reset in ``train_fold`` must change with it."""
    assert probe["restored_epoch"] == {"resumed": [3, 4], "attribute": 3, "stale": [],
                                       "forgotten": [0, 1]}


def test_framework_logs_hidden_by_default(probe: dict) -> None:
    """The probe (TensorFlow imported, models fitted through tf.data, run as a user runs it)
    writes no C++ log line; lines the libraries write while loading are dropped but for a
    fatal one, and anything else written then is kept."""
    err = probe["stderr"]
    assert not CPP_LOG_LINE.search(err), err[-4000:]
    assert "absl::InitializeLog" not in err
    assert "PLANTED fatal" in err and "PLANTED plain" in err
    assert probe["log_levels"] == {"at_import": ["3", "3"], "verbose": [0, "0"],
                                   "user": [1, "1"]}


def test_verbose_shows_framework_logs(demo_subset: Path, tmp_path: Path) -> None:
    """``-v`` lets TensorFlow's own log lines through (the same command without it is checked
    quiet by every run of ``_run_folds``): a spec resolved for --write-augment imports TensorFlow
    and probes the preprocessing on its device."""
    proc = subprocess.run(
        [sys.executable, "run_folds.py", "-v", "--backbone", f"keras/{APP}", "--img-size", "32",
         "--data", str(demo_subset), "--out", str(tmp_path), "--write-augment",
         str(tmp_path / "augment.yaml")], cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert CPP_LOG_LINE.search(proc.stderr), proc.stderr[-4000:]
    assert (tmp_path / "augment.yaml").is_file()
