"""Shape properties of the data side (issue #28): awkward shapes of a data set and of a run.

Each case runs the real function on real files: fold assignment over N, K and class counts (a
class smaller than K, one class, 2 classes, near-duplicate groups); the image cache with N = 1 or
chunk + 1 modulo its chunk size, and a build interrupted at any image; decoding a mix of
grayscale, RGBA, 16-bit, palette and CMYK files smaller than the model's stride; level-2 stackers
with N = 1 modulo their row block and one test row; and one tiny ``run_folds.py`` + stack run.
Every case either completes with sane output or is refused with a message naming the cause, and
a refusal or an interruption leaves nothing on disk that looks finished.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

import ensemble.stackers as stackers
import oof.images as images
from ensemble.evaluate import cross_val_level2, full_proba
from ensemble.stack import METHODS, StackConfig, stack_runs, stacker_params
from oof.errors import ConfigError, DataError, RunMismatchError
from oof.folds import FOLDS_FILE, FOLDS_META, ensure_folds, load_folds, make_folds

REPO = Path(__file__).resolve().parents[1]
FAST = settings(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per module; each hypothesis example makes its own folder inside it."""
    return tmp_path_factory.mktemp("shapes")


def _fresh(scratch: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=scratch))


# --------------------------------------------------------------------------- fold assignment
@st.composite
def fold_cases(draw: st.DrawFn) -> tuple[list[str], int, int, list[int] | None]:
    """Labels of 1 to 4 classes (2 most often), K, seed and, for half the cases, near-duplicate
    groups; a 'small' case has a class of 1 to K-1 images."""
    kind = draw(st.sampled_from(["plain", "grouped", "small", "single"]))
    k = draw(st.integers(2, 5))
    n_classes = 1 if kind == "single" else draw(st.integers(2, 4))
    sizes = draw(st.lists(st.integers(k, 12), min_size=n_classes, max_size=n_classes))
    if kind == "small":
        sizes[draw(st.integers(0, n_classes - 1))] = draw(st.integers(1, k - 1))
    labels = [f"class{c}" for c, n in enumerate(sizes) for _ in range(n)]
    groups = None
    if kind == "grouped" or (kind != "plain" and draw(st.booleans())):
        if draw(st.booleans()):  # like near-duplicates: groups inside a class, some classes few
            groups = []
            for n in sizes:
                n_groups = draw(st.integers(1, n))
                groups += [len(set(groups)) + i % n_groups for i in range(n)]
        else:  # across classes; few groups can leave a fold empty
            few = min(len(labels), k + 2)
            n_groups = draw(st.integers(1, few) | st.integers(few, len(labels)))
            groups = draw(st.lists(st.integers(0, n_groups - 1), min_size=len(labels),
                                   max_size=len(labels)))
    order = draw(st.permutations(range(len(labels))))
    return ([labels[i] for i in order], k, draw(st.integers(0, 2**16)),
            None if groups is None else [groups[i] for i in order])


def _sklearn_folds(labels: list[str], k: int, seed: int, groups: list[int]) -> np.ndarray:
    """What StratifiedGroupKFold itself makes of the case: the oracle for grouped refusals."""
    from sklearn.model_selection import StratifiedGroupKFold

    fold = np.full(len(labels), -1)
    split = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(
        np.zeros(len(labels)), labels, groups)
    for f, (_, held) in enumerate(split):
        fold[held] = f
    return fold


EMPTY_FOLD = (["class0"] * 5 + ["class1"] * 6 + ["class2"] * 6, 5, 555,  # 5 groups, 4 folds used
              [3, 4, 1, 4, 4, 0, 3, 4, 3, 1, 3, 3, 3, 1, 0, 2, 1])
ONE_FOLD_CLASS = (["a"] * 4 + ["b"] * 4, 2, 0, [0, 0, 0, 0, 1, 2, 3, 4])  # 'a': one group


