"""The report's plots over optimizer steps (training loss, learning rate, dev scores), drawn by
matplotlib as SVG text that the page embeds inline.

matplotlib is used through its object API with the SVG canvas set explicitly (no pyplot, no
global backend, no display), text drawn as paths (the page needs no font), and the metadata
block dropped (it names remote vocabularies). Several SVGs share one HTML document, so every
id inside one is prefixed with the plot's name: matplotlib's ids (clip paths, glyphs, markers)
would otherwise repeat across the page.
"""
from __future__ import annotations

import io
import math
import re

import matplotlib
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure

from fla_ds.report.run import is_number

SIZE = (7.2, 2.8)  # inches; the page scales the SVG to its column
DEV_SCORES = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "bleu_13a")
_REFERENCE = re.compile(r'(\bid="|href="#|url\(#)([^")]+)([")])')


def scoped_ids(svg: str, prefix: str) -> str:
    """``svg`` with every id it defines, and every reference to one, prefixed by ``prefix``."""
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    return _REFERENCE.sub(lambda m: m.group(1) + (prefix + m.group(2) if m.group(2) in ids else m.group(2)) + m.group(3), svg)


def svg_text(fig: Figure, name: str) -> str:
    """The figure as an ``<svg>`` element for inline use: no XML prolog, no metadata, ids
    prefixed with ``name``, the same bytes for the same figure (fixed hash salt)."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": f"fla-ds-{name}"}):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.S)
    return scoped_ids(svg, f"{name}-")


def new_axes(title: str, ylabel: str):
    """A figure on the SVG canvas and its one axes, titled and labelled."""
    fig = Figure(figsize=SIZE, layout="constrained")
    FigureCanvasSVG(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def finite_points(values: dict[int, float]) -> tuple[list[int], list[float]]:
    """(steps, values) in step order, non-finite values left out (a diverged step)."""
    pairs = sorted((s, float(v)) for s, v in values.items() if math.isfinite(v))
    return [s for s, _ in pairs], [v for _, v in pairs]


def marker_for(count: int) -> str | None:
    """Dots on a curve with few points, where a line alone would hide them."""
    return "o" if count <= 30 else None


def series_plot(values: dict[int, float], name: str, title: str, ylabel: str, eval_steps: list[int] = (), log_scale: bool = False) -> str:
    """One training series (step -> value) as an SVG line plot, evaluation steps marked by
    faint vertical lines."""
    fig, ax = new_axes(title, ylabel)
    steps, ys = finite_points(values)
    ax.plot(steps, ys, marker=marker_for(len(steps)), markersize=3, linewidth=1.2, color="C0")
    for step in eval_steps:
        ax.axvline(step, color="0.6", linewidth=0.8, linestyle=":")
    if log_scale and ys and min(ys) > 0:
        ax.set_yscale("log")
    return svg_text(fig, name)


def scores_plot(scores: dict[int, dict], split: str, best_step: int | None, xlim: tuple[float, float] | None = None) -> str:
    """The dev scores (bleu1..4, rouge_l, bleu_13a, whichever were computed) at each
    evaluation, the best checkpoint marked."""
    fig, ax = new_axes(f"{split} scores at each evaluation", "score (0-100)")
    highest = 0.0
    for key in DEV_SCORES:
        steps, ys = finite_points({s: v[key] for s, v in scores.items() if key in v})
        if steps:
            ax.plot(steps, ys, marker="o", markersize=4, linewidth=1.2, label=key)
            highest = max(highest, *ys)
    ax.set_ylim(0, max(1.0, highest * 1.1))  # scores start at 0; all-zero scores still get an axis
    if best_step is not None:
        ax.axvline(best_step, color="0.3", linewidth=1, linestyle="--", label=f"best (step {best_step})")
    if xlim is not None and xlim[1] > xlim[0]:
        ax.set_xlim(*xlim)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False)
    return svg_text(fig, "scores")


def training_plots(steps: dict[int, dict], scores: dict[int, dict], split: str, best_step: int | None) -> list[tuple[str, str]]:
    """(caption, svg) of each plot that has data: training loss, learning rate, dev scores."""
    eval_steps = sorted(scores)
    loss = {s: r["loss"] for s, r in steps.items() if is_number(r.get("loss"))}
    lr = {s: r["lr"] for s, r in steps.items() if is_number(r.get("lr"))}
    plots = []
    if loss:
        plots.append(("Training loss at each logged step (dotted: evaluations).",
                      series_plot(loss, "loss", "training loss", "loss", eval_steps)))
    if lr:
        plots.append(("Learning rate at each logged step.", series_plot(lr, "lr", "learning rate", "learning rate")))
    if scores:
        xs = sorted(set(loss) | set(eval_steps))
        pad = max(1.0, (xs[-1] - xs[0]) * 0.03)
        plots.append((f"Scores on {split} at each evaluation (dashed: the best checkpoint).",
                      scores_plot(scores, split, best_step, (xs[0] - pad, xs[-1] + pad))))
    return plots
