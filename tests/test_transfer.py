"""Real pretrained weights and real dev data (issue 9): converter, builders, probe, fine-tuning."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from oof.datasets import load_dataset
from oof.folds import make_folds
from tests.fixtures_transfer import fashion_dir, lite0_weights, photos_dir  # noqa: F401


def test_converter_maps_every_tensor_onto_timm(lite0_weights):  # noqa: F811
    import timm
    import torch

    from bench.convert_lite0 import convert, source_weights

    state, pairs = convert(source_weights())
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert len(pairs) == len(model.state_dict()) == 296
    model.load_state_dict(state, strict=True)  # every key, every shape
    assert pairs[0] == "_conv_stem.weight -> conv_stem.weight"
    saved = torch.load(lite0_weights, map_location="cpu", weights_only=True)
    assert all(torch.equal(saved[k], v) for k, v in state.items())


def test_photo_dev_set_is_valid_imagefolder(photos_dir):  # noqa: F811
    ds = load_dataset(photos_dir)
    assert ds.layout == "imagefolder" and len(ds.classes) == 8
    counts = ds.train["label"].value_counts()
    assert counts.min() >= 20 and 200 <= len(ds.train) <= 320, counts
    assert len(ds.test) == 24
    with Image.open(ds.train["path"].iloc[0]) as im:
        arr = np.asarray(im.convert("RGB"), np.float32)
    assert arr.shape[0] > 100 and arr.std(axis=2).mean() > 5  # real colour, not grey


def test_fashion_dev_set_is_valid_imagefolder(fashion_dir):  # noqa: F811
    ds = load_dataset(fashion_dir)
    assert len(ds.classes) == 10 and len(ds.train) == 2500 and len(ds.test) == 100
    assert set(ds.train["label"].value_counts()) == {250}
    with Image.open(ds.train["path"].iloc[0]) as im:
        assert im.size == (28, 28)


def test_converted_weights_give_a_strong_linear_probe(lite0_weights, photos_dir, tmp_path):  # noqa: F811
    """Right conversion -> frozen features separate 8 food groups far above chance and far above
    the same network with random weights (a wrong mapping would sit near the random one)."""
    import timm
    import torch

    from bench.transfer import extract_features, linear_probe

    train = load_dataset(photos_dir).train
    folds = make_folds(list(train["id"]), list(train["label"]), 3, 42)
    labels = train["label"].to_numpy()
    real = linear_probe(extract_features(list(train["path"]), lite0_weights, 96), labels,
                        folds.fold)
    torch.manual_seed(0)
    random_file = tmp_path / "random.pth"
    torch.save(timm.create_model("tf_efficientnet_lite0").state_dict(), random_file)
    rand = linear_probe(extract_features(list(train["path"]), random_file, 96), labels,
                        folds.fold)
    chance = train["label"].value_counts(normalize=True).max()
    assert real["accuracy"] > 0.6 and real["accuracy"] > chance + 0.4, (real, chance)
    assert real["accuracy"] > rand["accuracy"] + 0.2, (real, rand)
    assert real["log_loss"] < rand["log_loss"] - 0.3, (real, rand)


@pytest.mark.slow
def test_fine_tuning_real_weights_beats_chance_on_held_out_photos(lite0_weights, photos_dir,  # noqa: F811
                                                                  tmp_path):
    """End to end through run_folds: 4 food groups, 2 folds, 1 epoch at 96 px."""
    import shutil

    from oof.config import RunConfig, parse_config
    from runner.run import run_folds

    data = tmp_path / "photos4"
    for name in ("fruits", "meat", "leafy_veg", "marine_fish"):
        shutil.copytree(photos_dir / "train" / name, data / "train" / name)
    shutil.copytree(photos_dir / "test", data / "test")
    argv = ["--data", str(data), "--out", str(tmp_path / "runs"), "--backbone",
            "timm/tf_efficientnet_lite0", "--pretrained", str(lite0_weights), "--img-size", "96",
            "--folds", "2", "--epochs", "2", "--batch-size", "16"]
    summary = run_folds(parse_config(RunConfig, argv, "run_folds.py", ""))
    assert summary.complete
    assert summary.oof_scores["accuracy"] > 0.6, summary.oof_scores  # chance is 0.25
    # log loss is not asserted: after 2 epochs at the default LR it is ~1.37 (near ln 4), the
    # miscalibration issue 9 is about; bench/transfer.py measures it.
