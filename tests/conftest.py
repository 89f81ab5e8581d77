"""Shared fixtures: real image files on disk in the competition layout, built from the demo."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

import backbones  # noqa: F401  (before any test imports timm: no GPU, no triton; see there)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: each worker, and every run_folds.py or
    # serve.py it starts, computes on one thread, so two workers never fight over two cores
    # (torch and TensorFlow size their pools from these before their first op).
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                 "TF_NUM_INTRAOP_THREADS"):
        os.environ.setdefault(_var, "1")

# Roughly the seconds each heavy module takes in an idle `make test` (2 workers). `make test`
# hands whole modules to the workers (--dist loadscope) in collection order
# (--no-loadscope-reorder), and this order puts the longest first, so the last modules to
# start are short ones. xdist's own order (most tests first) left the Ray modules, 4 and 2
# tests but ~8 minutes, to run last on one worker while the other idled. A module not listed
# counts as 0 (after these, in file order): list a new one that trains for more than ~30 s.
MODULE_SECONDS = {
    "test_ray_executor.py": 240, "test_serve.py": 330, "test_keras_backend.py": 300,
    "test_run_folds.py": 250, "test_faults.py": 135, "test_ray_local.py": 60,
    "test_progressive.py": 80, "test_recipe.py": 90, "test_tracking.py": 60,
    "test_shape_properties_training.py": 70, "test_stackers.py": 60, "test_stack.py": 60,
    "test_lr_find.py": 60, "test_pseudo_wiring.py": 55, "test_backbone_contract.py": 150,
    "test_shape_properties_data.py": 40, "test_refit_distill.py": 60, "test_probe.py": 50,
    "test_keras_family.py": 100, "test_serve_variants.py": 150,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest modules first (a stable sort: tests keep their order within a module)."""
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, 0))


@pytest.fixture(scope="session", autouse=True)
def foldstack_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep generated data (the demo) out of the user's home during tests."""
    cache = tmp_path_factory.mktemp("foldstack_cache")
    os.environ["FOLDSTACK_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def demo_dir(foldstack_cache: Path) -> Path:
    from oof.demo import ensure_demo

    return ensure_demo()


def write_demo_subset(demo: Path, dest: Path, per_class: int, n_test: int) -> Path:
    """Copy ``per_class`` train images of each class and ``n_test`` test images of the demo."""
    train = pd.read_csv(demo / "train.csv", dtype=str)
    sub = train.groupby("Category", group_keys=False).head(per_class).reset_index(drop=True)
    for image_id, cat in zip(sub["Id"], sub["Category"]):
        (dest / "train" / cat).mkdir(parents=True, exist_ok=True)
        shutil.copy(demo / "train" / cat / image_id, dest / "train" / cat / image_id)
    sub.to_csv(dest / "train.csv", index=False)
    sample = pd.read_csv(demo / "sample-submission.csv", dtype=str).head(n_test)
    (dest / "test_upload").mkdir(parents=True, exist_ok=True)
    for image_id in sample["Id"]:
        shutil.copy(demo / "test_upload" / image_id, dest / "test_upload" / image_id)
    sample.to_csv(dest / "sample-submission.csv", index=False)
    labels = pd.read_csv(demo / "test_labels.csv", dtype=str).head(n_test)
    labels.to_csv(dest / "test_labels.csv", index=False)
    return dest


@pytest.fixture(scope="session")
def demo_subset(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small competition-layout dataset (30 images per class, 40 test) of real PNG scans.

    Session-scoped and shared: tests must not modify it (copy it with ``copy_dataset``).
    """
    return write_demo_subset(demo_dir, tmp_path_factory.mktemp("demo_subset"), 30, 40)


@pytest.fixture
def copy_dataset(tmp_path: Path):
    """Return a function copying a dataset folder into this test's tmp dir, for mutation."""
    def _copy(src: Path, name: str = "data") -> Path:
        dest = tmp_path / name
        shutil.copytree(src, dest)
        return dest

    return _copy