@settings(FAST, max_examples=60)
@given(fold_cases())
@example(EMPTY_FOLD)
@example(ONE_FOLD_CLASS)
def test_folds_are_valid_or_refused_naming_the_class(
        scratch: Path, case: tuple[list[str], int, int, list[int] | None]) -> None:
    """Every row in exactly one of K non-empty folds, every class in at least 2 folds (so each
    fold model and each level-2 fit sees every class), stratified without groups; or a
    DataError naming the class (one class only; fewer images than K; all in one fold under
    grouping) and no folds.csv / folds.json written."""
    labels, k, seed, groups = case
    ids = [f"img{i}.png" for i in range(len(labels))]
    root = _fresh(scratch)
    counts = pd.Series(labels).value_counts()
    small = {c: int(n) for c, n in counts.items() if n < k}
    call = lambda: ensure_folds(  # noqa: E731 - the one call under test, made in two places
        root, ids, labels, k, seed, "phash" if groups is not None else None,
        make_groups=lambda: np.asarray(groups))
    expected_refusal: list[str] = []
    if len(counts) == 1:
        expected_refusal = ["one class", repr(labels[0])]
    elif small:
        expected_refusal = [f"{c!r} has {n}" for c, n in small.items()]
    elif groups is not None:
        if len(set(groups)) < k:
            expected_refusal = [f"only {len(set(groups))} near-duplicate groups"]
        else:
            fold = _sklearn_folds(labels, k, seed, groups)
            empty = sorted(set(range(k)) - set(fold.tolist()))
            lab = np.asarray(labels)
            lonely = [c for c in counts.index if len(set(fold[lab == c].tolist())) < 2]
            if empty:
                expected_refusal = [f"fold(s) {empty}", "empty"]
            elif lonely:
                expected_refusal = ["in one fold", *(repr(c) for c in lonely)]
    if expected_refusal:
        with pytest.raises(DataError) as err:
            call()
        for needle in expected_refusal:
            assert needle in str(err.value), str(err.value)
        assert not (root / FOLDS_FILE).exists() and not (root / FOLDS_META).exists()
        return
    folds = call()
    assert list(folds.ids) == ids and folds.fold.min() == 0 and folds.fold.max() == k - 1
    assert sorted(np.concatenate([folds.split(f)[1] for f in range(k)]).tolist()) == list(
        range(len(ids)))  # every row held out exactly once
    assert all(len(folds.split(f)[1]) for f in range(k))  # no empty fold
    lab = np.asarray(labels)
    for c in counts.index:
        per_fold = np.bincount(folds.fold[lab == c], minlength=k)
        assert (per_fold > 0).sum() >= 2  # a fold model and a level-2 fit see the class
        if groups is None:
            assert per_fold.max() - per_fold.min() <= 1  # stratified
    if groups is not None:  # a group never straddles two folds
        g = np.asarray(groups)
        assert all(len(set(folds.fold[g == v].tolist())) == 1 for v in set(groups))
    again = load_folds(root)
    assert again is not None and again.fingerprint == folds.fingerprint


def test_too_few_folds_is_a_config_error_before_class_sizes(scratch: Path) -> None:
    with pytest.raises(ConfigError, match="--folds 1"):
        ensure_folds(_fresh(scratch), ["a", "b"], ["x", "x"], 1, 0)


# --------------------------------------------------------------------------- image files
FILL = (200, 40, 90)
WHITE = (255, 255, 255)
# kind -> (suffix, expected RGB after decoding, tolerance); the picture is one colour, so every
# pixel of a squashed or cropped decode, and every non-black pixel of a padded one, must be it
KINDS: dict[str, tuple[str, tuple[int, int, int], int]] = {
    "RGB-jpeg": (".jpg", FILL, 12),
    "CMYK-jpeg": (".jpg", (255, 0, 0), 12),
    "L-jpeg": (".jpeg", (200, 200, 200), 3),
    "L": (".png", (200, 200, 200), 0),
    "1": (".png", WHITE, 0),
    "RGBA": (".png", FILL, 0),
    "RGBA-clear": (".png", WHITE, 0),
    "LA": (".png", (227, 227, 227), 1),  # 200 at alpha 128 over white
    "P": (".png", FILL, 0),
    "P-transparent": (".png", WHITE, 0),
    "P-gif": (".gif", FILL, 0),
    "I;16": (".png", (200, 200, 200), 0),  # 51400 = 200 * 257
    "I;16-dark": (".png", (0, 0, 0), 0),  # 200 of 65535
    "I;16-tiff": (".tif", (200, 200, 200), 0),
    "PGM-16-dark": (".ppm", (0, 0, 0), 0),  # 200 of 65535: Pillow opens it as mode I
    "PGM-16": (".ppm", (200, 200, 200), 0),
    "RGB-webp": (".webp", FILL, 0),
    "truncated": (".png", FILL, 0),  # refused, named
}


