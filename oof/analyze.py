"""Analyse the OOF files of a run root: HTML report plus the same numbers as JSON and Markdown.

Usage: python -m oof.analyze [--data DATA] [--out OUT] [--runs NAME ...] [--report-dir DIR]
(installed, also ``foldstack-analyze``).
The run root is named as in run_folds.py and stack.py: OUT/<dataset name> (defaults: the demo,
runs/). All complete runs of the root by default; a mismatched set is refused.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from oof.analysis import DEFAULT_BINS, DEFAULT_HARDEST
from oof.cli import format_table, main_guard
from oof.config import (
    DatasetConfig,
    PositiveInt,
    config_dataclass,
    opt,
    parse_config,
    save_config,
)
from oof.distill import STUDENT_FOOTNOTE
from oof.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@config_dataclass
class AnalyzeConfig(DatasetConfig):
    """Options of ``python -m oof.analyze``: the dataset flags of every script, then its own."""

    runs: list = opt([], "run folder names to analyse (default: every complete run of the root)")
    report_dir: str | None = opt(None, "folder of the report (default: <run root>/analysis)")
    title: str | None = opt(None, "report title (default: 'OOF analysis: <run root name>')")
    bins: PositiveInt = opt(DEFAULT_BINS, "equal-width confidence bins for calibration (ECE)")
    hardest: PositiveInt = opt(DEFAULT_HARDEST, "how many most confidently wrong images to show")
    thumbnails: bool = opt(True, "read the hardest images from the dataset for thumbnails")
    thumb_size: PositiveInt = opt(128, "thumbnail size in pixels (longest side)")
    duplicates: bool = opt(True, "list near-duplicate training images and train/test pairs "
                           "(perceptual hash, cached in the run root) with thumbnails")


def run_root(cfg: DatasetConfig) -> Path:
    """OUT/<dataset name>: the one rule every script uses to find a dataset's run root."""
    from oof.datasets import load_dataset

    return Path(cfg.out) / load_dataset(cfg.data, cfg.layout, cfg.test).name


def main(argv: list[str] | None = None, prog: str = "python -m oof.analyze") -> int:
    from oof.analysis import analyze, load_runs
    from oof.report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        raise ConfigError(
            f"{argv[0]!r}: name the run root as run_folds.py and stack.py do, with --data DATA "
            "--out OUT (run root OUT/<dataset name>), e.g. python -m oof.analyze --data demo")
    cfg = parse_config(AnalyzeConfig, argv, prog, __doc__ or "")
    for name, value in (("bins", cfg.bins), ("hardest", cfg.hardest),
                        ("thumb-size", cfg.thumb_size)):
        if value < (0 if name == "hardest" else 1):
            raise ConfigError(f"--{name} {value}: must be positive")
    root = run_root(cfg)
    runs = load_runs(root, [str(r) for r in cfg.runs] or None)
    analysis = analyze(runs, n_bins=cfg.bins, n_hardest=cfg.hardest,
                       find_images=cfg.thumbnails)
    if cfg.duplicates:
        from oof.datasets import load_dataset
        from oof.duplicates import dataset_duplicates

        try:
            analysis.duplicates, paths_of, analysis.image_labels = dataset_duplicates(
                load_dataset(cfg.data, cfg.layout, cfg.test), root / "cache")
            analysis.image_paths.update(paths_of)
        except (DataError, OSError) as exc:  # the OOF analysis stands without the images
            log.warning("near-duplicates not checked: %s", str(exc).splitlines()[0])
    out = Path(cfg.report_dir) if cfg.report_dir else root / "analysis"
    title = cfg.title or f"OOF analysis: {root.resolve().name}"
    paths = write_report(analysis, out, title, with_thumbnails=cfg.thumbnails,
                         thumb_size=cfg.thumb_size)
    save_config(cfg, out / "analyze_config.yaml")
    rows = analysis.summary().to_dict("records")
    print(format_table(rows, ["run", "level", "accuracy", "log_loss", "ece", "ece_floor",
                              "fold_acc_std"]))
    if analysis.students:
        print(STUDENT_FOOTNOTE)
    o = analysis.oracle
    print(f"oracle accuracy {o['oracle_accuracy']:.4f} "
          f"(best single {o['best_single_accuracy']:.4f})  "
          f"ensemble mean {analysis.ensemble['accuracy']:.4f}")
    if analysis.duplicates is not None:
        d = analysis.duplicates
        print(f"near-duplicates: {len(d.groups)} groups in train ({len(d.mixed_label_groups)} "
              f"with mixed labels), {len(d.train_test_pairs)} train/test pairs")
    for kind, p in paths.items():
        print(f"{kind:5s} {p}")
    return 0


def cli(argv: list[str] | None = None, prog: str = "foldstack-analyze") -> int:
    """``main`` under ``main_guard``: ``python -m oof.analyze`` and ``foldstack-analyze``."""
    return main_guard(lambda: main(argv, prog))


if __name__ == "__main__":
    sys.exit(cli(prog="python -m oof.analyze"))
