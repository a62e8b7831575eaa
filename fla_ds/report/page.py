"""The report as one self-contained HTML page: header, plots, evaluation settings and score
conventions, and the table of dev clips.

Every string that comes from the run (ids, texts, hypotheses, config values, the summary's
fields, file names) is untrusted and goes through ``html.escape`` (quotes included, so it is
safe in attributes too); numbers are formatted here. The page loads nothing: styles are
inline, plots are inline SVG, frames are ``data:`` URIs, it holds no script, and its
Content-Security-Policy forbids any other source, so even a mistake here could neither run
a script nor reach the network.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from html import escape

from fla_ds.report.clips import SCORE_NAME, Clip, ClipTable
from fla_ds.report.frames import Strips
from fla_ds.report.run import Evaluation, RunLog, is_number

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 1400px; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .6em 0; } th, td { border: 1px solid #ddd; padding: .25em .5em; vertical-align: top; text-align: left; }
th { background: #f4f4f4; } .num { text-align: right; font-variant-numeric: tabular-nums; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; } dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
figure { margin: 1em 0; } figure svg { max-width: 100%; height: auto; } figcaption { color: #555; font-size: .9em; }
code { background: #f4f4f4; padding: 0 .2em; overflow-wrap: anywhere; } .note { color: #555; } .problem { color: #a33; }
td.frames { white-space: nowrap; } td.frames img { margin-right: 2px; } tr.best-step td { background: #eef7ee; }
tr.group th { background: #e8eef7; } td.missing { color: #999; } td.id { font-family: monospace; overflow-wrap: anywhere; min-width: 14ch; max-width: 28ch; }
"""
SCORE_COLUMNS = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "bleu_13a")


@dataclass
class Report:
    """Everything the page shows, gathered by fla_ds.report.write_report."""

    run: str
    cfg: object
    log: RunLog
    evaluations: list[Evaluation]
    scores: dict[int, dict]
    best: dict | None
    latest: str | None
    table: ClipTable
    strips: Strips
    clips_limit: int
    plots: list[tuple[str, str]] = field(default_factory=list)
    version: str = ""


def num(value, digits: int = 2) -> str:
    """A number for the page ('-' when it is not one)."""
    if not is_number(value):
        return "-"
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3g}"


def text(value) -> str:
    """Any config or record value as escaped text (an enum by its name)."""
    if isinstance(value, Enum):
        value = value.name
    return escape(str(value))


def duration(seconds) -> str:
    if not is_number(seconds) or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def facts(rows: list[tuple[str, str]]) -> str:
    """A definition list of (label, already escaped HTML)."""
    return '<dl class="facts">' + "".join(f"<dt>{escape(k)}</dt><dd>{v}</dd>" for k, v in rows) + "</dl>"


# ------------------------------------------------------------------ header


def stage_text(cfg) -> str:
    if cfg.stage2.encoder:
        source = f"feature cache {text(cfg.stage2.features)}" if cfg.stage2.features else "video"
        return (f"2: frozen stage-1 encoder <code>{text(cfg.stage2.encoder)}</code> + projector + language model "
                f"(backend {text(cfg.stage2.backend)}), trained from {source}")
    return "1: visual encoder + Light-T"


def outcome_text(log: RunLog) -> str:
    if not log.summaries:
        return "no closing summary: the run is still going, or its last launch was killed"
    s = log.summaries[-1]
    out = (f"{text(s.get('outcome', '?'))} at step {num(s.get('step'))} of {num(s.get('total_steps'))} "
           f"(epoch {num(s.get('epoch'))}) in {duration(s.get('seconds'))}, {num(s.get('samples_per_s'), 1)} samples/s")
    launches = f"{len(log.summaries)} launches ended cleanly" if len(log.summaries) > 1 else ""
    preempted = f"preempted {log.preempted} time(s)" if log.preempted else ""
    extra = "; ".join(x for x in (launches, preempted) if x)
    return out + (f" ({extra})" if extra else "")


def best_text(best: dict | None, latest: str | None) -> str:
    shown = "none recorded yet" if best is None else f"{text(best['step'])} by {text(best['metric'])} = {num(best['value'])}"
    return shown + (f"; latest checkpoint {text(latest)}" if latest else "")


