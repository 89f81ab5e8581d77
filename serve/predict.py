"""``predict.py``'s library: image files and folders in, one CSV row per image out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from oof.errors import ConfigError
from oof.images import IMAGE_EXTENSIONS
from serve.bundle import Ensemble


def expand_inputs(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders as their image files (recursively, sorted); nothing is skipped
    silently: a named file that is not there is an error."""
    out: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise ConfigError(f"{item}: folder holds no image files ({IMAGE_EXTENSIONS})")
            out.extend(found)
        elif item.is_file():
            out.append(item)
        else:
            raise ConfigError(f"{item}: no such image file or folder")
    return out


def predict_table(ensemble: Ensemble, paths: Sequence[Path], batch: int = 64) -> pd.DataFrame:
    """``id,label,<class>...`` with id = the file name; ``batch`` images decoded at a time."""
    frames = []
    for start in range(0, len(paths), batch):
        chunk = list(paths[start:start + batch])
        pred = ensemble.predict([str(p) for p in chunk])
        df = pd.DataFrame({"id": [p.name for p in chunk], "label": pred.labels()})
        df[ensemble.classes] = pred.proba
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["id", "label", *ensemble.classes])


def predict_files(stack_dir: str | Path, inputs: Sequence[str | Path], out: str | Path | None,
                  subset: str | list[str] | None = None, batch: int = 64,
                  allow_version_mismatch: bool = False) -> pd.DataFrame:
    """Load the ensemble, predict every image, write ``out`` atomically when given."""
    from oof.atomic import write_atomic

    if batch < 1:
        raise ConfigError(f"--batch {batch}: must be at least 1")
    paths = expand_inputs(inputs)  # before the (slow) model load: bad paths fail at once
    ensemble = Ensemble.load(stack_dir, subset=subset,
                             allow_version_mismatch=allow_version_mismatch)
    table = predict_table(ensemble, paths, batch)
    if out is not None:
        write_atomic(Path(out), lambda p: table.to_csv(p, index=False))
    return table
