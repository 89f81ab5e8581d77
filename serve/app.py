"""The Flask app over a loaded ``Ensemble``: upload page, ``POST /predict``, ``GET /health``.

Models are loaded once, before the app exists (``create_app`` takes the loaded ensemble).
Uploads are checked and decoded in the request's own thread; the forward passes run in one
thread, with concurrent requests gathered into one batch (``Batcher``).
Every refusal is a 4xx JSON ``{"error": message, "status": code}`` naming the problem; nothing a
client sends can produce a 500 or an unbounded wait.
"""

from __future__ import annotations

import io
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flask import Flask, jsonify, render_template, request
from werkzeug.exceptions import HTTPException

from oof.errors import DataError
from serve.bundle import Ensemble, Prediction
from serve.config import Limits

log = logging.getLogger(__name__)


class Batcher:
    """One thread runs every forward pass; requests waiting at the same time share a batch.

    Concurrent requests are thus serialised (neither framework's model is documented as safe
    to call from many threads) and batched (16 one-image requests cost about one 16-image
    pass, not sixteen). A request waits at most ``timeout`` seconds, then gets a 503.
    """

    def __init__(self, ensemble: Ensemble, max_images: int = 64, timeout: float = 120.0) -> None:
        self.ensemble, self.max_images, self.timeout = ensemble, max_images, timeout
        self.jobs: queue.Queue[_Job] = queue.Queue()
        threading.Thread(target=self._work, name="foldstack-batcher", daemon=True).start()

    def predict(self, decoded: dict[int, np.ndarray]) -> Prediction:
        job = _Job(decoded)
        self.jobs.put(job)
        if not job.done.wait(self.timeout):
            raise UploadError(503, f"the models did not answer within {self.timeout:.0f} s "
                                   "(server overloaded); retry later")
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def _work(self) -> None:
        while True:  # never dies: every failure is handed to the requests that wait on it
            batch = [self.jobs.get()]
            size = batch[0].size
            while size < self.max_images:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                batch.append(job)
                size += job.size
            try:
                sizes = batch[0].decoded.keys()
                merged = {s: np.concatenate([j.decoded[s] for j in batch]) for s in sizes}
                pred = self.ensemble.predict_decoded(merged)
                start = 0
                for j in batch:
                    rows = slice(start, start + j.size)
                    j.result = Prediction(pred.proba[rows], {k: v[rows] for k, v in
                                                             pred.runs.items()}, pred.classes)
                    start += j.size
            except Exception as exc:  # noqa: BLE001 - handed to the waiting requests
                log.exception("forward pass failed")
                for j in batch:
                    j.error = exc
            for j in batch:
                j.done.set()


@dataclass
class _Job:
    decoded: dict[int, np.ndarray]
    done: threading.Event = field(default_factory=threading.Event)
    result: Prediction | None = None
    error: Exception | None = None

    @property
    def size(self) -> int:
        return len(next(iter(self.decoded.values())))


class UploadError(Exception):
    """A client mistake, answered with ``status`` and a message naming the upload."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def check_upload(name: str, data: bytes, limits: Limits) -> None:
    """Refuse empty files, non-images and decompression bombs from the header alone."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UploadError(400, f"file {name!r} is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
    except Image.DecompressionBombError as exc:
        raise UploadError(413, f"file {name!r}: decompression bomb refused ({exc})") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UploadError(415, f"file {name!r} is not an image Pillow can read "
                               f"({type(exc).__name__})") from exc
    if width * height > limits.max_pixels:
        raise UploadError(413, f"file {name!r}: {width}x{height} = {width * height} pixels, "
                               f"over the limit of {limits.max_pixels} (decompression bomb?)")


def prediction_rows(ensemble: Ensemble, names: list[str], proba: np.ndarray,
                    votes: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    classes = ensemble.classes
    rows = []
    for i, name in enumerate(names):
        row = {"name": name, "label": classes[int(proba[i].argmax())],
               "probabilities": {c: float(p) for c, p in zip(classes, proba[i])},
               "models": {}}
        for run, v in votes.items():
            row["models"][run] = {"label": classes[int(v[i].argmax())],
                                  "probabilities": {c: float(p) for c, p in zip(classes, v[i])}}
        rows.append(row)
    return rows


def create_app(ensemble: Ensemble, limits: Limits | None = None) -> Flask:
    """The WSGI app; ``ensemble`` is already loaded (models load once, at start)."""
    limits = limits or Limits()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = limits.max_bytes
    app.config["MAX_FORM_PARTS"] = limits.max_files + 16  # werkzeug refuses past it: 413
    app.json.sort_keys = False  # type: ignore[attr-defined]
    batcher = Batcher(ensemble)
    health = ensemble.health()

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        messages = {404: f"no such path {request.path!r}; try GET /, POST /predict, GET /health",
                    405: f"method {request.method} not allowed on {request.path}",
                    413: f"request too large: more than {limits.max_bytes} bytes or "
                         f"{limits.max_files} files"}
        msg = messages.get(exc.code or 500, exc.description or exc.name)
        return jsonify(error=msg, status=exc.code), exc.code

    @app.errorhandler(UploadError)
    def upload_error(exc: UploadError) -> Any:
        return jsonify(error=exc.message, status=exc.status), exc.status

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Any:  # a bug, not the client's fault: say so, log it
        log.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify(error=f"internal error ({type(exc).__name__})", status=500), 500

    @app.get("/")
    def index() -> Any:
        return render_template("index.html", health=health, limits=limits)

    @app.get("/health")
    def health_view() -> Any:
        return jsonify(health)

    @app.post("/predict")
    def predict() -> Any:
        t0 = time.perf_counter()
        files = request.files.getlist("file")
        if not files:
            other = sorted(request.files)
            raise UploadError(400, "no file: send the image(s) as multipart/form-data field "
                                   "'file'" + (f" (got fields {other})" if other else ""))
        if len(files) > limits.max_files:
            raise UploadError(413, f"too many files: {len(files)} > {limits.max_files} per "
                                   "request")
        names, blobs = [], []
        for n, f in enumerate(files):
            name = f.filename or f"file {n + 1}"
            data = f.read()
            check_upload(name, data, limits)
            names.append(name)
            blobs.append(data)
        try:
            decoded = ensemble.decode(blobs, names)
        except DataError as exc:  # truncated or corrupt past its header
            raise UploadError(400, str(exc)) from exc
        pred = batcher.predict(decoded)
        rows = prediction_rows(ensemble, names, pred.proba, pred.runs)
        return jsonify(predictions=rows, seconds=round(time.perf_counter() - t0, 4))

    return app
