#!/usr/bin/env python
"""Predict image files with a stack (or an exported bundle): one CSV row per image,
``id,label,<one column per class>`` (id = the file name)."""

from __future__ import annotations

import argparse
import sys

from oof.cli import main_guard


def main(argv: list[str] | None = None) -> int | None:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__)
    parser.add_argument("stack_dir", help="stack folder written by stack.py, or a bundle")
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_FOLDER")
    parser.add_argument("--out", default=None, help="CSV file (default: print to stdout)")
    parser.add_argument("--subset", default=None,
                        help="serve fewer runs: 'greedy' or RUN,RUN (stack folders only)")
    parser.add_argument("--batch", type=int, default=64, help="images per forward pass")
    parser.add_argument("--allow-version-mismatch", action="store_true",
                        help="load models saved with other library versions (warns)")
    args = parser.parse_args(argv)
    from serve.predict import predict_files

    subset = None if not args.subset else ("greedy" if args.subset == "greedy"
                                           else args.subset.split(","))
    table = predict_files(args.stack_dir, args.inputs, args.out, subset, args.batch,
                          args.allow_version_mismatch)
    if args.out is None:
        print(table.to_csv(index=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(lambda: main(sys.argv[1:])))
