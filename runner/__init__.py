"""Running fold jobs: the layer above the OOF contract (``oof``) and the adapters (``backbones``).

``oof`` holds the contract (datasets, folds, image cache, run folders) and never imports a
backbone; this package joins the two, so every import points down.
"""

from runner.run import RunSummary, run_folds

__all__ = ["RunSummary", "run_folds"]
