"""Translation scores in the conventions sign language translation papers use.

Every figure here is computed the way the papers we compare against compute it, and ``score``
returns, next to the numbers, a ``convention`` string that says exactly how:

* BLEU-1..4 follow signjoey (Camgoz et al. 2020, copied by most later SLT code): corpus-level,
  cumulative, on whitespace tokens of lowercased text, no tokenizer, no smoothing. signjoey calls
  its bundled sacrebleu 1.4 ``raw_corpus_bleu`` (floor smoothing with a floor of 0, i.e. none),
  which gives exactly sacrebleu 2.x ``BLEU(tokenize="none", smooth_method="none")``.
* BLEU (13a) is sacrebleu's standard figure (13a tokenizer; its zh tokenizer at character level)
  with its signature, so that it can be compared with anyone who reports a signature.
* ROUGE-L is the F-measure with beta 1.2 of the longest common token subsequence, per sentence,
  averaged over sentences (the coco-caption code signjoey uses). It is written out here because
  the ``rouge_score`` package keeps only a-z and 0-9, silently dropping umlauts and all Chinese.
* CSL-Daily is scored per character (``level="char"``); PHOENIX-2014T is sometimes scored with a
  " ." appended to every sentence (``phoenix_period=True``): one more matched token per sentence,
  which usually raises the scores, so the option is recorded with them.

Text is only ever NFC-normalised, lowercased with ``str.lower`` and split: no character is dropped.
"""
from __future__ import annotations

import unicodedata
from collections.abc import Iterable, Sequence

from sacrebleu.metrics import BLEU

LEVELS = ("word", "char")
SCORES = ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "bleu_13a")
"""The figures ``score`` returns (higher is better); ``train.best_metric`` names one of them."""
ROUGE_BETA = 1.2


def check_aligned(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    """Refuse what would otherwise be scored wrongly without a sign: misaligned, empty or non-text."""
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references: they must align one to one"
        )
    if not references:
        raise ValueError("no sentences to score")
    for name, texts in (("hypothesis", hypotheses), ("reference", references)):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"{name} {i} is {type(text).__name__}, not str")


