"""``fla-ds report RUN``: one self-contained HTML page about a training run.

    fla-ds report runs/p14t-s1                      # -> runs/p14t-s1/report.html
    fla-ds report RUN --out page.html --shards shards/phoenix14t --clips 40

The page: the run's stage, corpus, outcome and best checkpoint; training loss, learning rate
and dev scores over optimizer steps; the evaluation settings and the convention each score
was computed in; and the dev clips (frames, reference, the hypothesis of every evaluated
checkpoint), worst first by sentence score, then best. It loads nothing from anywhere (inline
SVG, ``data:`` images, no script), so it opens offline from a file.

One job per module: reading the run folder (``run``), ordering the clips (``clips``), frames
from the shards (``frames``), the plots (``plots``) and the HTML (``page``). It reads nothing
outside the run folder, the shard folder its config names (or ``--shards``) and, for a
stage-2 run trained from a feature cache, its encoder's ``config.yaml``.
"""
from __future__ import annotations

import os
from pathlib import Path

from fla_ds.atomic import atomic_write_text
from fla_ds.report.clips import clip_table
from fla_ds.report.frames import read_strips, video_shard_folder
from fla_ds.report.page import Report, render_page
from fla_ds.report.run import ReportError, load_run_config, read_best, read_evaluations, read_latest, read_metrics, scores_by_step

DEFAULT_CLIPS = 24
__all__ = ["DEFAULT_CLIPS", "ReportError", "build_report", "write_report"]


def best_step_number(best: dict | None) -> int | None:
    """N of the best checkpoint's ``step-N`` name, or None."""
    name = (best or {}).get("step", "")
    return int(name[5:]) if isinstance(name, str) and name.startswith("step-") and name[5:].isdigit() else None


def build_report(run: str | os.PathLike, shards: str | None = None, clips: int = DEFAULT_CLIPS) -> str:
    """The report page of the run folder ``run`` as HTML text. ``shards``: the video shard
    folder (default: the one the run's config names); ``clips``: how many clips get frame
    strips (half the worst, half the best). Raises ReportError (one line naming the file: a
    folder without metrics.jsonl is "not a run folder"; config.yaml, best or an evaluation's
    files missing or damaged) and ConfigError (config.yaml that does not fit the schema);
    missing or damaged shards only leave the clips without frames, said on the page."""
    from fla_ds import __version__
    from fla_ds.report.plots import training_plots  # matplotlib: imported only when a page is made

    run_dir = Path(run)
    if not run_dir.is_dir():
        raise ReportError(f"{run}: not a run folder (no such folder)")
    log = read_metrics(run_dir)
    cfg = load_run_config(run_dir)
    evaluations = read_evaluations(run_dir)
    best, latest = read_best(run_dir), read_latest(run_dir)
    scores = scores_by_step(log, evaluations)
    table = clip_table(evaluations, clips, level=cfg.eval.level.value, phoenix_period=cfg.eval.phoenix_period)
    folder, why = video_shard_folder(cfg, shards)
    strips = read_strips(folder, cfg.eval.split, {c.id for c in table.with_frames}, why)
    report = Report(str(run_dir.resolve()), cfg, log, evaluations, scores, best, latest, table, strips, clips,
                    training_plots(log.steps, scores, cfg.eval.split, best_step_number(best)), __version__)
    return render_page(report)


def write_report(run: str | os.PathLike, out: str | os.PathLike | None = None, shards: str | None = None, clips: int = DEFAULT_CLIPS) -> Path:
    """Write the report of ``run`` (``build_report``) to ``out`` (default ``RUN/report.html``)
    atomically; returns its path. Raises as ``build_report``."""
    html = build_report(run, shards, clips)
    return atomic_write_text(Path(out) if out else Path(run) / "report.html", html)
