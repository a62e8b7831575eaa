"""Evaluation: translation scores in the conventions SLT papers use (see metrics.py)."""
from fla_ds.evaluate.metrics import bleu_13a, bleu_signjoey, prepare, rouge_l, score

__all__ = ["bleu_13a", "bleu_signjoey", "prepare", "rouge_l", "score"]
