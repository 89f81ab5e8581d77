"""The commands of the serving layer: ``predict.py``/``foldstack-predict``,
``serve.py``/``foldstack-serve`` and ``python -m serve.bundle``/``foldstack-bundle``.

Each ``*_main`` parses its config (``serve.config``) and calls one library function; each
``*_cli`` is that run under ``oof.cli.main_guard`` (a FoldstackError -> one line, exit status 2),
the function the root scripts and the console scripts call.
"""

from __future__ import annotations

import json

from oof.cli import main_guard
from oof.config import parse_config
from serve.config import BundleConfig, PredictConfig, ServeConfig

PREDICT_DOC = ("Predict image files with a stack, an exported bundle or one run folder: one CSV "
               "row per image, id,label,<one column per class> (id = the file name).")
SERVE_DOC = ("Serve a stack, an exported bundle or one run folder over HTTP: an upload page at /, "
             "POST /predict (multipart field 'file', one or more images) and GET /health, on a "
             "waitress WSGI server.")
BUNDLE_DOC = ("Export a stack folder (or one run folder) as a self-contained bundle (manifest, "
              "stacker, model weights).")


def predict_main(argv: list[str] | None = None, prog: str = "foldstack-predict") -> int:
    from serve.predict import predict_files

    cfg = parse_config(PredictConfig, argv, prog, PREDICT_DOC)
    table = predict_files(cfg.stack_dir, cfg.inputs, cfg.out, cfg.subset, cfg.batch,
                          cfg.allow_version_mismatch)
    if cfg.out is None:
        print(table.to_csv(index=False), end="")
    return 0


def serve_main(argv: list[str] | None = None, prog: str = "foldstack-serve") -> int:
    from serve.wsgi import serve

    cfg = parse_config(ServeConfig, argv, prog, SERVE_DOC)
    serve(cfg.stack_dir, cfg.host, cfg.port, cfg.threads, cfg.limits, cfg.subset,
          cfg.allow_version_mismatch, cfg.model_threads)
    return 0


def bundle_main(argv: list[str] | None = None, prog: str = "foldstack-bundle") -> int:
    from serve.bundle import MANIFEST, export_bundle

    cfg = parse_config(BundleConfig, argv, prog, BUNDLE_DOC)
    out = export_bundle(cfg.stack_dir, cfg.out, cfg.subset)
    manifest = json.loads((out / MANIFEST).read_text())
    print(f"bundle {out}: {len(manifest['runs'])} runs, stacker "
          f"{manifest['stacker']['method']}, level-2 {manifest['stacker']['level2_scores']}")
    if manifest.get("subset"):
        s = manifest["subset"]
        print(f"subset ({s['rule']}): kept {s['kept']}, dropped {s['dropped']}; level-2 "
              f"{s['level2_scores']} vs {s['full_level2_scores']} with all runs")
    return 0


def predict_cli(argv: list[str] | None = None, prog: str = "foldstack-predict") -> int:
    return main_guard(lambda: predict_main(argv, prog))


def serve_cli(argv: list[str] | None = None, prog: str = "foldstack-serve") -> int:
    return main_guard(lambda: serve_main(argv, prog))


def bundle_cli(argv: list[str] | None = None, prog: str = "foldstack-bundle") -> int:
    return main_guard(lambda: bundle_main(argv, prog))
