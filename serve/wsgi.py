"""``serve.py``'s library: load the ensemble once, then waitress (a production WSGI server,
not Flask's debug server) over the Flask app."""

from __future__ import annotations

import json
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
    from waitress.server import create_server

    limits = limits or Limits()
    ensemble = Ensemble.load(stack_dir, subset=subset, threads=model_threads,
                             allow_version_mismatch=allow_version_mismatch)
    app = create_app(ensemble, limits)
    log.info("serving %s (%d runs, stacker %s) on http://%s:%d", stack_dir,
             len(ensemble.runs), ensemble.manifest["stacker"]["method"], host, port)
    server = create_server(app, host=host, port=port, threads=threads,
                           max_request_body_size=2 * limits.max_bytes + 2**20,
                           channel_timeout=30, ident="foldstack")
    channel = json_error_channel(limits.max_bytes)
    # one listening server, or several (a host name with many addresses) in its socket map
    for listener in [server, *getattr(server, "map", {}).values()]:
        if hasattr(listener, "channel_class"):
            listener.channel_class = channel
    server.run()


def json_error_channel(max_bytes: int) -> type:
    """A waitress channel whose own refusals (a body past its limit, a malformed request line,
    headers too large) answer with the app's JSON error shape, not waitress's plain text: a
    client reads every 4xx the same way. waitress sends them before the app sees the request."""
    from waitress.channel import HTTPChannel
    from waitress.task import ErrorTask

    class JsonErrorTask(ErrorTask):
        def execute(self) -> None:
            err = self.request.error
            message = (f"request too large: more than {max_bytes} bytes"
                       if err.code == 413 else f"{err.reason.lower()}: {err.body}")
            body = json.dumps({"error": message, "status": err.code}).encode()
            self.status = f"{err.code} {err.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class JsonErrorChannel(HTTPChannel):
        error_task_class = JsonErrorTask

    return JsonErrorChannel
