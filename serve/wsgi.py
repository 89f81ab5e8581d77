"""``serve.py``'s library: load the ensemble once, then waitress (a production WSGI server,
not Flask's debug server) over the Flask app."""

from __future__ import annotations

import logging
from pathlib import Path

from serve.app import Limits, create_app
from serve.bundle import Ensemble

log = logging.getLogger(__name__)


def serve(stack_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, threads: int = 8,
          limits: Limits | None = None, subset: str | list[str] | None = None,
          allow_version_mismatch: bool = False, model_threads: int | None = None) -> None:
    """Block serving ``stack_dir`` on ``host:port`` (127.0.0.1 by default: local only).

    ``threads``: waitress worker threads (uploads are read and decoded in parallel; forward
    passes take turns). waitress buffers a whole request before the app sees it, so its own
    body limit is set a little above the app's: a larger upload is cut off early.
    """
    from waitress import serve as waitress_serve

    limits = limits or Limits()
    ensemble = Ensemble.load(stack_dir, subset=subset, threads=model_threads,
                             allow_version_mismatch=allow_version_mismatch)
    app = create_app(ensemble, limits)
    log.info("serving %s (%d runs, stacker %s) on http://%s:%d", stack_dir,
             len(ensemble.runs), ensemble.manifest["stacker"]["method"], host, port)
    waitress_serve(app, host=host, port=port, threads=threads,
                   max_request_body_size=2 * limits.max_bytes + 2**20,
                   channel_timeout=30, ident="foldstack")
