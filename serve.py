#!/usr/bin/env python
"""Serve a stack (or an exported bundle) over HTTP: an upload page at /, POST /predict (multipart
field 'file', one or more images) and GET /health, on a waitress WSGI server. Also
``foldstack-serve``."""

from __future__ import annotations

import sys

from serve.cli import serve_cli

if __name__ == "__main__":
    sys.exit(serve_cli(sys.argv[1:], prog="serve.py"))
