"""The dev clips of the report: each clip's reference and the hypothesis of every evaluated
checkpoint, scored per sentence and ordered worst first, then best, then the rest.

The sentence score is ROUGE-L (F, beta 1.2, x100) of the latest evaluation's hypothesis
against the reference, computed by the project's own metric code (fla_ds/evaluate/metrics.py)
on the tokens the corpus score uses: ``eval.level`` (word or char), lowercased, NFC, with the
PHOENIX trailing " ." when ``eval.phoenix_period`` is set. ROUGE-L rather than sentence BLEU:
BLEU-4 is 0 for most single sentences of a young model, so it would not order them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from fla_ds.evaluate.metrics import prepare, rouge_l_sentence, with_phoenix_period
from fla_ds.report.run import Evaluation

SCORE_NAME = "sentence ROUGE-L"


@dataclass
class Clip:
    """One row of the clip table."""

    id: str
    reference: str
    score: float
    """The sentence score of the latest evaluation's hypothesis (0-100)."""
    hypotheses: dict[str, str | None] = field(default_factory=dict)
    """Evaluation name (step-N) -> that checkpoint's hypothesis (None: not evaluated on it)."""


@dataclass
class ClipTable:
    """The clips in the order the page shows them."""

    worst: list[Clip]
    """Lowest scores, ascending; these and ``best`` get frame strips."""
    best: list[Clip]
    """Highest scores, descending."""
    rest: list[Clip]
    """Everything else, ascending; listed without frames."""
    columns: list[str]
    """The evaluation names, oldest first: one hypothesis column each."""
    only_earlier: int = 0
    """Clips evaluated at earlier steps but not by the latest evaluation (not shown)."""

    @property
    def with_frames(self) -> list[Clip]:
        return self.worst + self.best

    @property
    def rows(self) -> list[Clip]:
        return self.worst + self.best + self.rest


def sentence_score(hypothesis: str, reference: str, level: str = "word", phoenix_period: bool = False) -> float:
    """ROUGE-L F (beta 1.2) x100 of one hypothesis against its reference, on the tokens the
    corpus score uses (``level`` word or char, lowercased, NFC; " ." appended to both when
    ``phoenix_period``). Raises ValueError for an unknown level."""
    if phoenix_period:
        (hypothesis,), (reference,) = with_phoenix_period([hypothesis]), with_phoenix_period([reference])
    return 100.0 * rouge_l_sentence(prepare(hypothesis, level).split(), prepare(reference, level).split())


def clip_table(evaluations: list[Evaluation], shown: int, level: str = "word", phoenix_period: bool = False) -> ClipTable:
    """The clips of the latest evaluation (the last of ``evaluations``, oldest first), each
    with every evaluation's hypothesis, split into the ``shown`` clips that get frames (half
    the worst, half the best by sentence score) and the rest. Ties are ordered by id, so the
    page is the same for the same run."""
    if not evaluations:
        return ClipTable([], [], [], [])
    latest, by_step = evaluations[-1], {e.name: e.hypotheses() for e in evaluations}
    clips = [Clip(row["id"], row["reference"], sentence_score(row["hypothesis"], row["reference"], level, phoenix_period),
                  {name: hyps.get(row["id"]) for name, hyps in by_step.items()}) for row in latest.rows]
    ordered = sorted(clips, key=lambda c: (c.score, c.id))
    shown = max(0, min(shown, len(ordered)))
    n_worst = (shown + 1) // 2
    n_best = shown - n_worst
    worst = ordered[:n_worst]
    best = ordered[len(ordered) - n_best:][::-1] if n_best else []
    rest = ordered[n_worst:len(ordered) - n_best]
    latest_ids = {c.id for c in clips}
    earlier = {i for e in evaluations[:-1] for i in e.hypotheses()} - latest_ids
    return ClipTable(worst, best, rest, [e.name for e in evaluations], len(earlier))