def header(r: Report) -> str:
    steps = sorted(r.log.steps)
    logged = f"{len(steps)} step records, last step {steps[-1]}" if steps else "no training step logged"
    if r.log.damaged:
        lines = ", ".join(map(str, r.log.damaged[:5])) + (" ..." if len(r.log.damaged) > 5 else "")
        logged += f' <span class="problem">({len(r.log.damaged)} damaged line(s) of metrics.jsonl skipped: {lines})</span>'
    corpus = text(r.strips.corpus) if r.strips.corpus else "unknown (its shard index could not be read)"
    rows = [("Run folder", f"<code>{text(r.run)}</code>"), ("Stage", stage_text(r.cfg)),
            ("Corpus / split", f"{corpus} / {text(r.cfg.eval.split)}"), ("Outcome", outcome_text(r.log)),
            ("Steps logged", logged), ("Best checkpoint", best_text(r.best, r.latest))]
    return f"<h1>Training run report</h1>{facts(rows)}"


# ------------------------------------------------------------------ plots, settings, scores


def plots_section(r: Report) -> str:
    if not r.plots:
        return "<h2>Training curves</h2><p class=\"note\">Nothing to plot: metrics.jsonl holds no step record and no evaluation.</p>"
    figures = "".join(f"<figure>{svg}<figcaption>{escape(caption)}</figcaption></figure>" for caption, svg in r.plots)
    return f"<h2>Training curves</h2>{figures}"


def settings_section(r: Report) -> str:
    e = r.cfg.eval
    rows = [("eval.split", text(e.split)), ("eval.limit", f"{text(e.limit)} (0: every clip)"), ("eval.beam_size", text(e.beam_size)),
            ("eval.max_new_tokens", f"{text(e.max_new_tokens)} (0: the model's maximum)"), ("eval.level", text(e.level)),
            ("eval.phoenix_period", text(e.phoenix_period)), ("eval.every_steps", f"{text(e.every_steps)} (0: after every epoch)"),
            ("train.best_metric", text(r.cfg.train.best_metric))]
    conventions: dict[tuple[str, str], list[str]] = {}
    for ev in r.evaluations:
        key = (str(ev.metrics.get("convention", "")), str(ev.metrics.get("bleu_13a_signature", "")))
        conventions.setdefault(key, []).append(ev.name)
    lines = "".join(f"<p>{escape(', '.join(steps))}: <code>{escape(conv) or 'no convention recorded (metrics.json missing)'}</code>"
                    + (f"<br>sacrebleu signature: <code>{escape(sig)}</code>" if sig else "") + "</p>"
                    for (conv, sig), steps in conventions.items())
    return (f"<h2>Evaluation settings and score conventions</h2>{facts(rows)}"
            f"<p>How each evaluation's scores were computed (from its metrics.json):</p>{lines or '<p class=note>no evaluation yet</p>'}"
            + scores_table(r))


def scores_table(r: Report) -> str:
    if not r.scores:
        return ""
    best_step = r.best["step"] if r.best else None
    head = "".join(f"<th>{c}</th>" for c in ("step", "epoch", "n", *SCORE_COLUMNS))
    body = ""
    for step, values in r.scores.items():
        cls = ' class="best-step"' if f"step-{step}" == best_step else ""
        cells = [str(step), num(values.get("epoch")), num(values.get("n"))] + [num(values.get(c)) for c in SCORE_COLUMNS]
        body += f"<tr{cls}>" + "".join(f'<td class="num">{c}</td>' for c in cells) + "</tr>"
    return f"<table class=\"scores\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ------------------------------------------------------------------ clips


def frames_cell(clip: Clip, strips: Strips, with_frames: bool) -> str:
    thumbs = strips.by_id.get(clip.id) if with_frames else None
    if not thumbs:
        return '<td class="frames none">-</td>' if with_frames else ""
    imgs = "".join(f'<img src="{t.uri}" width="{t.width}" height="{t.height}" alt="frame {i + 1} of {escape(clip.id)}">'
                   for i, t in enumerate(thumbs))
    return f'<td class="frames">{imgs}</td>'


