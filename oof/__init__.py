"""The out-of-fold contract: datasets, stored folds, run folders, and loading them back."""

from oof.errors import ConfigError, DataError, FoldstackError, RunMismatchError
from oof.rundir import Run, check_compatible, find_runs, load_run

__all__ = ["ConfigError", "DataError", "FoldstackError", "RunMismatchError", "Run",
           "check_compatible", "find_runs", "load_run"]
