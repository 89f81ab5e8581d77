"""The analysis as files: one self-contained HTML page, plus the same numbers as JSON and Markdown.

The HTML embeds every picture as a base64 PNG, so it opens from disk, mailed or archived, with no
server and nothing beside it. Plots use matplotlib's object API on the Agg canvas (imported here,
lazily): no pyplot, so a notebook's backend is never switched. Thumbnails of the hardest images
are the only pixels read, through ``oof.images.read_rgb``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from oof.analysis import Analysis
from oof.atomic import write_text
from oof.cli import format_table
from oof.distill import STUDENT_FOOTNOTE

log = logging.getLogger(__name__)

HTML_NAME, JSON_NAME, MD_NAME = "report.html", "report.json", "report.md"
THUMB_SIZE = 128
ANNOTATE_MAX = 12  # annotate heatmap cells with numbers only up to this many rows/columns
MD_CONFUSION_MAX = 30  # larger confusion matrices go to the JSON only


# ---------------------------------------------------------------- figures


def _figure(width: float, height: float, layout: str | None = "constrained") -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _grid(n: int, max_cols: int) -> tuple[int, int]:
    cols = min(n, max_cols)
    return math.ceil(n / cols), cols


def _short(text: str, n: int = 18) -> str:
    return text if len(text) <= n else text[: n - 1] + "\u2026"


def _heatmap(ax: Any, values: np.ndarray, labels_x: list[str], labels_y: list[str], title: str,
             fmt: str, vmin: float | None = None, vmax: float | None = None,
             color_values: np.ndarray | None = None, cmap: str = "viridis",
             skip_zero: bool = False, label_len: int = 18) -> None:
    shown = values if color_values is None else color_values
    im = ax.imshow(shown, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_title(title, fontsize=9)
    if max(len(labels_x), len(labels_y)) <= 40:
        ax.set_xticks(range(len(labels_x)), [_short(s, label_len) for s in labels_x],
                      rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(labels_y)), [_short(s, label_len) for s in labels_y], fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if max(values.shape) <= ANNOTATE_MAX:
        for (i, j), v in np.ndenumerate(values):
            if np.isnan(v) or (skip_zero and v == 0):
                continue
            c = shown[i, j]
            r, g, b, _ = im.cmap(im.norm(c)) if not np.isnan(c) else (1, 1, 1, 1)
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5  # text colour by cell luminance
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")


def fold_spread_figure(a: Analysis) -> bytes:
    """Accuracy of each fold per run (dots) with the run's OOF accuracy (bar)."""
    fig = _figure(min(2 + 0.9 * len(a.runs), 14), 3.6)
    ax = fig.add_subplot()
    for i, r in enumerate(a.runs):
        ax.bar(i, r.accuracy, color="#c6dbef", width=0.6)
        pf = r.per_fold
        ax.scatter(np.full(len(pf), i) + np.linspace(-0.15, 0.15, len(pf)), pf["accuracy"],
                   color="#08519c", s=18, zorder=3)
    accs = np.concatenate([r.per_fold["accuracy"].to_numpy() for r in a.runs])
    lo = float(np.nanmin(accs)) if len(accs) else 0.0
    ax.set_ylim(max(0.0, lo - 0.05), min(1.0, float(np.nanmax(accs)) + 0.02) if len(accs) else 1)
    ax.set_xticks(range(len(a.runs)), [_short(n, 24) for n in a.names], rotation=20, ha="right",
                  fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_title("OOF accuracy (bar) and accuracy of each fold (dots)", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def confusion_figure(a: Analysis) -> bytes:
    """One confusion matrix per run; colour is the row-normalised share, numbers are counts."""
    rows, cols = _grid(len(a.runs), 3)
    c = len(a.classes)
    side = 3.2 if c <= 12 else min(6.0, 3.2 + c / 40)
    fig = _figure(side * cols + 0.5, side * rows + 0.3)
    for k, r in enumerate(a.runs):
        ax = fig.add_subplot(rows, cols, k + 1)
        cm = r.confusion.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            share = cm / cm.sum(axis=1, keepdims=True)
        _heatmap(ax, cm, a.classes, a.classes, f"{_short(r.name, 30)}", "{:.0f}", 0.0, 1.0,
                 color_values=share, cmap="Blues", skip_zero=True)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    return _png(fig)


def pairwise_figure(a: Analysis) -> bytes:
    """Correlation, disagreement and one-right-other-wrong counts between runs."""
    n = len(a.runs)
    side = max(3.6, min(6.0, 1.5 + 0.45 * n))
    fig = _figure(side * 3, side)
    names = a.names
    axes = fig.subplots(1, 3)
    corr = a.correlation.to_numpy()
    off = corr[~np.eye(n, dtype=bool)]
    lo, hi = (float(np.nanmin(off)), float(np.nanmax(off))) if n > 1 else (0.0, 1.0)
    _heatmap(axes[0], corr, names, names,  # colours span the off-diagonal cells only
             "correlation of OOF probabilities", "{:.3f}", lo, hi if hi > lo else lo + 1e-9,
             label_len=28)
    _heatmap(axes[1], a.disagreement.to_numpy(), names, names,
             "disagreement rate (arg-max differs)", "{:.3f}", 0.0, label_len=28)
    _heatmap(axes[2], a.one_right_other_wrong.to_numpy().astype(np.float64), names, names,
             "row run right,\ncolumn run wrong (rows)", "{:.0f}", 0.0, label_len=28)
    return _png(fig)


def reliability_figure(a: Analysis) -> bytes:
    """Reliability diagram per run: accuracy against mean confidence in each bin."""
    rows, cols = _grid(len(a.runs), 4)
    fig = _figure(3.0 * cols + 0.3, 3.0 * rows + 0.3)
    for k, r in enumerate(a.runs):
        ax = fig.add_subplot(rows, cols, k + 1)
        rel = r.reliability
        width = float(rel["upper"].iloc[0] - rel["lower"].iloc[0])
        mids = (rel["lower"] + rel["upper"]).to_numpy() / 2
        acc = rel["accuracy"].fillna(0).to_numpy()
        ax.bar(mids, acc, width=width * 0.95, color="#6baed6", edgecolor="#08519c",
               linewidth=0.5, label="accuracy")
        conf = rel["confidence"].to_numpy()
        ok = ~np.isnan(conf)
        ax.plot(mids[ok], conf[ok], "o", color="#d94801", ms=3, label="mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
        share = rel["count"].to_numpy() / max(int(rel["count"].sum()), 1)
        ax.bar(mids, share * 0.25, width=width * 0.95, bottom=0, color="none",
               edgecolor="#a50f15", linewidth=0.6, hatch="///", label="share of rows (x0.25)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{_short(r.name, 26)}\nECE {r.ece:.4f} (chance {r.ece_floor:.4f})",
                     fontsize=9)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            fig.legend(loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return _png(fig)


def learning_curves_figure(a: Analysis) -> bytes | None:
    """Loss and accuracy per epoch, one line per fold (solid validation, dashed training)."""
    from matplotlib.ticker import MaxNLocator

    with_hist = [r for r in a.runs if r.history is not None]
    if not with_hist:
        return None
    # a regular grid: fixed margins in inches instead of constrained layout (half the time)
    height = 2.6 * len(with_hist) + 0.6
    fig = _figure(10, height, layout=None)
    axes = np.atleast_2d(fig.subplots(len(with_hist), 2, squeeze=False))
    fig.subplots_adjust(left=0.06, right=0.98, wspace=0.18, top=1 - 0.35 / height,
                        bottom=0.5 / height, hspace=0.75 / 2.2)
    for n, (row, r) in enumerate(zip(axes, with_hist, strict=True)):
        hist = r.history
        assert hist is not None
        folds = sorted(hist["fold"].unique()) if "fold" in hist.columns else [None]
        for ax, metric in zip(row, ("loss", "accuracy"), strict=True):
            for k, f in enumerate(folds):
                h = hist if f is None else hist[hist["fold"] == f]
                color = f"C{k % 10}"
                x = h["epoch"].to_numpy() + 1
                if f"val_{metric}" in h.columns:
                    ax.plot(x, h[f"val_{metric}"], "-o", ms=3, color=color, label=f"fold {f} val")
                if metric in h.columns:
                    ax.plot(x, h[metric], "--", color=color, alpha=0.7, label=f"fold {f} train")
            ax.set_title(f"{_short(r.name, 40)}: {metric}", fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        if n == 0:  # one legend: the folds are the same in every run
            row[1].legend(fontsize=6, ncol=2, loc="lower right")
    return _png(fig)


def cost_front_figure(front: list[dict[str, Any]], points: list[dict[str, Any]], metric: str,
                      title: str) -> bytes:
    """Level-2 CV log loss and accuracy against passes per image: every subset scored (grey),
    the front (each point better by ``metric`` than all cheaper ones) as a line, the chosen
    point (``chosen`` non-empty) ringed, held-out scores as crosses where present."""
    fig = _figure(10, 3.8)
    axes = fig.subplots(1, 2)
    for ax, key in zip(axes, ("log_loss", "accuracy"), strict=True):
        ax.scatter([p["passes"] for p in points], [p[key] for p in points], s=12,
                   color="#bbbbbb", label="subsets (CV)")
        ax.plot([p["passes"] for p in front], [p[key] for p in front], "-o", color="#08519c",
                ms=4, label=f"front by {metric} (CV)")
        held = [p for p in front if p.get(f"held_out_{key}") is not None]
        if held:
            ax.plot([p["passes"] for p in held], [p[f"held_out_{key}"] for p in held], "x--",
                    color="#d94801", label="front, held-out")
        for p in front:
            if p.get("chosen"):
                ax.scatter([p["passes"]], [p[key]], s=140, facecolors="none",
                           edgecolors="#a50f15", linewidths=2, label="chosen", zorder=3)
        ax.set_xlabel("forward passes per image", fontsize=8)
        ax.set_ylabel(f"level-2 {key}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Cost front ({title})", fontsize=10)
    return _png(fig)


MAX_DUPLICATE_GROUPS = 30  # shown with thumbnails; all of them are in report.json


def thumbnail(path: str, size: int = THUMB_SIZE) -> bytes:
    """PNG of one image fitted into ``size`` px (tiny images scaled up, pixels kept sharp)."""
    from PIL import Image

    from oof.images import read_rgb

    img = Image.fromarray(read_rgb(path))
    scale = size / max(img.size)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    resample = Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS
    img = img.resize(new, resample)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def thumbnails(a: Analysis, size: int = THUMB_SIZE) -> dict[str, bytes]:
    """Thumbnails of the hardest images and of the near-duplicates shown; unreadable files
    are logged and left out."""
    out = {}
    wanted = list(a.hardest["id"])
    if a.duplicates is not None:
        wanted += [i for g in a.duplicates.groups[:MAX_DUPLICATE_GROUPS] for i in g]
        wanted += [k for t, u, _ in a.duplicates.train_test_pairs[:MAX_DUPLICATE_GROUPS]
                   for k in (t, f"test:{u}")]
    for image_id in dict.fromkeys(wanted):
        path = a.image_paths.get(image_id)
        if path is None:
            continue
        try:
            out[image_id] = thumbnail(path, size)
        except (OSError, ValueError) as exc:
            log.warning("%s: thumbnail not readable (%s)", path, exc)
    return out


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1400px;
padding:16px 28px;color:#1b1b1b;background:#fff}
h1{font-size:1.5em;margin-bottom:0}
h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}
.sub{color:#555;margin-top:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.l,th.l{text-align:left}
tr.ens td{font-style:italic;background:#fafafa}
td.best{font-weight:bold;color:#0a5a0a}
img.fig{max-width:100%;height:auto;display:block;margin:8px 0}
.note{color:#555;font-size:13px;max-width:900px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:8px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:140px}
.card b{display:block;font-size:1.4em}
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.dup{border-top:1px solid #ddd;margin:6px 0}.dup p{margin:4px 0;font-size:13px}
figure{margin:0;border:1px solid #ddd;border-radius:6px;padding:6px;text-align:center;
font-size:12px}
figure img{width:128px;height:128px;object-fit:contain;image-rendering:pixelated;background:#eee}
figcaption{text-align:left;word-break:break-word}
.t{color:#0a5a0a}.p{color:#a50f15}
details{margin:6px 0}summary{cursor:pointer;color:#08519c}
"""


def _num(v: Any, fmt: str = "{:.4f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "\u2013"
    if isinstance(v, (float, np.floating)):
        return fmt.format(v)
    return str(v)


def _data_uri(png: bytes | None) -> str | None:
    return None if not png else "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _table(df: pd.DataFrame, fmt: dict[str, str] | None = None, left: tuple[str, ...] = (),
           best: dict[str, str] | None = None, row_class: list[str] | None = None) -> dict:
    """A table for the template's ``table`` macro; ``best`` marks a column's max/min in bold."""
    fmt = fmt or {}
    marks: dict[str, Any] = {}
    for col, how in (best or {}).items():
        vals = pd.to_numeric(df[col], errors="coerce")
        if vals.notna().any():
            marks[col] = vals.max() if how == "max" else vals.min()
    rows = []
    for n, (_, row) in enumerate(df.iterrows()):
        cells = []
        for c in df.columns:
            cls = ["l"] if c in left else []
            if c in marks and row[c] == marks[c]:
                cls.append("best")
            cells.append((_num(row[c], fmt.get(c, "{:.4f}")), " ".join(cls)))
        rows.append({"cls": row_class[n] if row_class else "", "cells": cells})
    return {"head": [(str(c), "l" if c in left else "") for c in df.columns], "rows": rows}


def _heat_table(df: pd.DataFrame) -> dict:
    """Class x run values in [0, 1] for the ``heat`` macro: hue red (the table's worst value) to
    green (1); None for a missing value."""
    vals = df.to_numpy(np.float64)
    lo = float(np.nanmin(vals)) if np.isfinite(vals).any() else 0.0
    lo = min(lo, 0.999)
    rows = []
    for cls, row in df.iterrows():
        cells: list[tuple[str, int | None]] = []
        for v in row:
            if v is None or np.isnan(v):
                cells.append(("\u2013", None))
            else:
                cells.append((f"{v:.3f}", int(120 * max(0.0, (float(v) - lo) / (1.0 - lo)))))
        rows.append((str(cls), cells))
    return {"columns": [str(c) for c in df.columns], "rows": rows}


def _summary_frame(a: Analysis) -> pd.DataFrame:
    s = a.summary()
    ens = {"run": "ensemble mean", "level": None,
           "backbone": "mean of " + ", ".join(a.ensemble_members), **a.ensemble}
    return pd.concat([s, pd.DataFrame([ens])], ignore_index=True)


def _hardest(a: Analysis, thumbs: dict[str, bytes]) -> list[dict]:
    return [{"src": _data_uri(thumbs.get(r.id)), "id": r.id, "true": r.true,
             "predicted": r.predicted, "confidence": f"{r.confidence:.2f}",
             "p_true": f"{r.p_true:.3f}", "runs_wrong": r.runs_wrong, "fold": r.fold}
            for r in a.hardest.itertuples(index=False)]


def _duplicates(a: Analysis, thumbs: dict[str, bytes]) -> dict | None:
    d = a.duplicates
    if d is None:
        return None
    labels = a.image_labels
    mixed = {tuple(g) for g in d.mixed_label_groups}

    def image(key: str, small: str, label: str | None) -> dict:
        return {"src": _data_uri(thumbs.get(key)), "id": key, "small": small, "label": label}

    groups = [{"mixed": tuple(g) in mixed,
               "images": [image(i, i, labels.get(i, "")) for i in g]}
              for g in d.groups[:MAX_DUPLICATE_GROUPS]]
    pairs = [{"distance": dist,
              "images": [image(t, f"train {t} ({labels.get(t, '')})", None),
                         image(f"test:{u}", f"test {u}", None)]}
             for t, u, dist in d.train_test_pairs[:MAX_DUPLICATE_GROUPS]]
    return {"max_distance": d.max_distance, "n_groups": len(d.groups),
            "n_mixed": len(d.mixed_label_groups), "n_pairs": len(d.train_test_pairs),
            "groups": groups, "more": max(0, len(d.groups) - MAX_DUPLICATE_GROUPS),
            "pairs": pairs}


def build_html(a: Analysis, figures: dict[str, bytes | None], thumbs: dict[str, bytes],
               title: str) -> str:
    """The whole page, rendered from ``templates/report.html.j2`` (Jinja2, autoescaped)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("oof", "templates"),
                             autoescape=True, undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)
    o = a.oracle
    prov = pd.DataFrame([{"run": r.name, "level": r.level, "path": r.path} for r in a.runs])
    return env.get_template("report.html.j2").render(
        title=title, css=CSS, runs=a.names, n_rows=a.n_rows, n_classes=len(a.classes),
        fingerprint=a.fingerprint, generated=f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M}",
        n_bins=a.n_bins,
        summary=_table(_summary_frame(a), fmt={"level": "{:.0f}"}, left=("run", "backbone"),
                       best={"accuracy": "max", "log_loss": "min", "ece": "min"},
                       row_class=[""] * len(a.runs) + ["ens"]),
        oracle={"accuracy": _num(o["oracle_accuracy"]),
                "best_single": _num(o["best_single_accuracy"]), "gain": _num(o["oracle_gain"]),
                "all_wrong": o["rows_all_wrong"], "rows": o["rows"],
                "some_right": o["rows_some_right"]},
        figures={k: _data_uri(v) for k, v in figures.items()},
        per_fold=_table(a.per_fold(), fmt={"fold": "{:.0f}", "n": "{:.0f}"}, left=("run",)),
        recall=_heat_table(a.per_class("recall")),
        precision=_heat_table(a.per_class("precision")),
        recall_open=len(a.classes) <= MD_CONFUSION_MAX,
        hardest=_hardest(a, thumbs), have_thumbs=bool(thumbs), dup=_duplicates(a, thumbs),
        no_history=[r.name for r in a.runs if r.history is None],
        student_note=STUDENT_FOOTNOTE if a.students else None,
        provenance=_table(prov, fmt={"level": "{:.0f}"}, left=("run", "path")))


# ---------------------------------------------------------------- Markdown


def _md_frame(df: pd.DataFrame, index_name: str | None = None) -> str:
    if index_name is not None:
        df = df.reset_index().rename(columns={"index": index_name})
    rows = [{str(k): (None if isinstance(v, float) and math.isnan(v) else v)
             for k, v in r.items()} for r in df.to_dict("records")]
    return format_table(rows, [str(c) for c in df.columns])


def build_markdown(a: Analysis, title: str) -> str:
    """The report's numbers as Markdown tables (the pictures are in the HTML)."""
    o = a.oracle
    out = [f"# {title}", "",
           f"{len(a.runs)} runs, {a.n_rows} OOF rows, {len(a.classes)} classes, "
           f"fold fingerprint `{a.fingerprint}`.", "", "## Runs", "",
           _md_frame(_summary_frame(a)), "", *([STUDENT_FOOTNOTE, ""] if a.students else []),
           f"Oracle accuracy (some run right): {o['oracle_accuracy']:.4f}; best single run "
           f"{o['best_single_accuracy']:.4f}; oracle gain {o['oracle_gain']:.4f}; rows all runs "
           f"get wrong: {o['rows_all_wrong']} of {o['rows']}.", "",
           f"ECE: {a.n_bins} equal-width bins of top-label confidence on [0, 1].", "",
           "## Per fold", "", _md_frame(a.per_fold()), "",
           "## Recall per class", "", _md_frame(a.per_class("recall"), "class"), "",
           "## Precision per class", "", _md_frame(a.per_class("precision"), "class"), "",
           "## Between runs", "", "Correlation of OOF probabilities:", "",
           _md_frame(a.correlation.rename_axis("run").reset_index()), "",
           "Disagreement rate:", "", _md_frame(a.disagreement.rename_axis("run").reset_index()),
           "", "Rows the row-run gets right and the column-run wrong:", "",
           _md_frame(a.one_right_other_wrong.rename_axis("run").reset_index()), "",
           "## Confusion matrices (rows true, columns predicted)", ""]
    if len(a.classes) > MD_CONFUSION_MAX:
        out += [f"{len(a.classes)} classes: the matrices are in report.json (runs.<run>.confusion)"
                " and pictured in report.html.", ""]
    for r in a.runs if len(a.classes) <= MD_CONFUSION_MAX else []:
        cm = pd.DataFrame(r.confusion, index=a.classes, columns=a.classes)
        out += [f"### {r.name}", "", _md_frame(cm.rename_axis("true").reset_index()), ""]
    out += ["## Hardest images (ensemble mean most confidently wrong)", "",
            _md_frame(a.hardest.assign(path=[a.image_paths.get(i) for i in a.hardest["id"]])),
            ""]
    d = a.duplicates
    if d is not None:
        out += ["## Near-duplicates (perceptual hash)", "",
                f"{len(d.groups)} groups of 2+ training images within {d.max_distance} bits, "
                f"{len(d.mixed_label_groups)} with mixed labels; {len(d.train_test_pairs)} "
                "train/test pairs.", ""]
        out += [f"- {', '.join(g)}" + (" (mixed labels)" if g in d.mixed_label_groups else "")
                for g in d.groups[:MAX_DUPLICATE_GROUPS]]
        out += [f"- train {t} / test {u} (distance {dist})"
                for t, u, dist in d.train_test_pairs[:MAX_DUPLICATE_GROUPS]] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------- all files


def render_figures(a: Analysis) -> dict[str, bytes | None]:
    """Every plot of the report as PNG bytes (``curves`` is None without histories)."""
    return {"folds": fold_spread_figure(a), "confusion": confusion_figure(a),
            "pairwise": pairwise_figure(a), "reliability": reliability_figure(a),
            "curves": learning_curves_figure(a)}


def write_report(a: Analysis, out_dir: str | Path, title: str = "OOF analysis",
                 with_thumbnails: bool = True, thumb_size: int = THUMB_SIZE) -> dict[str, Path]:
    """Write report.html (self-contained), report.json and report.md into ``out_dir``."""
    out = Path(out_dir)
    figures = render_figures(a)
    thumbs = thumbnails(a, thumb_size) if with_thumbnails else {}
    paths = {"html": out / HTML_NAME, "json": out / JSON_NAME, "md": out / MD_NAME}
    write_text(paths["html"], build_html(a, figures, thumbs, title))
    write_text(paths["json"], json.dumps({"title": title, **a.to_dict()}, indent=1,
                                         allow_nan=False) + "\n")
    write_text(paths["md"], build_markdown(a, title))
    return paths
