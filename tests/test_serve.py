"""The final ensemble in use, with the real parts (issue 11).

A tiny real stack is trained once for the module (timm resnet10t at 16 px with hflip TTA and
Keras MobileNetV3Small at 32 px, K=3, one epoch, on the demo subset's real PNGs), then:
fold models reproduce their stored OOF and test rows; predict.py reproduces the stack's own
test predictions; the exported bundle runs without the run root and refuses damage; the
service runs as a subprocess on 127.0.0.1 under waitress and is hit by a malformed-upload
corpus, a 2,000-request load test and a real headless Chromium. torch and TensorFlow only run
in subprocesses (the pytest process may hold either from other tests).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.requirements import (
    INSTALL_DEV,
    INSTALL_SERVE,
    MAKE_BROWSER,
    require_module,
    require_program,
)

ROOT = Path(__file__).resolve().parents[1]
TIMM_RUN, KERAS_RUN = "timm-resnet10t_16px", "keras-MobileNetV3Small_32px"
requests = require_module("requests", INSTALL_DEV)


def _env() -> dict[str, str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": str(ROOT)}
    env.pop("KERAS_BACKEND", None)
    return env


def _py(*args: str, timeout: int = 300, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def stack(demo_subset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real level-1 runs of different frameworks and their stack folder (~1 minute)."""
    out = tmp_path_factory.mktemp("serve_runs")
    common = ["--data", str(demo_subset), "--out", str(out), "--folds", "3", "--epochs", "1",
              "--progress", "false", "--threads", "1"]
    _py("run_folds.py", *common, "--backbone", "timm/resnet10t", "--img-size", "16",
        "--tta", "hflip")
    _py("run_folds.py", *common, "--backbone", "keras/MobileNetV3Small", "--img-size", "32")
    _py("stack.py", "--data", str(demo_subset), "--out", str(out), "--method", "logreg",
        "--compare", "false")
    return out / demo_subset.name / "stack-logreg"


