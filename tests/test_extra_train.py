"""External training data (issue 13): ``--extra-train PATH`` joins every fold's training side,
never a held-out one, with class names checked or mapped, and is recorded in the run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from oof.config import RunConfig, parse_config
from oof.errors import ConfigError, DataError
from tests.test_run_folds import FAST, run_script


def _extra_imagefolder(demo: Path, dest: Path, per_class: int, prefix: str = "") -> Path:
    """An imagefolder of demo images the demo subset does not hold (the last of each class)."""
    train = pd.read_csv(demo / "train.csv", dtype=str)
    for cat, rows in train.groupby("Category"):
        (dest / "train" / f"{prefix}{cat}").mkdir(parents=True, exist_ok=True)
        for image_id in rows["Id"].tail(per_class):
            shutil.copy(demo / "train" / cat / image_id, dest / "train" / f"{prefix}{cat}" /
                        image_id)
    return dest


def _run(argv: list[str]) -> None:
    from runner.run import run_folds

    run_folds(parse_config(RunConfig, argv, "run_folds.py", ""))


def test_unknown_classes_and_bad_images_are_refused_before_anything_is_written(
        demo_dir: Path, demo_subset: Path, tmp_path: Path) -> None:
    extra = _extra_imagefolder(demo_dir, tmp_path / "extra", 2, prefix="digit")
    out = tmp_path / "runs"
    base = ["--data", str(demo_subset), "--out", str(out), "--img-size", "16", "--extra-train",
            str(extra)]
    with pytest.raises(ConfigError, match=r"classes \['digit0', .*'digit9'\] are not among"):
        _run(base)
    with pytest.raises(ConfigError, match="--extra-train-classes digit0: 'digit0' is not"):
        _run([*base, "--extra-train-classes", "digit0"])
    (extra / "train" / "digit3" / "broken.png").write_bytes(b"not a png")
    mapping = ",".join(f"digit{i}={i}" for i in range(10))
    with pytest.raises(DataError, match=r"(?s)--extra-train .*broken\.png"):
        _run([*base, "--extra-train-classes", mapping])
    assert not (out / demo_subset.name / "timm-resnet10t_16px").exists()


@pytest.mark.slow
def test_extra_images_join_every_training_side_only(demo_dir: Path, demo_subset: Path,
                                                    tmp_path: Path) -> None:
    extra = _extra_imagefolder(demo_dir, tmp_path / "extra", 2, prefix="digit")
    mapping = ",".join(f"digit{i}={i}" for i in range(10))
    out = tmp_path / "runs"
    proc = run_script(["--data", str(demo_subset), "--out", str(out), *FAST, "--extra-train",
                       str(extra), "--extra-train-classes", mapping], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((out / demo_subset.name / "timm-resnet10t_16px" / "meta.json").read_text())
    assert meta["extra_train"]["n"] == 20 and meta["extra_train"]["per_class"]["7"] == 2
    assert meta["extra_train"]["mapping"]["digit7"] == "7"
    for k in range(3):
        info = meta["fold_info"][str(k)]
        assert info["n_train"] == 200 + 20 and info["n_val"] == 100
    oof = pd.read_parquet(out / demo_subset.name / "timm-resnet10t_16px" / "oof.parquet")
    assert len(oof) == 300  # the extra images are never scored