def prepare(text: str, level: str = "word", lowercase: bool = True) -> str:
    """One sentence as the space-separated tokens that every metric below splits on."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    # NFC so that a decomposed "o" + U+0308 and a composed "ö" count as the same character; it is
    # the identity on the (NFC) corpus files, so scores stay comparable with codebases that skip it.
    text = unicodedata.normalize("NFC", text)
    if lowercase:
        text = text.lower()
    if level == "char":
        # CSL-Daily convention: whitespace is not a character to be matched.
        return " ".join("".join(text.split()))
    return " ".join(text.split())


def prepare_all(texts: Iterable[str], level: str, lowercase: bool) -> list[str]:
    return [prepare(t, level, lowercase) for t in texts]


def with_phoenix_period(texts: Iterable[str]) -> list[str]:
    """Append " ." as several PHOENIX-2014T codebases do (the official CSV has no final stop)."""
    return [t.rstrip() + " ." for t in texts]


def bleu_signjoey(
    hypotheses: Sequence[str], references: Sequence[str], level: str = "word", lowercase: bool = True
) -> dict[str, float]:
    """Cumulative corpus BLEU-1..4 (0-100), signjoey convention; keys ``bleu1``..``bleu4``.

    BLEU-n = BP * exp(mean(log p_1..p_n)); an order with no match makes BLEU-n 0 (no smoothing).
    """
    check_aligned(hypotheses, references)
    hyps = prepare_all(hypotheses, level, lowercase)
    refs = prepare_all(references, level, lowercase)
    # One pass for the n-gram counts; each order then reuses them, exactly as if it were scored
    # alone with max_ngram_order=n (lower-order counts do not depend on the maximum order).
    stats = BLEU(tokenize="none", smooth_method="none", max_ngram_order=4).corpus_score(hyps, [refs])
    return {
        f"bleu{n}": BLEU.compute_bleu(
            list(stats.counts[:n]), list(stats.totals[:n]), stats.sys_len, stats.ref_len,
            smooth_method="none", max_ngram_order=n,
        ).score
        for n in range(1, 5)
    }


def bleu_13a(
    hypotheses: Sequence[str], references: Sequence[str], lowercase: bool = False, tokenize: str = "13a"
) -> tuple[float, str]:
    """sacrebleu's standard corpus BLEU (default exp smoothing) and its signature string.

    Case-sensitive by default, as sacrebleu is; the signature records case and tokenizer.
    """
    check_aligned(hypotheses, references)
    hyps = [unicodedata.normalize("NFC", t) for t in hypotheses]
    refs = [unicodedata.normalize("NFC", t) for t in references]
    metric = BLEU(tokenize=tokenize, lowercase=lowercase)
    result = metric.corpus_score(hyps, [refs])
    return result.score, metric.get_signature().format()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j - 1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(row[j], row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l_sentence(hypothesis: Sequence[str], reference: Sequence[str], beta: float = ROUGE_BETA) -> float:
    """ROUGE-L F in [0, 1] of two token lists.

    F = (1 + b^2) P R / (R + b^2 P) with P = lcs/|hyp|, R = lcs/|ref| (coco-caption, signjoey).
    """
    if not hypothesis or not reference:
        # Two empty sentences agree completely (the classic split(" ") code also scores them 1).
        return 1.0 if not hypothesis and not reference else 0.0
    lcs = lcs_length(hypothesis, reference)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(hypothesis), lcs / len(reference)
    return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def rouge_l(
    hypotheses: Sequence[str], references: Sequence[str], beta: float = ROUGE_BETA,
    level: str = "word", lowercase: bool = True,
) -> float:
    """ROUGE-L F(beta) per sentence, averaged over sentences, x100."""
    check_aligned(hypotheses, references)
    hyps = prepare_all(hypotheses, level, lowercase)
    refs = prepare_all(references, level, lowercase)
    total = sum(rouge_l_sentence(h.split(), r.split(), beta) for h, r in zip(hyps, refs))
    return 100.0 * total / len(refs)


def convention(level: str, phoenix_period: bool, lowercase: bool, signature: str) -> str:
    """The sentence written next to every score, so that a reader can tell what it compares with."""
    case = "lowercased" if lowercase else "case kept"
    tokens = "character tokens (whitespace dropped)" if level == "char" else "whitespace tokens"
    return (
        f"BLEU-1..4: corpus BLEU, signjoey convention ({case}, {tokens}, no smoothing, "
        f"sacrebleu tokenize=none); ROUGE-L: F(beta={ROUGE_BETA}) per sentence on the same tokens, "
        f"averaged; level={level}; phoenix trailing ' .': {'yes' if phoenix_period else 'no'}; "
        f"text NFC-normalised; BLEU(sacrebleu): {signature}"
    )


def score(
    hypotheses: Sequence[str], references: Sequence[str], level: str = "word",
    phoenix_period: bool = False, lowercase: bool = True,
) -> dict:
    """Every figure at once: bleu1..4, rouge_l, bleu_13a, bleu_13a_signature, n, convention.

    At ``level="char"`` the sacrebleu figure uses its Chinese tokenizer (``tok:zh`` in the
    signature), the standard sacrebleu setting for Chinese; 13a would leave a Chinese sentence as
    one token.
    """
    hypotheses, references = list(hypotheses), list(references)
    check_aligned(hypotheses, references)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    if phoenix_period:
        hypotheses, references = with_phoenix_period(hypotheses), with_phoenix_period(references)
    tokenize = "zh" if level == "char" else "13a"
    sacre, signature = bleu_13a(hypotheses, references, lowercase=lowercase, tokenize=tokenize)
    return {
        **bleu_signjoey(hypotheses, references, level=level, lowercase=lowercase),
        "rouge_l": rouge_l(hypotheses, references, level=level, lowercase=lowercase),
        "bleu_13a": sacre,
        "bleu_13a_signature": signature,
        "n": len(references),
        "convention": convention(level, phoenix_period, lowercase, signature),
    }
