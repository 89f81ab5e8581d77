"""Analyse the OOF files of a run root: HTML report plus the same numbers as JSON and Markdown.

Usage: python -m oof.analyze RUN_ROOT [--runs NAME ...] [--out DIR] (RUN_ROOT first, or
--run-root). All complete runs of the root by default; a mismatched set is refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

from oof.analysis import DEFAULT_BINS, DEFAULT_HARDEST
from oof.cli import format_table, main_guard
from oof.config import PositiveInt, config_dataclass, opt, parse_config, save_config
from oof.errors import ConfigError


@config_dataclass
class AnalyzeConfig:
    """Options of ``python -m oof.analyze``."""

    config: str | None = opt(None, "YAML file of defaults; flags given here override it")
    run_root: str | None = opt(None, "run root (runs/<dataset>); may be given first, positionally")
    runs: list = opt([], "run folder names to analyse (default: every complete run of the root)")
    out: str | None = opt(None, "output folder (default: RUN_ROOT/analysis)")
    title: str | None = opt(None, "report title (default: 'OOF analysis: <run root name>')")
    bins: PositiveInt = opt(DEFAULT_BINS, "equal-width confidence bins for calibration (ECE)")
    hardest: PositiveInt = opt(DEFAULT_HARDEST, "how many most confidently wrong images to show")
    thumbnails: bool = opt(True, "read the hardest images from the dataset for thumbnails")
    thumb_size: PositiveInt = opt(128, "thumbnail size in pixels (longest side)")


def _positional_root(argv: list[str]) -> list[str]:
    """Accept RUN_ROOT as the first argument by turning it into --run-root."""
    if argv and not argv[0].startswith("-"):
        return ["--run-root", argv[0], *argv[1:]]
    return argv


def main(argv: list[str] | None = None) -> int:
    from oof.analysis import analyze, load_runs
    from oof.report import write_report

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_config(AnalyzeConfig, _positional_root(argv), "python -m oof.analyze",
                       __doc__ or "")
    if not cfg.run_root:
        raise ConfigError("give the run root: python -m oof.analyze RUN_ROOT")
    for name, value in (("bins", cfg.bins), ("hardest", cfg.hardest),
                        ("thumb-size", cfg.thumb_size)):
        if value < (0 if name == "hardest" else 1):
            raise ConfigError(f"--{name} {value}: must be positive")
    root = Path(cfg.run_root)
    runs = load_runs(root, [str(r) for r in cfg.runs] or None)
    analysis = analyze(runs, n_bins=cfg.bins, n_hardest=cfg.hardest,
                       find_images=cfg.thumbnails)
    out = Path(cfg.out) if cfg.out else root / "analysis"
    title = cfg.title or f"OOF analysis: {root.resolve().name}"
    paths = write_report(analysis, out, title, with_thumbnails=cfg.thumbnails,
                         thumb_size=cfg.thumb_size)
    save_config(cfg, out / "analyze_config.yaml")
    rows = analysis.summary().to_dict("records")
    print(format_table(rows, ["run", "level", "accuracy", "log_loss", "ece", "fold_acc_std"]))
    o = analysis.oracle
    print(f"oracle accuracy {o['oracle_accuracy']:.4f} "
          f"(best single {o['best_single_accuracy']:.4f})  "
          f"ensemble mean {analysis.ensemble['accuracy']:.4f}")
    for kind, p in paths.items():
        print(f"{kind:5s} {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main_guard(main))