def write_kind(path: Path, kind: str, w: int, h: int) -> Path:
    """A ``w`` x ``h`` one-colour image of ``kind``, written by Pillow in that mode."""
    size = (w, h)
    if kind == "CMYK-jpeg":
        img = Image.new("CMYK", size, (0, 255, 255, 0))
    elif kind in ("L", "L-jpeg"):
        img = Image.new("L", size, 200)
    elif kind == "1":
        img = Image.new("1", size, 1)
    elif kind in ("RGBA", "RGBA-clear"):
        img = Image.new("RGBA", size, (*FILL, 255 if kind == "RGBA" else 0))
    elif kind == "LA":
        img = Image.new("LA", size, (200, 128))
    elif kind in ("P", "P-gif"):
        img = Image.new("RGB", size, FILL).convert("P", palette=Image.Palette.ADAPTIVE)
    elif kind == "P-transparent":
        img = Image.new("P", size, 0)
        img.putpalette([*FILL, 0, 0, 0])
        img.info["transparency"] = 0
    elif kind in ("I;16", "I;16-tiff", "PGM-16"):
        img = Image.fromarray(np.full((h, w), 51400, dtype=np.uint16))
    elif kind in ("I;16-dark", "PGM-16-dark"):
        img = Image.fromarray(np.full((h, w), 200, dtype=np.uint16))
    else:
        img = Image.new("RGB", size, FILL)
    kw = {"lossless": True} if kind == "RGB-webp" else {"quality": 95} if "jpeg" in kind else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)
    if kind == "truncated":
        path.write_bytes(path.read_bytes()[:30])
    return path


SIDES = st.one_of(st.integers(1, 6), st.integers(7, 40))  # mostly below a 16-32 px stride
image_specs = st.lists(st.tuples(st.sampled_from(sorted(KINDS)), SIDES, SIDES), min_size=1,
                       max_size=6)


@settings(FAST, max_examples=40)
@given(specs=image_specs, size=st.sampled_from([16, 32]),
       resize=st.sampled_from(images.RESIZE_POLICIES))
def test_mixed_modes_and_tiny_images_decode_to_the_same_rgb(
        scratch: Path, specs: list[tuple[str, int, int]], size: int, resize: str) -> None:
    """Grayscale, 1-bit, RGBA, LA, palette (with and without transparency), 16-bit PNG / TIFF /
    PGM, CMYK JPEG and WebP, 1 to 40 px on a side, in one set: each becomes the size x size x 3
    uint8 picture of its colour, the same on every read; a damaged file is refused by name."""
    folder = _fresh(scratch)
    paths = [str(write_kind(folder / f"{i}{KINDS[kind][0]}", kind, w, h))
             for i, (kind, w, h) in enumerate(specs)]
    bad = [p for p, (kind, _, _) in zip(paths, specs) if kind == "truncated"]
    if bad:
        with pytest.raises(DataError) as err:
            images.decode_images(paths, size, resize=resize)
        message = str(err.value)
        assert message.startswith(f"{len(bad)} image(s) could not be read")
        assert all(p in message for p in bad)
        assert not any(p in message for p in set(paths) - set(bad))
        return
    batch = images.decode_images(paths, size, resize=resize)
    assert batch.shape == (len(paths), size, size, 3) and batch.dtype == np.uint8
    for path, (kind, w, h), got in zip(paths, specs, batch):
        one = images.read_rgb(path, size, resize)
        np.testing.assert_array_equal(one, got)  # the thread pool changes nothing
        np.testing.assert_array_equal(images.read_rgb(path, size, resize), one)
        _, want, tol = KINDS[kind]
        diff = np.abs(one.astype(int) - np.asarray(want)).max(axis=2)
        if resize == "pad":  # the picture, centred, on black bars
            black = one.max(axis=2) == 0
            assert (diff[~black] <= tol).all() and (~black).any() or want == (0, 0, 0), (
                kind, w, h)
        else:
            assert (diff <= tol).all(), (kind, w, h, one[0, 0], want)


