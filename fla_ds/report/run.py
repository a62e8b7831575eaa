"""Reading a run folder for the report: ``metrics.jsonl``, ``config.yaml``, ``best``,
``latest`` and every ``eval/step-N/`` (``hypotheses.tsv``, ``metrics.json``).

Everything in the folder is untrusted input (a run can be copied from anywhere): a file must
be a regular file inside the run folder once symlinks are resolved (a link leading out is
refused unread, a FIFO is never opened) and of a bounded size; a missing or damaged file is a
one-line ``ReportError`` naming it. Nothing is ever evaluated; strings are kept as they are
and escaped when the page is written (fla_ds/report/page.py).
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from fla_ds.config import Config, load_config
from fla_ds.hypotheses import read_tsv

MAX_METRICS_BYTES = 1 << 30  # a million logged steps at ~250 bytes a line
MAX_FILE_BYTES = 64 << 20  # one evaluation's hypotheses.tsv, metrics.json, best, config.yaml
EVAL_STEP = re.compile(r"step-(\d{1,12})")
TSV_COLUMNS = ("id", "hypothesis", "reference")


class ReportError(ValueError):
    """A run folder the report cannot be made from; the message is one line naming the file."""


def checked_file(root: Path, path: Path, limit: int = MAX_FILE_BYTES) -> Path:
    """``path`` with symlinks resolved, after checking that it lies inside ``root``, is a
    regular file and holds at most ``limit`` bytes. Raises FileNotFoundError when it does not
    exist, ReportError (naming the file) for anything else."""
    real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if real != real_root and real_root not in real.parents:
        raise ReportError(f"{path}: leads outside {root} (a symlink to {real}); refusing it")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ReportError(f"{path}: cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ReportError(f"{path}: is not a regular file; refusing it")
    if st.st_size > limit:
        raise ReportError(f"{path}: is larger than {limit} bytes; refusing it")
    return real


def read_bytes(root: Path, path: Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a checked file (``checked_file``), opened non-blocking so that a file
    swapped for a FIFO after the check cannot hang the report. Raises as ``checked_file``."""
    real = checked_file(root, path, limit)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ReportError(f"{path}: cannot be read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ReportError(f"{path}: is not a regular file; refusing it")
        return f.read(limit + 1)[:limit]


def is_number(value) -> bool:
    """A JSON number (not a bool, which Python counts as an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# ------------------------------------------------------------------ metrics.jsonl


@dataclass
class RunLog:
    """What ``metrics.jsonl`` says. A resumed run appends to the file and may repeat steps
    it had logged before its last checkpoint: the later record of a step wins."""

    steps: dict[int, dict] = field(default_factory=dict)
    """Optimizer step -> its (last) step record."""
    evals: dict[int, dict] = field(default_factory=dict)
    """Step -> the numbers of its (last) ``eval`` event."""
    summaries: list[dict] = field(default_factory=list)
    """Every ``summary`` event (one per launch that ended cleanly), in order."""
    preempted: int = 0
    damaged: list[int] = field(default_factory=list)
    """Line numbers that are not a JSON object (a write cut short by a kill); skipped."""


def parse_record(line: bytes) -> dict | None:
    """One line as a JSON object, or None when it is not one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def add_record(log: RunLog, record: dict) -> None:
    """File one record of ``metrics.jsonl`` into ``log`` (records of unknown kinds are ignored)."""
    event, step = record.get("event"), record.get("step")
    if event is None and type(step) is int and step >= 0:
        log.steps[step] = record
    elif event == "eval" and type(step) is int and step >= 0:
        log.evals[step] = {k: v for k, v in record.items() if is_number(v) and k not in ("time", "step")}
    elif event == "summary":
        log.summaries.append(record)
    elif event == "preempted":
        log.preempted += 1


def read_metrics(run: Path) -> RunLog:
    """``RUN/metrics.jsonl`` as a RunLog. Raises ReportError "not a run folder" when it is
    missing, and naming the file when it cannot be read or no line of it is a JSON object."""
    path = run / "metrics.jsonl"
    try:
        data = read_bytes(run, path, MAX_METRICS_BYTES)
    except FileNotFoundError:
        raise ReportError(f"{run}: not a run folder (no metrics.jsonl: give the folder that train.out named)") from None
    log, lines = RunLog(), data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = parse_record(line)
        if record is None:
            log.damaged.append(number)
        else:
            add_record(log, record)
    if log.damaged and not (log.steps or log.evals or log.summaries):
        raise ReportError(f"{path}: no line is a JSON record (line {log.damaged[0]} is the first); not a metrics log")
    return log


# ------------------------------------------------------------------ config, best, latest


def load_run_config(run: Path) -> Config:
    """``RUN/config.yaml``, the resolved config the run was launched with, read through the
    one schema (fla_ds/config.py). Raises ReportError when it is missing or not a regular
    file inside the run, ConfigError (naming the file) when it does not fit the schema."""
    path = run / "config.yaml"
    try:
        checked_file(run, path)
    except FileNotFoundError:
        raise ReportError(f"{path}: missing (every run folder has the config it was launched with)") from None
    return load_config(str(path))


def read_json_object(root: Path, path: Path) -> dict | None:
    """A small JSON object file of the run; None when it does not exist. Raises ReportError
    naming the file when it is not a JSON object."""
    try:
        data = read_bytes(root, path)
    except FileNotFoundError:
        return None
    record = parse_record(data)
    if record is None:
        raise ReportError(f"{path}: damaged (not a JSON object)")
    return record


def read_best(run: Path) -> dict | None:
    """``RUN/best`` ({"step": "step-N", "metric": "dev bleu4", "value": 12.3}), or None when
    no evaluation has picked one yet. Raises ReportError naming the file when it is damaged."""
    best = read_json_object(run, run / "best")
    if best is not None and not (isinstance(best.get("step"), str) and isinstance(best.get("metric"), str) and is_number(best.get("value"))):
        raise ReportError(f"{run / 'best'}: damaged (needs a string step and metric and a numeric value)")
    return best


def read_latest(run: Path) -> str | None:
    """The step folder ``RUN/latest`` names, or None."""
    try:
        data = read_bytes(run, run / "latest", 4096)
    except FileNotFoundError:
        return None
    return data.decode("utf-8", "replace").strip() or None


# ------------------------------------------------------------------ evaluations


@dataclass
class Evaluation:
    """One evaluation of the run: ``RUN/eval/step-N/``."""

    step: int
    rows: list[dict]
    """hypotheses.tsv: one {"id", "hypothesis", "reference"} per clip, in file order."""
    metrics: dict
    """metrics.json: the scores, ``convention`` and ``bleu_13a_signature`` ({} when missing)."""

    @property
    def name(self) -> str:
        return f"step-{self.step}"

    def hypotheses(self) -> dict[str, str]:
        """Clip id -> hypothesis (the first row of an id, should a file repeat one)."""
        out: dict[str, str] = {}
        for row in self.rows:
            out.setdefault(row["id"], row["hypothesis"])
        return out


def read_hypotheses(run: Path, path: Path) -> list[dict]:
    """The rows of one ``hypotheses.tsv`` (read with fla_ds.hypotheses.read_tsv, which
    unescapes its fields). Raises ReportError naming the file."""
    checked_file(run, path)
    try:
        rows = read_tsv(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path}: damaged ({str(exc).splitlines()[0][:200]})") from None
    if rows and not set(TSV_COLUMNS) <= set(rows[0]):
        raise ReportError(f"{path}: damaged (its header lacks one of the columns {', '.join(TSV_COLUMNS)})")
    return [{c: row[c] for c in TSV_COLUMNS} for row in rows]


def read_evaluations(run: Path) -> list[Evaluation]:
    """Every ``RUN/eval/step-N/`` that holds a ``hypotheses.tsv``, oldest step first. Raises
    ReportError naming a file that is damaged or leads outside the run."""
    folder = run / "eval"
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = EVAL_STEP.fullmatch(entry.name)
        if not match or not (entry / "hypotheses.tsv").exists():
            continue
        rows = read_hypotheses(run, entry / "hypotheses.tsv")
        metrics = read_json_object(run, entry / "metrics.json") or {}
        found.append(Evaluation(int(match.group(1)), rows, metrics))
    return sorted(found, key=lambda e: e.step)


def scores_by_step(log: RunLog, evaluations: list[Evaluation]) -> dict[int, dict]:
    """Step -> the dev numbers of its evaluation: the ``eval`` events of the log, with each
    ``metrics.json`` (what the scores were computed into) taking precedence; non-finite
    values dropped."""
    out = {step: dict(values) for step, values in log.evals.items()}
    for e in evaluations:
        out.setdefault(e.step, {}).update({k: v for k, v in e.metrics.items() if is_number(v)})
    return {step: {k: v for k, v in values.items() if math.isfinite(v)} for step, values in sorted(out.items())}
