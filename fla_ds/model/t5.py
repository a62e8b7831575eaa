"""Stage 2, encoder-decoder backend ``t5``: T5 or mT5 (Flan-T5, mT5, umT5 alike), as Uni-Sign
and SpaMo use it: the projector's output is fed as the encoder's ``inputs_embeds``, the
decoder generates the text, the whole model is fine-tuned with label smoothing (the shared
part: fla_ds/model/seq2seq.py).

    features (B, T, D) --Projector--> T5 encoder --> T5 decoder --> text

    deepspeed --num_gpus 8 fla_ds/train.py --stage 2 stage2.backend=t5 stage2.model=PATH/mt5-base ...

T5's positions are relative, so clips of any length go in; the decoder starts from the
config's ``decoder_start_token_id`` (T5's pad token) and there is no language code: mT5 writes
whatever language it was fine-tuned on. The fine-tuned model is saved in ``t5/``.
"""
from __future__ import annotations

import os

import torch

from fla_ds.model.seq2seq import Seq2SeqBackend, VisualSeq2Seq, load_seq2seq

T5_MODEL_TYPES = ("t5", "mt5", "umt5")
"""Hugging Face ``model_type`` values this backend loads (T5, Flan-T5, T5 v1.1, mT5, umT5)."""


def load_t5(path: str | os.PathLike, dtype: torch.dtype = torch.float32, artifact: bool = False):
    """(T5-family ``...ForConditionalGeneration``, tokenizer) from a local folder; under ZeRO-3
    create ``HfDeepSpeedConfig`` before calling. ``artifact``: a trained ``t5/`` folder, loaded
    through ``fla_ds.artifacts.load_pretrained`` (raises ArtifactError)."""
    from transformers import AutoModelForSeq2SeqLM

    if artifact:  # the Auto class would build whatever model type a folder's config names
        from fla_ds.artifacts import ArtifactError, read_json

        config = read_json(os.path.join(path, "config.json"))
        model_type = config.get("model_type") if isinstance(config, dict) else None
        if model_type not in T5_MODEL_TYPES:
            raise ArtifactError(f"{os.path.join(path, 'config.json')}: model_type {model_type!r} is not one of {', '.join(T5_MODEL_TYPES)}")
    return load_seq2seq(AutoModelForSeq2SeqLM, path, dtype, artifact)


class VisualT5(VisualSeq2Seq):
    """Projector + T5/mT5, all trainable; see ``VisualSeq2Seq``. features: float (B, T, D),
    feat_mask: bool (B, T); ``forward`` -> (loss summed over target tokens and EOS, their
    count); ``generate`` -> one text per clip."""

    lm_attr = "t5"
    lm_label = "T5"


class T5Backend(Seq2SeqBackend):
    """``stage2.backend=t5``: ``stage2.model`` a T5-family folder, ``stage2.label_smoothing``,
    ``stage2.max_target_tokens``; the fine-tuned model in ``t5/``."""

    name = "t5"
    folder = "t5"
    model_types = T5_MODEL_TYPES

    def load_model(self, path, dtype, artifact=False):
        return load_t5(path, dtype=dtype, artifact=artifact)

    def wrap(self, model, projector, tokenizer, vocab, cfg) -> VisualT5:
        s = cfg.stage2
        return VisualT5(model, projector, tokenizer, vocab=vocab, label_smoothing=s.label_smoothing, max_target_tokens=s.max_target_tokens)


BACKEND = T5Backend()
