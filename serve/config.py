"""The options of ``predict.py``, ``serve.py`` and ``python -m serve.bundle``, declared like
``run_folds.py``'s (``oof.config``): one pydantic class per command, its flags built from the
fields, a YAML file (``--config``) for defaults, and a bad value refused naming its flag.

Nothing here imports Flask or a framework: ``predict.py --help`` needs neither.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from oof.config import (
    REQUIRED,
    ConfigFile,
    Name,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    config_dataclass,
    opt,
)
from oof.errors import ConfigError


@dataclass(frozen=True)
class Limits:
    """What one request may hold; the page shows them too."""

    max_bytes: int = 16 * 2**20  # the whole request (Flask's MAX_CONTENT_LENGTH)
    max_files: int = 32
    max_pixels: int = 40_000_000  # per image, read from its header before decoding: a bomb
    top_k: int = 5


def parse_subset(value: Any) -> Literal["greedy"] | list[str] | None:
    """``--subset``: '' or None (every run), 'greedy', or run names as RUN,RUN (a list in YAML
    or Python). The one reading of the option for every command; an empty name is refused
    here, a name the stack lacks when the stack is read (``serve.bundle.describe_stack``)."""
    if value is None or value == "" or value == []:
        return None
    if value == "greedy":
        return "greedy"
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = list(value)
    else:
        raise ConfigError(f"expected 'greedy' or run names RUN,RUN, got {value!r}")
    names = [v.strip() for v in items]
    if not all(names):
        raise ConfigError(f"an empty run name in {','.join(items)!r}: give 'greedy' or run "
                          "names separated by commas, e.g. RUN_A,RUN_B")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"run(s) {twice} named twice")
    return names


#: the type of every ``--subset`` field
Subset = Annotated[Literal["greedy"] | list[str] | None, BeforeValidator(parse_subset)]
Port = Annotated[NonNegativeInt, Field(le=65535)]

_STACK_DIR = ("stack folder written by stack.py, a bundle (python -m serve.bundle), or one "
              "run folder (its --refit-full model where it has one, else its fold models)")
_SUBSET = ("serve fewer runs: 'greedy' (those greedy selection keeps) or RUN,RUN; stack folders "
           "only (a bundle's runs are chosen when it is exported)")
_ALLOW = "load models saved with other library versions (warns)"


@config_dataclass
class PredictConfig(ConfigFile):
    """Everything ``predict.py`` needs: the ensemble, the images, where the CSV goes."""

    stack_dir: Name = opt(REQUIRED, _STACK_DIR, positional=True)
    inputs: list[Name] = opt(REQUIRED, "image files and folders (searched recursively)",
                             positional=True, metavar="IMAGE_OR_FOLDER")
    out: str | None = opt(None, "CSV file, written atomically (default: print to stdout)")
    subset: Subset = opt(None, _SUBSET)
    batch: PositiveInt = opt(64, "images per forward pass")
    allow_version_mismatch: bool = opt(False, _ALLOW)


@config_dataclass
class ServeConfig(ConfigFile):
    """Everything ``serve.py`` needs: the ensemble, the address, the threads, the limits."""

    stack_dir: Name = opt(REQUIRED, _STACK_DIR, positional=True)
    host: Name = opt("127.0.0.1", "address to bind (default 127.0.0.1: this machine only)")
    port: Port = opt(8000, "TCP port (0: any free port)")
    threads: PositiveInt = opt(8, "waitress worker threads")
    model_threads: PositiveInt | None = opt(
        None, "CPU threads of each framework (default: half the cores each, so the two "
        "frameworks' pools never starve each other)")
    subset: Subset = opt(None, _SUBSET)
    max_files: PositiveInt = opt(Limits.max_files, "most image files in one request")
    max_mb: PositiveFloat = opt(Limits.max_bytes / 2**20, "largest request in MB")
    max_pixels: PositiveInt = opt(Limits.max_pixels,
                                  "largest image (width x height) accepted")
    allow_version_mismatch: bool = opt(False, _ALLOW)

    @property
    def limits(self) -> Limits:
        return Limits(max_bytes=int(self.max_mb * 2**20), max_files=self.max_files,
                      max_pixels=self.max_pixels)


@config_dataclass
class BundleConfig(ConfigFile):
    """Everything ``python -m serve.bundle`` needs: the stack, the new folder, the runs kept."""

    stack_dir: Name = opt(REQUIRED, "stack folder written by stack.py, or one run folder (its "
                           "--refit-full model where it has one)", positional=True)
    out: Name = opt(REQUIRED, "new folder for the bundle (must not exist)")
    subset: Subset = opt(None, "serve fewer runs: 'greedy' (those greedy selection keeps) or "
                         "RUN,RUN; the manifest shows its score")