def clip_row(clip: Clip, section: str, columns: list[str], strips: Strips, with_frames: bool) -> str:
    hyps = "".join(f'<td class="hyp missing" data-step="{escape(c)}">-</td>' if clip.hypotheses.get(c) is None
                   else f'<td class="hyp" data-step="{escape(c)}">{escape(clip.hypotheses[c])}</td>' for c in columns)
    return (f'<tr class="clip" data-section="{section}" data-id="{escape(clip.id)}"><td class="num score">{num(clip.score, 1)}</td>'
            f'<td class="id">{escape(clip.id)}</td>{frames_cell(clip, strips, with_frames)}<td class="ref">{escape(clip.reference)}</td>{hyps}</tr>')


def clip_rows(title: str, clips: list[Clip], section: str, columns: list[str], strips: Strips, with_frames: bool) -> str:
    width = 3 + len(columns) + (1 if with_frames else 0)
    rows = "".join(clip_row(c, section, columns, strips, with_frames) for c in clips)
    return f'<tbody class="{section}"><tr class="group"><th colspan="{width}">{escape(title)}</th></tr>{rows}</tbody>' if clips else ""


def table_head(columns: list[str], with_frames: bool) -> str:
    cells = ["score", "clip", *(["frames"] if with_frames else []), "reference", *(f"hypothesis {c}" for c in columns)]
    return "<thead><tr>" + "".join(f"<th>{escape(c)}</th>" for c in cells) + "</tr></thead>"


def clips_notes(r: Report) -> str:
    t, e = r.table, r.cfg.eval
    latest = t.columns[-1]
    notes = [f"Ordered by the {SCORE_NAME} (F, beta 1.2, x100; level {text(e.level)}, lowercased, NFC"
             f"{', trailing &quot; .&quot;' if e.phoenix_period else ''}) of the latest evaluation's ({escape(latest)}) "
             f"hypothesis against the reference: the worst clips first, then the best."]
    shown, total = len(t.with_frames), len(t.rows)
    if t.rest:
        notes.append(f"Frames are shown for {shown} of {total} clips ({len(t.worst)} worst, {len(t.best)} best; --clips {r.clips_limit}); "
                     f"the other {len(t.rest)} clips are listed below without frames.")
    if t.only_earlier:
        notes.append(f"{t.only_earlier} clip(s) evaluated only at earlier steps are left out.")
    problems = "".join(f'<p class="problem">{escape(p)}</p>' for p in r.strips.problems)
    return "".join(f'<p class="note">{n}</p>' for n in notes) + problems


def clips_section(r: Report) -> str:
    t = r.table
    if not t.columns:
        return "<h2>Dev clips</h2><p class=\"note\">No evaluation has written hypotheses yet (RUN/eval/step-N/hypotheses.tsv).</p>"
    split = text(r.cfg.eval.split)
    main = (clip_rows(count_text(len(t.worst), "lowest-scoring clip", "worst first"), t.worst, "worst", t.columns, r.strips, True)
            + clip_rows(count_text(len(t.best), "highest-scoring clip", "best first"), t.best, "best", t.columns, r.strips, True))
    out = f"<h2>{split} clips</h2>{clips_notes(r)}"
    if main:
        out += f'<table class="clips">{table_head(t.columns, True)}{main}</table>'
    if t.rest:
        rest = clip_rows("The other clips, worst first", t.rest, "rest", t.columns, r.strips, False)
        out += (f"<details><summary>The other {len(t.rest)} clips (no frames)</summary>"
                f'<table class="clips">{table_head(t.columns, False)}{rest}</table></details>')
    return out


def count_text(n: int, noun: str, order: str) -> str:
    """'The 3 lowest-scoring clips, worst first'; 'The lowest-scoring clip' for one."""
    return f"The {noun}" if n == 1 else f"The {n} {noun}s, {order}"


def render_page(r: Report) -> str:
    """The whole page as one HTML string; every value from the run escaped."""
    body = header(r) + plots_section(r) + settings_section(r) + clips_section(r)
    made = f'<p class="note">Made by fla-ds {escape(r.version)} (<code>fla-ds report</code>).</p>'
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>fla-ds report: {escape(r.run)}</title><style>{STYLE}</style></head>"
            f"<body>{body}{made}</body></html>\n")
