"""Progressive resizing (issue 9): ``--img-size 16,24`` trains at each size in turn, the last
size predicts, the cache serves every size, and a bad size plan is refused before any work."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from oof.config import RunConfig
from oof.errors import ConfigError
from recipe import plan_phases, plan_segments, plan_sizes, size_of
from tests.test_run_folds import assert_user_error, run_script
from tests.test_tracking import _scalars


def test_size_plan_splits_epochs_and_cuts_phases() -> None:
    cfg = RunConfig(img_size=[96, 128, 160], epochs=7)
    stages = plan_sizes(cfg, 160)
    assert [(s.first_epoch, s.epochs, s.size) for s in stages] == [(0, 2, 96), (2, 2, 128),
                                                                    (4, 3, 160)]
    assert [size_of(stages, e) for e in range(7)] == [96, 96, 128, 128, 160, 160, 160]
    cfg = RunConfig(img_size="96,160", img_size_epochs=[1, 3], epochs=4, pretrained="w.pth")
    segs = plan_segments(plan_phases(cfg), plan_sizes(cfg, 160))
    # the head epoch at 96 px, then the full phase at 160
    assert [(s.name, s.first_epoch, s.epochs, s.size) for s in segs] == [
        ("head@96", 0, 1, 96), ("full@160", 1, 3, 160)]
    one = plan_segments(plan_phases(RunConfig(epochs=3)), plan_sizes(RunConfig(epochs=3), 32))
    assert [(s.name, s.epochs, s.size) for s in one] == [("full", 3, 32)]  # names as before


def test_pretrained_head_phase_and_sizes_interleave() -> None:
    cfg = RunConfig(img_size=[64, 96], epochs=4, pretrained="w.pth")  # head 1 epoch, sizes 2+2
    segs = plan_segments(plan_phases(cfg), plan_sizes(cfg, 96))
    assert [(s.name, s.first_epoch, s.epochs, s.size) for s in segs] == [
        ("head@64", 0, 1, 64), ("full@64", 1, 1, 64), ("full@96", 2, 2, 96)]


@pytest.mark.parametrize("cfg, words", [
    (dict(img_size=[16, 24, 32], epochs=2), "3 sizes need at least 3 --epochs"),
    (dict(img_size=[16, 24], epochs=4, img_size_epochs=[1, 2]), "summing to --epochs 4"),
    (dict(img_size=[16, 24], epochs=3, img_size_epochs=[3]), "one count per --img-size"),
    (dict(img_size=24, epochs=3, img_size_epochs=[1, 2]), "needs several --img-size values"),
])
def test_bad_size_plans_are_refused(cfg: dict, words: str) -> None:
    with pytest.raises(ConfigError, match="--img-size") as err:
        plan_sizes(RunConfig(**cfg), 24)
    assert words in str(err.value)


def _progressive_run(backbone: str, sizes: str, data: Path, out: Path, *extra: str) -> Path:
    """One fold of two (what each fold does is the same; a second costs a Keras build and two
    traces more) at each size of ``sizes`` in turn; returns the run's folder."""
    proc = run_script(["--data", str(data), "--out", str(out), "--backbone", backbone,
                       "--img-size", sizes, "--epochs", "2", "--folds", "2", "--fold", "0",
                       "--progress", "false", "--batch-size", "32", *extra], out.parent,
                      timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    family, _, model = backbone.partition("/")
    return out / data.name / f"{family}-{model}_{sizes.split(',')[-1]}px"


@pytest.fixture(scope="module")
def keras_run(demo_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Keras progressive run, logged to TensorBoard too: a TensorFlow process (import, build,
    a trace per size) costs more than the checks that read it, so they share it."""
    out = tmp_path_factory.mktemp("keras_progressive") / "runs"
    return _progressive_run("keras/MobileNetV3Small", "32,40", demo_subset, out, "--tensorboard")


@pytest.mark.slow
@pytest.mark.parametrize("backbone, sizes", [("timm/resnet10t", "16,24"),
                                             ("keras/MobileNetV3Small", "32,40")])
def test_progressive_resizing_trains_at_each_size(backbone: str, sizes: str, demo_subset: Path,
                                                  tmp_path: Path,
                                                  request: pytest.FixtureRequest) -> None:
    """An epoch at each size, the held-out rows predicted at the last."""
    first, last = (int(s) for s in sizes.split(","))
    if backbone.startswith("keras/"):
        run_dir = request.getfixturevalue("keras_run")
    else:
        run_dir = _progressive_run(backbone, sizes, demo_subset, tmp_path / "runs")
    parts = run_dir / "parts"
    history = pd.read_csv(parts / "fold0_history.csv")
    assert history.sort_values("epoch")["img_size"].tolist() == [first, last]
    cached = sorted(p.name.split("_")[1] for p in (run_dir.parent / "cache").glob("*.npy"))
    assert f"{first}px" in cached and f"{last}px" in cached
    oof = pd.read_parquet(parts / "fold0_oof.parquet")
    assert len(oof) == 150  # every held-out row of the fold, predicted at the last size
    acc = json.loads((parts / "fold0.json").read_text())["accuracy"]
    # it learned, across the size change: chance is 0.1 (15 +- 4 right of 150 rows); two
    # epochs from scratch land at 0.27-0.34 on all 300 rows depending on the augmentation's draws
    assert acc > 0.2, acc


@pytest.mark.slow
def test_keras_tensorboard(keras_run: Path) -> None:
    """Keras' own TensorBoard writer logs each epoch of fold 0 (moved from tests/test_tracking.py
    onto the progressive run: its two sizes are two fits, their epochs one board)."""
    board = _scalars(keras_run / "tensorboard" / "fold0")
    for tag in ("train/epoch_loss", "train/epoch_accuracy", "train/epoch_lr",
                "train/epoch_images_per_second", "validation/epoch_loss",
                "validation/epoch_accuracy"):
        assert len(board[tag]) == 2, (tag, sorted(board))


def test_bad_size_plan_is_refused_before_anything_is_written(demo_subset: Path,
                                                             tmp_path: Path) -> None:
    out = tmp_path / "runs"
    proc = run_script(["--data", str(demo_subset), "--out", str(out), "--img-size", "16,24",
                       "--epochs", "3", "--img-size-epochs", "1", "1"], tmp_path)
    assert_user_error(proc, "--img-size-epochs [1, 1]: one count per --img-size")
    assert not out.exists()