@pytest.fixture(scope="module")
def bundle(stack: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stack exported from a copy of its run root, which is then deleted: the bundle must
    not need it."""
    tmp = tmp_path_factory.mktemp("bundle")
    copy = tmp / "runs_copy"
    shutil.copytree(stack.parent, copy, ignore=shutil.ignore_patterns("cache"))
    stacker = json.loads((copy / stack.name / "stacker.json").read_text())
    for r in stacker["runs"]:  # point the copy's record at the copied runs
        r["path"] = str(copy / Path(r["path"]).name)
    (copy / stack.name / "stacker.json").write_text(json.dumps(stacker))
    _py("-m", "serve.bundle", str(copy / stack.name), "--out", str(tmp / "bundle"))
    shutil.rmtree(copy)
    return tmp / "bundle"


@pytest.fixture(scope="module")
def predicted(bundle: Path, demo_subset: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> pd.DataFrame:
    """predict.py's answers for every test image, from the bundle."""
    out = tmp_path_factory.mktemp("predict") / "preds.csv"
    _py("predict.py", str(bundle), str(demo_subset / "test_upload"), "--out", str(out))
    return pd.read_csv(out, dtype={"id": str, "label": str})


# ------------------------------------------------------------------------------ level 1

REPRODUCE = r"""
import json, sys
import numpy as np
from serve.bundle import import_backends
import_backends({"timm", "keras"})
import backbones
from oof.images import decode_images
from oof.datasets import load_dataset
from oof.rundir import load_run
data = load_dataset(sys.argv[1], "auto", None)
paths = dict(zip(data.train["id"].astype(str), data.train["path"]))
out = {}
for run_dir in sys.argv[2:]:
    run = load_run(run_dir)
    test_paths = list(data.test.set_index("id").loc[run.test_ids, "path"])
    family = run.meta["backbone"]["family"]; size = run.meta["backbone"]["input_size"]
    x_test = decode_images(test_paths, size)
    per_fold = run.test_per_fold()
    got = out[run.name] = {"oof": [], "test": []}
    for ck in sorted((run.path / "checkpoints").glob("fold?.*")):
        if ".best." in ck.name:
            continue
        p = backbones.get_backend(family).load_predictor(run.meta, ck, 1)
        k = p.meta["fold"]
        rows = np.flatnonzero(run.folds == k)
        x = decode_images([paths[i] for i in run.ids[rows]], size)
        got["oof"].append(float(np.abs(p.predict_proba(x) - run.oof[rows]).max()))
        got["test"].append(float(np.abs(p.predict_proba(x_test) - per_fold[k]).max()))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_fold_models_reproduce_their_stored_oof_and_test_rows(stack: Path,
                                                              demo_subset: Path) -> None:
    """Each published fold checkpoint (safetensors / .weights.h5), loaded by the backend's
    load_predictor, predicts its held-out rows and the test set as the run stored them."""
    proc = _py("-c", REPRODUCE, str(demo_subset), str(stack.parent / TIMM_RUN),
               str(stack.parent / KERAS_RUN))
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for run in (TIMM_RUN, KERAS_RUN):
        assert len(got[run]["oof"]) == 3
        assert max(got[run]["oof"]) < 1e-6 and max(got[run]["test"]) < 1e-6, got
    # no pickle: timm fold weights are safetensors
    assert sorted(p.name for p in (stack.parent / TIMM_RUN / "checkpoints").iterdir()) == [
        f"fold{k}.safetensors" for k in range(3)]


# ------------------------------------------------------------------------------ predict


@pytest.mark.slow
def test_stack_saves_its_final_stacker_with_what_it_was_fitted_on(stack: Path) -> None:
    info = json.loads((stack / "stacker.json").read_text())
    report = json.loads((stack / "report.json").read_text())
    assert info["method"] == report["chosen"] == "logreg"
    assert [r["run"] for r in info["runs"]] == [r["run"] for r in report["runs"]]
    assert info["fold_fingerprint"] == report["folds"]["fingerprint"]
    assert info["classes"] == [str(c) for c in range(10)]
    assert {"scikit-learn", "numpy", "python"} <= set(info["versions"])
    assert info["level2_scores"] == report["methods"]["logreg"]["scores"]


@pytest.mark.slow
def test_predict_equals_the_stacks_own_test_predictions(stack: Path, predicted: pd.DataFrame,
                                                        demo_subset: Path) -> None:
    """predict.py on the competition's test images (from the exported bundle) = the stack's
    submission probabilities to 1e-6; and the ensemble is far above chance on held-out labels."""
    sub = pd.read_csv(stack / "submission_proba.csv", dtype={"Id": str})
    classes = [str(c) for c in range(10)]
    assert list(predicted.columns) == ["id", "label", *classes]
    got = predicted.set_index("id").loc[sub["Id"]]
    assert np.abs(got[classes].to_numpy() - sub[classes].to_numpy()).max() < 1e-6
    assert (got["label"].to_numpy() == np.array(classes)[sub[classes].to_numpy().argmax(1)]).all()
    truth = pd.read_csv(demo_subset / "test_labels.csv", dtype=str).set_index("Id")
    accuracy = (got["label"] == truth.loc[got.index].iloc[:, 0]).mean()
    assert accuracy > 0.5  # 10 classes: chance is 0.1


@pytest.mark.slow
def test_subset_shows_its_own_level2_score(stack: Path) -> None:
    """Serving fewer runs is never silent: the manifest names what was dropped and the
    subset's honest level-2 score beside the full stack's; greedy keeps its non-zero runs."""
    from serve.bundle import describe_stack

    m, _, _ = describe_stack(stack, [TIMM_RUN])  # what export writes (frameworks not needed)
    assert [r["name"] for r in m["runs"]] == [TIMM_RUN]
    s = m["subset"]
    assert s["kept"] == [TIMM_RUN] and s["dropped"] == [KERAS_RUN]
    assert s["level2_scores"] != s["full_level2_scores"]
    assert m["stacker"]["level2_scores"] == s["level2_scores"]
    from ensemble.saved import fit_subset
    from ensemble.stackers import make_stacker
    from oof.rundir import load_run

    greedy = fit_subset(stack)  # keep=None: the greedy rule
    runs = [load_run(r["path"]) for r in json.loads((stack / "stacker.json").read_text())["runs"]]
    ref = make_stacker("greedy").fit(np.hstack([r.oof for r in runs]), runs[0].y)
    assert greedy.kept == [r.name for r, w in zip(runs, ref.weights_) if w > 0]


@pytest.mark.slow
def test_budgeted_temperature_stack_predicts_its_own_test_rows(stack: Path, demo_subset: Path,
                                                               tmp_path: Path) -> None:
    """stack.py --budget 6 (the timm run costs 3 folds x 2 hflip views, the Keras run 3, both 9)
    --temperature always over the trained runs: the stack folder holds one run and the T; its
    exported bundle, through predict.py, reproduces the stack's submission probabilities to
    1e-6 (issue 30 items 3 and 5)."""
    from ensemble.calibrate import TemperatureScaled
    from ensemble.saved import load_stacker

    _py("stack.py", "--data", str(demo_subset), "--out", str(stack.parent.parent), "--method",
        "logreg", "--compare", "false", "--runs", TIMM_RUN, KERAS_RUN, "--budget", "6",
        "--temperature", "always", "--name", "stack-budget")
    out = stack.parent / "stack-budget"
    report = json.loads((out / "report.json").read_text())
    cost = {TIMM_RUN: 6, KERAS_RUN: 3}
    assert {r["model"]: r["passes"] for r in report["table"] if r["level"] == 1} == cost
    kept = report["budget"]["chosen"]
    assert len(kept) == 1 and report["budget"]["passes_chosen"] == cost[kept[0]]
    saved = load_stacker(out)
    assert saved.runs == kept and isinstance(saved.stacker, TemperatureScaled)
    assert saved.info["temperature"] == report["temperature"]["temperature"] != 1.0
    bundle = tmp_path / "bundle"
    _py("-m", "serve.bundle", str(out), "--out", str(bundle))
    preds = tmp_path / "preds.csv"
    _py("predict.py", str(bundle), str(demo_subset / "test_upload"), "--out", str(preds))
    predicted = pd.read_csv(preds, dtype={"id": str, "label": str}).set_index("id")
    classes = [str(c) for c in range(10)]
    sub = pd.read_csv(out / "submission_proba.csv", dtype={"Id": str})
    np.testing.assert_allclose(predicted.loc[sub["Id"], classes].to_numpy(float),
                               sub[classes].to_numpy(float), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_subset_naming_a_run_the_stack_lacks_is_refused(stack: Path, bundle: Path,
                                                        demo_subset: Path) -> None:
    """predict.py --subset with an unknown run: exit 2, the flag, the name and the stack's runs,
    before anything is refitted; a bundle refuses --subset, naming it."""
    image = next((demo_subset / "test_upload").iterdir())
    proc = _py("predict.py", str(stack), str(image), "--subset", f"{TIMM_RUN},nope", check=False)
    assert proc.returncode == 2, proc.stderr
    assert (f"--subset {TIMM_RUN},nope: {stack} has no run(s) ['nope']; its runs are "
            f"['{KERAS_RUN}', '{TIMM_RUN}']") in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _py("serve.py", str(bundle), "--subset", "greedy", "--port", "0", check=False)
    assert proc.returncode == 2 and f"--subset: {bundle} is an exported bundle" in proc.stderr


# ------------------------------------------------------------------------------ refusals


def _damaged_copy(bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    return copy


def _load_error(path: Path) -> str:
    """Loading refuses before any framework is imported (hashes, versions, fingerprints)."""
    from oof.errors import FoldstackError
    from serve.bundle import Ensemble

    with pytest.raises(FoldstackError) as exc:
        Ensemble.load(path)
    return str(exc.value)


@pytest.mark.slow
def test_damaged_or_mismatched_bundle_is_refused_clearly(bundle: Path, tmp_path: Path) -> None:
    b = _damaged_copy(bundle, tmp_path)
    ckpt = b / "runs" / TIMM_RUN / "fold1.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-10] ^= 0xFF
    ckpt.write_bytes(bytes(data))
    msg = _load_error(b)
    assert "damaged" in msg and f"runs/{TIMM_RUN}/fold1.safetensors" in msg

    ckpt.unlink()
    assert "fold1.safetensors: missing" in _load_error(b)

    shutil.rmtree(b)
    b = _damaged_copy(bundle, tmp_path)
    (b / "manifest.json").write_text("{not json")
    assert "damaged bundle manifest" in _load_error(b)

    shutil.rmtree(b)
    b = _damaged_copy(bundle, tmp_path)
    m = json.loads((b / "manifest.json").read_text())
    m["versions"]["scikit-learn"] = "0.0.1"
    (b / "manifest.json").write_text(json.dumps(m))
    msg = _load_error(b)
    assert "scikit-learn: saved with 0.0.1" in msg and "allow-version-mismatch" in msg

    # a run of other folds, with its hashes made consistent: the fingerprint check still holds
    shutil.rmtree(b)
    b = _damaged_copy(bundle, tmp_path)
    meta_path = b / "runs" / KERAS_RUN / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["fold_fingerprint"] = "0123456789abcdef"
    meta_path.write_text(json.dumps(meta))
    from ensemble.saved import sha256_of

    m = json.loads((b / "manifest.json").read_text())
    m["files"][f"runs/{KERAS_RUN}/meta.json"] = sha256_of(meta_path)
    (b / "manifest.json").write_text(json.dumps(m))
    msg = _load_error(b)
    assert KERAS_RUN in msg and "fold fingerprint 0123456789abcdef" in msg

    # fold models saved with another torch: refused (a CUDA/CPU build tag alone is not)
    shutil.rmtree(b)
    b = _damaged_copy(bundle, tmp_path)
    meta_path = b / "runs" / TIMM_RUN / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["versions"]["torch"] = "1.0.0+cu999"
    meta_path.write_text(json.dumps(meta))
    m = json.loads((b / "manifest.json").read_text())
    m["files"][f"runs/{TIMM_RUN}/meta.json"] = sha256_of(meta_path)
    (b / "manifest.json").write_text(json.dumps(m))
    msg = _load_error(b)
    assert f"{TIMM_RUN}: torch: saved with 1.0.0+cu999" in msg
    from ensemble.saved import version_mismatches

    assert version_mismatches({"torch": "2.1.0+cu121"}, {"torch": "2.1.0+cpu"}) == []
    assert version_mismatches({"python": "3.11.2"}, {"python": "3.11.7"}) == []


@pytest.mark.slow
def test_export_refuses_an_existing_folder_and_a_non_stack(bundle: Path, stack: Path,
                                                          tmp_path: Path) -> None:
    from oof.errors import FoldstackError
    from serve.bundle import export_bundle

    with pytest.raises(FoldstackError, match="already exists"):
        export_bundle(stack, bundle)
    with pytest.raises(FoldstackError, match="no stacker.json"):  # a run root: no stack, no run
        export_bundle(stack.parent, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_predict_script_errors_are_one_line(bundle: Path, tmp_path: Path) -> None:
    proc = _py("predict.py", str(bundle), str(tmp_path / "nothing.png"), check=False)
    assert proc.returncode == 2 and "no such image file or folder" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = _py("predict.py", str(bundle), str(tmp_path), "--batch", "0", check=False)
    assert proc.returncode == 2 and "--batch 0" in proc.stderr
    proc = _py("serve.py", str(bundle), "--max-files", "0", check=False)
    assert proc.returncode == 2 and "--max-files 0" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------ service


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serving(bundle: Path, *options: str) -> Iterator[str]:
    """serve.py on ``bundle`` on a free port of 127.0.0.1 until the block ends; its URL.

    Its log goes to a file: a pipe nobody reads fills up and blocks the server's logging."""
    port = _free_port()
    log_path = bundle.parent / "server.log"
    log_file = open(log_path, "w")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        [sys.executable, "serve.py", str(bundle), "--port", str(port), *options],
        cwd=ROOT, env=_env(), stdout=log_file, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"serve.py exited: {log_path.read_text()[-3000:]}")
            try:
                if requests.get(url + "/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "serve.py did not come up in 240 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()


@pytest.fixture(scope="module")
def server(bundle: Path) -> Iterator[str]:
    """The logreg bundle served with small limits, so the corpus can cross them."""
    with _serving(bundle, "--max-mb", "1", "--max-files", "8", "--max-pixels", "4000000") as url:
        yield url


@pytest.mark.slow
def test_health_names_models_classes_versions(server: str) -> None:
    h = requests.get(server + "/health", timeout=30).json()
    assert [m["run"] for m in h["models"]] == [KERAS_RUN, TIMM_RUN]
    assert [m["folds"] for m in h["models"]] == [3, 3]
    assert h["classes"] == [str(c) for c in range(10)]
    assert "scikit-learn" in h["versions"] and "torch" in h["run_versions"][TIMM_RUN]
    assert h["stacker"]["method"] == "logreg"


def _png(size: tuple[int, int] = (20, 20), mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny valid-looking PNG whose header claims ``width`` x ``height`` (a bomb's header)."""
    data = bytearray(_png((1, 1), "L"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def _corpus(sample: bytes) -> dict[str, tuple[str, str, dict, int, str]]:
    """case -> (method, path, requests kwargs, expected status, word the error must hold)."""
    one = lambda name, data: {"files": [("file", (name, data))]}  # noqa: E731
    return {
        "no file": ("post", "/predict", {"data": {"x": "1"}}, 400, "no file"),
        "no body": ("post", "/predict", {}, 400, "no file"),
        "wrong field": ("post", "/predict", {"files": [("image", ("a.png", sample))]}, 400,
                        "'file'"),
        "empty file": ("post", "/predict", one("empty.png", b""), 400, "empty"),
        "not an image": ("post", "/predict", one("notes.png", b"hello, not pixels" * 20), 415,
                         "not an image"),
        "truncated": ("post", "/predict", one("cut.png", sample[: len(sample) // 2]), 400,
                      "cut.png"),
        "bomb over our limit": ("post", "/predict", one("bomb.png", _png_claiming(5000, 5000)),
                                413, "pixels"),
        "bomb over Pillow's": ("post", "/predict", one("huge.png",
                                                       _png_claiming(60000, 60000)), 413,
                               "bomb"),
        "too large": ("post", "/predict", one("big.png", b"\x89PNG" + os.urandom(1_500_000)),
                      413, "too large"),
        # past waitress's own body limit (2x the app's + 1 MB): refused before the app reads it
        "far too large": ("post", "/predict", one("bigger.png",
                                                  b"\x89PNG" + os.urandom(3_300_000)),
                          413, "too large"),
        "too many files": ("post", "/predict",
                           {"files": [("file", (f"{i}.png", sample)) for i in range(9)]}, 413,
                           "too many files"),
        "GET /predict": ("get", "/predict", {}, 405, "not allowed"),
        "POST /": ("post", "/", {}, 405, "not allowed"),
        "PUT /health": ("put", "/health", {}, 405, "not allowed"),
        "unknown path": ("get", "/nope", {}, 404, "/nope"),
    }


@pytest.mark.slow
@pytest.mark.parametrize("case", list(_corpus(b"").keys()))
def test_malformed_upload_gets_a_4xx_json_naming_the_problem(server: str, demo_subset: Path,
                                                             case: str) -> None:
    sample = sorted((demo_subset / "test_upload").iterdir())[0].read_bytes()
    method, path, kwargs, status, word = _corpus(sample)[case]
    resp = getattr(requests, method)(server + path, timeout=30, **kwargs)
    assert resp.status_code == status, resp.text[:500]
    body = resp.json()
    assert body["status"] == status and word in body["error"], body
    assert requests.get(server + "/health", timeout=30).status_code == 200  # still serving


@pytest.mark.slow
def test_predict_endpoint_answers_like_predict_py(server: str, demo_subset: Path,
                                                  predicted: pd.DataFrame) -> None:
    files = sorted((demo_subset / "test_upload").iterdir())[:3]
    resp = requests.post(server + "/predict", timeout=60,
                         files=[("file", (f.name, f.read_bytes())) for f in files])
    assert resp.status_code == 200, resp.text[:500]
    rows = resp.json()["predictions"]
    want = predicted.set_index("id")
    classes = [str(c) for c in range(10)]
    assert [r["name"] for r in rows] == [f.name for f in files]
    for r in rows:
        got = np.array([r["probabilities"][c] for c in classes])
        assert np.abs(got - want.loc[r["name"], classes].to_numpy(float)).max() < 1e-6
        assert r["label"] == want.loc[r["name"], "label"]
        assert set(r["models"]) == {KERAS_RUN, TIMM_RUN}


@pytest.mark.slow
def test_load_2000_requests_16_clients_all_equal_to_predict_py(
        server: str, demo_subset: Path, predicted: pd.DataFrame) -> None:
    files = sorted((demo_subset / "test_upload").iterdir())
    blobs = [(f.name, f.read_bytes()) for f in files]
    classes = [str(c) for c in range(10)]
    want = predicted.set_index("id")[classes]
    session_of: dict[int, requests.Session] = {}

    def one(i: int) -> float:
        import threading

        s = session_of.setdefault(threading.get_ident(), requests.Session())
        name, data = blobs[i % len(blobs)]
        resp = s.post(server + "/predict", files=[("file", (name, data))], timeout=120)
        assert resp.status_code == 200, resp.text[:300]
        row = resp.json()["predictions"][0]
        assert row["name"] == name
        got = np.array([row["probabilities"][c] for c in classes])
        return float(np.abs(got - want.loc[name].to_numpy(float)).max())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        diffs = list(pool.map(one, range(2000)))
    seconds = time.perf_counter() - t0
    assert len(diffs) == 2000 and max(diffs) < 1e-6
    print(f"2000 requests, 16 clients: {seconds:.1f} s, {2000 / seconds:.0f} requests/s")


@pytest.mark.slow
def test_upload_page_in_headless_chromium_shows_the_label(server: str, demo_subset: Path,
                                                          predicted: pd.DataFrame) -> None:
    """A real browser opens the page, uploads an image through the file input, and reads the
    label the page shows; it must be predict.py's label for that image."""
    webdriver = require_module("selenium.webdriver", INSTALL_SERVE)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    chromium = require_program("chromium", MAKE_BROWSER)
    driver_bin = require_program("chromedriver", MAKE_BROWSER)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    service = webdriver.ChromeService(executable_path=driver_bin)
    browser = webdriver.Chrome(options=opts, service=service)
    try:
        browser.get(server + "/")
        image = sorted((demo_subset / "test_upload").iterdir())[5]
        browser.find_element(By.ID, "file").send_keys(str(image))
        browser.find_element(By.ID, "send").click()
        label = WebDriverWait(browser, 60).until(
            ec.visibility_of_element_located((By.CSS_SELECTOR, ".prediction .label")))
        assert label.text == predicted.set_index("id").loc[image.name, "label"]
        assert browser.find_element(By.CSS_SELECTOR, ".prediction .name").text == image.name
        votes = browser.find_elements(By.CSS_SELECTOR, ".prediction .votes tr")
        assert sorted(v.find_elements(By.TAG_NAME, "td")[0].text for v in votes) == [
            KERAS_RUN, TIMM_RUN]
        assert len(browser.find_elements(By.CSS_SELECTOR, ".prediction .bar")) == 5
    finally:
        browser.quit()


# ------------------------------------------------------------------------------ LightGBM stack


@pytest.fixture(scope="module")
def lightgbm_stack(stack: Path, demo_subset: Path) -> Path:
    """``stack.py --method lightgbm`` (real LightGBM) over the same two trained runs, with the
    first ``--seed`` whose final stacker keeps trees: on 300 rows its inner held-out split often
    finds boosting no better than the log-linear start (seed 0 here), and a stacker without
    trees would serve no LightGBM model at all."""
    out = stack.parent / "stack-lightgbm"
    for seed in range(6):
        _py("stack.py", "--data", str(demo_subset), "--out", str(stack.parent.parent),
            "--method", "lightgbm", "--compare", "false", "--runs", TIMM_RUN, KERAS_RUN,
            "--seed", str(seed))
        if json.loads((out / "report.json").read_text())["final"]["boosting_rounds"] > 0:
            return out
    raise AssertionError("no --seed in 0..5 gave a LightGBM stacker with trees")


@pytest.mark.slow
def test_lightgbm_stack_reloads_from_its_folder_as_fitted(lightgbm_stack: Path) -> None:
    """The saved LightGBM stacker, reloaded from the stack folder (hash and versions checked),
    predicts the OOF and test rows as the stacker fitted in memory (stack.py's config, same
    rows) to 1e-9, and its test rows are the stack's own submission probabilities."""
    from ensemble.evaluate import level1_matrix
    from ensemble.saved import load_stacker
    from ensemble.stack import StackConfig, stacker_params
    from ensemble.stackers import LightGBMStacker, make_stacker
    from oof.config import parse_config
    from oof.rundir import load_run

    saved = load_stacker(lightgbm_stack)
    assert saved.info["method"] == "lightgbm" and saved.runs == [TIMM_RUN, KERAS_RUN]
    assert isinstance(saved.stacker, LightGBMStacker)
    assert saved.stacker.model_ is not None and saved.stacker.best_iteration_ > 0  # trees
    runs = [load_run(r["path"]) for r in saved.info["runs"]]
    X, X_test = level1_matrix(runs)
    cfg = parse_config(StackConfig, ["--config", str(lightgbm_stack / "config.yaml")],
                       "stack.py", "")
    fitted = make_stacker("lightgbm", **stacker_params("lightgbm", cfg)).fit(X, runs[0].y)
    assert fitted.get_params() == saved.stacker.get_params()
    for rows in (X, X_test):
        np.testing.assert_allclose(saved.predict_proba(rows), fitted.predict_proba(rows),
                                   rtol=0, atol=1e-9)
    sub = pd.read_csv(lightgbm_stack / "submission_proba.csv", dtype={"Id": str})
    pos = {i: n for n, i in enumerate(runs[0].test_ids)}
    np.testing.assert_allclose(saved.predict_proba(X_test)[[pos[i] for i in sub["Id"]]],
                               sub[runs[0].classes].to_numpy(float), rtol=0, atol=1e-9)


@pytest.mark.slow
def test_lightgbm_bundle_served_answers_like_predict_py(lightgbm_stack: Path, demo_subset: Path,
                                                       tmp_path: Path) -> None:
    """The LightGBM stack exported as a bundle: predict.py on it reproduces the stack's
    submission probabilities, and the real service on 127.0.0.1 answers /predict with
    predict.py's probabilities and labels to 1e-6."""
    bundle = tmp_path / "bundle"
    _py("-m", "serve.bundle", str(lightgbm_stack), "--out", str(bundle))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["stacker"]["method"] == "lightgbm"
    out = tmp_path / "preds.csv"
    _py("predict.py", str(bundle), str(demo_subset / "test_upload"), "--out", str(out))
    predicted = pd.read_csv(out, dtype={"id": str, "label": str}).set_index("id")
    classes = [str(c) for c in range(10)]
    sub = pd.read_csv(lightgbm_stack / "submission_proba.csv", dtype={"Id": str})
    np.testing.assert_allclose(predicted.loc[sub["Id"], classes].to_numpy(float),
                               sub[classes].to_numpy(float), rtol=0, atol=1e-6)
    files = sorted((demo_subset / "test_upload").iterdir())[:8]
    with _serving(bundle) as url:
        health = requests.get(url + "/health", timeout=30).json()
        assert health["stacker"]["method"] == "lightgbm"
        resp = requests.post(url + "/predict", timeout=120,
                             files=[("file", (f.name, f.read_bytes())) for f in files])
    assert resp.status_code == 200, resp.text[:500]
    rows = resp.json()["predictions"]
    assert [r["name"] for r in rows] == [f.name for f in files]
    for r in rows:
        got = np.array([r["probabilities"][c] for c in classes])
        np.testing.assert_allclose(got, predicted.loc[r["name"], classes].to_numpy(float),
                                   rtol=0, atol=1e-6)
        assert r["label"] == predicted.loc[r["name"], "label"]


def test_layers_serve_on_top_ensemble_free_of_frameworks() -> None:
    """serve/ is the top layer: nothing below imports it; ensemble/ (where the saved stacker
    lives) imports neither backbones nor a framework, even lazily inside a function."""
    import ast

    def imported(path: Path) -> set[str]:
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        return names

    for package in ("oof", "recipe", "backbones", "runner", "ensemble"):
        for path in (ROOT / package).rglob("*.py"):
            assert "serve" not in imported(path), path
    for path in (ROOT / "ensemble").rglob("*.py"):
        assert not imported(path) & {"backbones", "torch", "tensorflow", "keras", "timm",
                                     "flask", "runner"}, path


def test_bundle_carries_the_tta_pipeline_file(tmp_path: Path) -> None:
    """--tta-augment draws views from an --augment FILE: the bundle copies it and points the
    run at the copy, so it predicts without the original path."""
    from oof.errors import DataError
    from serve.bundle import RunEntry, _resolve_augment, _with_bundled_augment

    pipeline = tmp_path / "aug.yaml"
    pipeline.write_text("transform: {}\n")
    entry = RunEntry("r", {"config": {"augment": str(pipeline), "tta_augment": 2}}, [])
    root = tmp_path / "bundle"
    (root / "runs" / "r").mkdir(parents=True)
    meta = _with_bundled_augment(entry, root)
    assert meta["config"]["augment"] == "runs/r/augment.yaml"
    assert entry.meta["config"]["augment"] == str(pipeline)  # the run's own meta untouched
    pipeline.unlink()
    resolved = _resolve_augment(meta, root)["config"]["augment"]
    assert Path(resolved).read_text() == "transform: {}\n"
    with pytest.raises(DataError, match="aug.yaml is missing"):
        _with_bundled_augment(entry, root)
    plain = RunEntry("p", {"config": {"augment": "light", "tta_augment": 2}}, [])
    assert _with_bundled_augment(plain, root)["config"]["augment"] == "light"
