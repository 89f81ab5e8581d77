#!/usr/bin/env python
"""Predict image files with a stack (or an exported bundle): one CSV row per image,
``id,label,<one column per class>`` (id = the file name). Also ``foldstack-predict``."""

from __future__ import annotations

import sys

from serve.cli import predict_cli

if __name__ == "__main__":
    sys.exit(predict_cli(sys.argv[1:], prog="predict.py"))
