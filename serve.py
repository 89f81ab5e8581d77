#!/usr/bin/env python
"""Serve a stack (or an exported bundle) over HTTP: an upload page at /, POST /predict (multipart
field 'file', one or more images) and GET /health, on a waitress WSGI server."""

from __future__ import annotations

import argparse
import sys

from oof.cli import main_guard


def main(argv: list[str] | None = None) -> int | None:
    from serve.app import Limits

    d = Limits()
    parser = argparse.ArgumentParser(prog="serve.py", description=__doc__)
    parser.add_argument("stack_dir", help="stack folder written by stack.py, or a bundle")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--threads", type=int, default=8, help="waitress worker threads")
    parser.add_argument("--model-threads", type=int, default=None,
                        help="CPU threads of each framework (default: half the cores each)")
    parser.add_argument("--subset", default=None,
                        help="serve fewer runs: 'greedy' or RUN,RUN (stack folders only)")
    parser.add_argument("--max-files", type=int, default=d.max_files)
    parser.add_argument("--max-mb", type=float, default=d.max_bytes / 2**20,
                        help="largest request in MB")
    parser.add_argument("--max-pixels", type=int, default=d.max_pixels,
                        help="largest image (width x height) accepted")
    parser.add_argument("--allow-version-mismatch", action="store_true")
    args = parser.parse_args(argv)
    from oof.errors import ConfigError
    from serve.wsgi import serve

    for flag in ("port", "threads", "max_files", "max_mb", "max_pixels"):
        if getattr(args, flag) <= 0 and not (flag == "port" and args.port == 0):
            raise ConfigError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be > 0")

    subset = None if not args.subset else ("greedy" if args.subset == "greedy"
                                           else args.subset.split(","))
    limits = Limits(max_bytes=int(args.max_mb * 2**20), max_files=args.max_files,
                    max_pixels=args.max_pixels)
    serve(args.stack_dir, args.host, args.port, args.threads, limits, subset,
          args.allow_version_mismatch, args.model_threads)
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(lambda: main(sys.argv[1:])))