# --------------------------------------------------------------------------- the image cache
@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Twelve small files of mixed modes and shapes for the cache cases to draw from."""
    root = tmp_path_factory.mktemp("pool")
    kinds = [k for k in sorted(KINDS) if k != "truncated"]
    return [str(write_kind(root / f"{i}{KINDS[kind][0]}", kind, 2 + 7 * i % 31, 3 + 5 * i % 29))
            for i, kind in enumerate(kinds[:12])]


@st.composite
def cache_cases(draw: st.DrawFn) -> tuple[int, list[int], int | None]:
    """Chunk size c, row picks with N in {1, c + 1, 2c + 1, c} (N = 1 modulo c mostly), and an
    image at which to interrupt the build (or none)."""
    chunk = draw(st.integers(1, 4))
    n = draw(st.sampled_from([1, chunk + 1, 2 * chunk + 1, chunk]))
    picks = draw(st.lists(st.integers(0, 11), min_size=n, max_size=n))
    stop = draw(st.none() | st.integers(0, n - 1))
    return chunk, picks, stop


@settings(FAST, max_examples=30)
def _kept(cache: Path) -> list[Path]:
    """What a build left in ``cache``, less the empty lock file that says who builds it."""
    return [p for p in cache.iterdir() if p.suffix != ".lock"]


@given(case=cache_cases(), resize=st.sampled_from(images.RESIZE_POLICIES))
def test_cache_chunks_hold_direct_decoding_and_interruptions_leave_nothing(
        scratch: Path, pool: list[str], case: tuple[int, list[int], int | None],
        resize: str) -> None:
    """The cache, built chunk by chunk (the last chunk one row, or a whole one), equals decoding
    the files directly; a build interrupted at any image leaves no cache and no temporary file,
    and the next call builds the whole cache."""
    chunk, picks, stop = case
    paths = [pool[i] for i in picks]
    cache = _fresh(scratch)
    real = images.decode_rgb
    calls: list[int] = []

    def interrupted(path: str, *args: object) -> Image.Image:
        if len(calls) == stop:
            raise KeyboardInterrupt  # Ctrl-C mid-build: not an Exception, no handler catches it
        calls.append(1)
        return real(path, *args)

    if stop is not None:
        with mock.patch.object(images, "CHUNK", chunk), \
                mock.patch.object(images, "decode_rgb", interrupted), \
                pytest.raises(KeyboardInterrupt):
            images.cached_images(paths, 16, cache, resize, workers=1, progress=False)
        assert _kept(cache) == []  # nothing that looks finished, nor a temporary
    chunks: list[int] = []
    spy = images._decode_chunk

    def counting(file: str, offset: int, shape: tuple, start: int, part: list[str],
                 policy: str) -> list[str]:
        chunks.append(len(part))
        return spy(file, offset, shape, start, part, policy)

    with mock.patch.object(images, "CHUNK", chunk), \
            mock.patch.object(images, "_decode_chunk", counting):
        cached = images.cached_images(paths, 16, cache, resize, workers=1, progress=False)
    assert chunks == [min(chunk, len(paths) - s) for s in range(0, len(paths), chunk)]
    np.testing.assert_array_equal(cached, images.decode_images(paths, 16, resize=resize))
    assert [p.suffix for p in _kept(cache)] == [".npy"]


def test_worker_processes_fill_a_one_row_last_chunk_and_name_a_bad_file(
        scratch: Path, pool: list[str]) -> None:
    """Two spawned workers, chunks of 2, N = 2 * 2 + 1: the last chunk's one row is written by a
    worker; a bad file alone in that chunk is named and nothing is kept."""
    cache = _fresh(scratch)
    bad = write_kind(cache.parent / "bad_last.png", "truncated", 4, 4)
    with mock.patch.object(images, "CHUNK", 2):
        with pytest.raises(DataError, match=str(bad)):
            images.cached_images([*pool[:4], str(bad)], 16, cache, workers=2, progress=False)
        assert _kept(cache) == []
        cached = images.cached_images(pool[:5], 16, cache, workers=2, progress=False)
    np.testing.assert_array_equal(cached, images.decode_images(pool[:5], 16))


# --------------------------------------------------------------------------- level 2
@st.composite
def level2_cases(draw: st.DrawFn) -> dict:
    """Row block B, rows N = m * B + 1 (m = 1: one row past a block), 2 or 3 classes, K folds,
    1 to 3 runs, and 1 or B + 1 test rows."""
    block = draw(st.integers(2, 8))
    n_classes = draw(st.integers(2, 3))
    k = draw(st.integers(2, 3))
    m = draw(st.integers(-(-k * n_classes // block), 6))  # every class fills the K folds
    return {"block": block, "n": m * block + 1, "n_classes": n_classes, "k": k,
            "runs": draw(st.integers(1, 3)), "n_test": draw(st.sampled_from([1, block + 1])),
            "seed": draw(st.integers(0, 1000))}


def _level1(case: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(case["seed"])
    n, c = case["n"], case["n_classes"]
    y = rng.permutation(np.arange(n) % c)
    folds = make_folds([str(i) for i in range(n)], [f"c{v}" for v in y], case["k"], 0).fold

    def proba(rows: int, truth: np.ndarray) -> np.ndarray:
        logits = rng.normal(size=(rows, case["runs"], c))
        logits[np.arange(rows), :, truth] += rng.uniform(0, 3, case["runs"])
        p = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
        return p.reshape(rows, -1)

    return proba(n, y), y, folds, proba(case["n_test"], rng.integers(0, c, case["n_test"]))


def _blocks_change_nothing(method: str, case: dict) -> None:
    X, y, folds, X_test = _level1(case)
    c = case["n_classes"]
    params = stacker_params(method, StackConfig())
    out = {}
    for block in (10**9, case["block"]):
        with mock.patch.object(stackers, "ROW_BLOCK", block):
            cv = cross_val_level2(method, stackers.make_stacker(method, **params), X, y, folds, c,
                                  X_test)
            final = stackers.make_stacker(method, **params).fit(X, y)  # what stack.py submits
            out[block] = (cv.oof, cv.test_per_fold, full_proba(final, X_test, c))
    for whole, blocked in zip(out[10**9], out[case["block"]]):
        assert np.isfinite(blocked).all()
        np.testing.assert_allclose(blocked, whole, rtol=0, atol=1e-9)
        np.testing.assert_allclose(blocked.sum(axis=-1), 1.0, atol=1e-9)
    assert out[case["block"]][0].shape == (case["n"], c)
    assert out[case["block"]][1].shape == (case["k"], case["n_test"], c)


CHEAP = [m for m in METHODS if m not in ("logreg", "lightgbm")]


@settings(FAST, max_examples=15)
@given(level2_cases())
def test_row_blocks_change_no_blend(case: dict) -> None:
    """mean, geo, rank, blend, greedy: the same level-2 OOF, fold-stacker test rows and final
    test rows with blocks of B rows (the last one row) as with one block."""
    for method in CHEAP:
        _blocks_change_nothing(method, case)


@settings(FAST, max_examples=5)
@given(level2_cases())
def test_row_blocks_change_no_learned_stacker(case: dict) -> None:
    """logreg and lightgbm (a few cases: each fits dozens of inner models)."""
    for method in ("logreg", "lightgbm"):
        _blocks_change_nothing(method, case)


@pytest.mark.parametrize("method", ["mean", "logreg"])
def test_level2_refuses_folds_that_hide_a_class_from_a_fold_stacker(method: str) -> None:
    """Stored folds (grouped, made before make_folds refused it) with every row of class 2 in
    fold 0: the fold-0 stacker would read 3-class blocks as 2-class ones. Refused, naming the
    class and the fold, instead of a silently scrambled OOF."""
    rng = np.random.default_rng(0)
    y = np.array([0, 1] * 9 + [2, 2])
    folds = np.array([0, 1, 2] * 6 + [0, 0])
    X = rng.dirichlet(np.ones(3), size=(20, 2)).reshape(20, 6)
    with pytest.raises(RunMismatchError, match=r"class index\(es\) \[2\] is in fold 0"):
        cross_val_level2(method, stackers.make_stacker(method), X, y, folds, 3, X[:1])


# --------------------------------------------------------------------------- end to end
def mixed_imagefolder(root: Path, per_class: dict[str, int], n_test: int = 1) -> Path:
    """An ImageFolder set whose every class mixes modes and tiny sizes; classes differ in
    brightness so that one epoch can learn something."""
    kinds = ["L", "RGBA", "I;16", "P", "P-transparent", "CMYK-jpeg", "PGM-16", "RGB-jpeg"]
    for c, (name, n) in enumerate(per_class.items()):
        for i in range(n):
            kind = kinds[(i + 3 * c) % len(kinds)]
            path = write_kind(root / "train" / name / f"{i}{KINDS[kind][0]}", kind,
                              3 + i % 4, 5 - i % 3)
            if c:  # the second class: the negative of the first's picture
                with Image.open(path) as img:
                    if img.mode in ("RGB", "L"):
                        Image.eval(img, lambda v: 255 - v).save(path, quality=95)
    for i in range(n_test):
        write_kind(root / "test" / f"t{i}.png", "L", 3, 5)
    return root


def run_folds_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "run_folds.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_tiny_mixed_set_trains_and_stacks(tmp_path: Path) -> None:
    """2 classes of mixed-mode 3-6 px images, 1 test image, K=2, 1 epoch at 16 px (4 and 5
    training rows per fold at batch size 4: one full batch, and batch + 1); then stack.py:
    every OOF row predicted, finite, summing to 1; one submission row."""
    data = mixed_imagefolder(tmp_path / "data", {"dark": 4, "light": 5})
    out = tmp_path / "runs"
    proc = run_folds_script(["--data", str(data), "--out", str(out), "--folds", "2", "--epochs",
                             "1", "--img-size", "16", "--batch-size", "4", "--threads", "1",
                             "--progress", "false"], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    run_dir = out / "data" / "timm-resnet10t_16px"
    oof = pd.read_parquet(run_dir / "oof.parquet")
    cols = [c for c in oof.columns if "__" in c]
    assert len(oof) == 9 and oof["id"].is_unique and len(cols) == 2
    assert np.isfinite(oof[cols].to_numpy()).all()
    np.testing.assert_allclose(oof[cols].sum(axis=1), 1.0, atol=1e-6)
    test = pd.read_parquet(run_dir / "test.parquet")
    assert list(test["id"]) == ["t0.png"] and np.isfinite(test[cols].to_numpy()).all()
    res = stack_runs(StackConfig(data=str(data), out=str(out)))
    level2 = pd.read_parquet(res.level2_run / "oof.parquet")
    l2cols = [c for c in level2.columns if "__" in c]
    assert len(level2) == 9 and np.isfinite(level2[l2cols].to_numpy()).all()
    np.testing.assert_allclose(level2[l2cols].sum(axis=1), 1.0, atol=1e-6)
    sub = pd.read_csv(res.submission, dtype=str)
    assert len(sub) == 1 and sub.iloc[0, 1] in ("dark", "light")
    assert json.loads((res.level2_run / "meta.json").read_text())["status"] == "complete"


@pytest.mark.parametrize(("classes", "k", "needles"), [
    ({"dark": 3, "light": 1}, 2, ["--folds 2", "'light' has 1"]),
    ({"dark": 4}, 2, ["one class", "'dark'"]),
])
def test_run_folds_refuses_unsplittable_classes_before_writing(
        tmp_path: Path, classes: dict[str, int], k: int, needles: list[str]) -> None:
    """A class smaller than K, or a single class: exit 2 naming the class, before any image is
    decoded or torch is loaded, and nothing written under --out."""
    data = mixed_imagefolder(tmp_path / "data", classes)
    proc = run_folds_script(["--data", str(data), "--out", str(tmp_path / "runs"), "--folds",
                             str(k), "--epochs", "1", "--img-size", "16", "--progress",
                             "false"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr
    assert not (tmp_path / "runs").exists()
