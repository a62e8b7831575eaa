"""Stage 2, encoder-decoder backend ``mbart``, as published: mBART (mBART-large-cc25 in the
paper), fully fine-tuned, with the projector's output in place of the encoder's word
embeddings and no text prompt (the shared part: fla_ds/model/seq2seq.py).

    features (B, T, D) --Projector--> mBART encoder --> mBART decoder --> text

The vocabulary can be trimmed to the training corpus as the paper does (``trim_mbart_vocab``):
the embedding table, the tied LM head and ``final_logits_bias`` keep only the rows of the
tokens the texts use plus the specials, so the softmax runs over a few thousand tokens
instead of 250 000. Texts still go through the original tokenizer; a ``fla_ds.vocab.IdMap``
translates its ids to the model's and back. Trim once, before training and outside ZeRO-3 (a
partitioned table cannot be cut): ``save_pretrained`` the trimmed model and ``IdMap.save``
next to it, and load that folder for training (``fla-ds trim-mbart``).
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from fla_ds.model.seq2seq import Seq2SeqBackend, VisualSeq2Seq, load_seq2seq
from fla_ds.vocab import IdMap

SPECIAL_CONFIG_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id")
"""Token ids a config or generation config may hold, remapped when the vocabulary is trimmed."""


def load_encoder_decoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32, artifact: bool = False):
    """(MBartForConditionalGeneration, tokenizer) from a local folder. Under ZeRO-3 create
    ``HfDeepSpeedConfig`` before calling (as for the decoder-only backend). ``artifact``: the
    folder is a trained artifact (a stage-2 ``mbart/``), loaded through
    ``fla_ds.artifacts.load_pretrained`` (safetensors only, every weight present and fitting;
    raises ArtifactError naming the folder or file)."""
    from transformers import MBartForConditionalGeneration

    return load_seq2seq(MBartForConditionalGeneration, path, dtype, artifact)


# ------------------------------------------------------------------------------ trimmed vocabulary


def token_id(tokenizer, token: str) -> int:
    """The id of one whole token (a language code); refuses one the tokenizer lacks instead of
    silently using UNK."""
    if token not in tokenizer.get_vocab():
        raise ValueError(f"the tokenizer has no token {token!r} (a language code such as de_DE?)")
    return int(tokenizer.convert_tokens_to_ids(token))


def kept_token_ids(model, tokenizer, texts: Iterable[str], keep_tokens: Sequence[str] = ()) -> list[int]:
    """Ascending original ids: every token of ``texts``, the tokenizer's specials (language
    codes included for mBART's tokenizer), the ids the config names, and ``keep_tokens``."""
    kept = set(tokenizer.all_special_ids)
    for name in SPECIAL_CONFIG_IDS:
        value = getattr(model.config, name, None)
        if isinstance(value, int):
            kept.add(value)
    kept.update(token_id(tokenizer, t) for t in keep_tokens)
    for row in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        kept.update(row)
    return sorted(kept)


@torch.no_grad()
def trim_mbart_vocab(model, tokenizer, texts: Iterable[str], keep_tokens: Sequence[str] = ()):
    """(model, IdMap): ``model`` cut in place to the kept tokens' rows, pretrained values kept.

    Rows are cut on the Parameter objects themselves (``param.data``), so weights tied to the
    shared table (encoder and decoder embeddings, LM head) stay tied; the config's special
    ids and vocab size are rewritten, so ``save_pretrained`` gives a loadable model.
    ``keep_tokens``: extra tokens to keep, e.g. the target language code."""
    kept = kept_token_ids(model, tokenizer, texts, keep_tokens)
    id_map = IdMap.of_kept(kept, tokenizer.unk_token_id)
    index = torch.tensor(kept, dtype=torch.long, device=model.get_input_embeddings().weight.device)
    cut_vocab_rows(model, index)
    new_pad = id_map.from_original([model.config.pad_token_id])[0] if model.config.pad_token_id is not None else None
    for module in (model.get_input_embeddings(), model.model.encoder.embed_tokens, model.model.decoder.embed_tokens):
        module.num_embeddings, module.padding_idx = len(kept), new_pad
    model.get_output_embeddings().out_features = len(kept)
    remap_special_ids(model, id_map)
    return model, id_map


def cut_vocab_rows(model, index: torch.Tensor) -> None:
    tables = [model.get_input_embeddings().weight, model.model.encoder.embed_tokens.weight,
              model.model.decoder.embed_tokens.weight, model.get_output_embeddings().weight]
    seen = set()
    for param in tables:
        if id(param) not in seen:  # tied tables are one Parameter: cut it once
            seen.add(id(param))
            param.data = param.data.index_select(0, index).contiguous()
    if hasattr(model, "final_logits_bias"):
        model.final_logits_bias = model.final_logits_bias.index_select(1, index).contiguous()


def remap_special_ids(model, id_map: IdMap) -> None:
    """Config and generation config speak the model's ids: rewrite each special id to the new
    numbering (all are kept, see ``kept_token_ids``)."""
    model.config.vocab_size = id_map.size
    configs = [model.config] + ([model.generation_config] if getattr(model, "generation_config", None) is not None else [])
    for config in configs:
        for name in SPECIAL_CONFIG_IDS:
            value = getattr(config, name, None)
            if isinstance(value, int):
                setattr(config, name, id_map.from_original([value])[0])


# ------------------------------------------------------------------------------ the model


class VisualMBart(VisualSeq2Seq):
    """Projector + mBART, all trainable (the paper fine-tunes mBART fully); see
    ``VisualSeq2Seq``. The decoder starts from the language code ``tgt_lang`` when given
    (mBART-cc25's convention: the target language's code, e.g. "de_DE"), else from the
    config's ``decoder_start_token_id`` (</s>).

    ``tokenizer``: the original tokenizer; ``vocab``: the ``IdMap`` that ``trim_mbart_vocab``
    returned for a trimmed model, None for the full vocabulary."""

    lm_attr = "mbart"
    lm_label = "mBART"

    def __init__(
        self,
        mbart,
        projector: nn.Module,
        tokenizer,
        vocab: IdMap | None = None,
        tgt_lang: str | None = None,
        label_smoothing: float = 0.2,
        max_target_tokens: int | None = None,
    ):
        start = None
        if tgt_lang:
            start = token_id(tokenizer, tgt_lang)
            start = vocab.from_original([start])[0] if vocab is not None else start
        super().__init__(mbart, projector, tokenizer, vocab, start, label_smoothing, max_target_tokens)


class MBartBackend(Seq2SeqBackend):
    """``stage2.backend=mbart``: ``stage2.model`` a (trimmed) mBART folder, ``stage2.tgt_lang``
    the decoder's start code, ``stage2.label_smoothing``, ``stage2.max_target_tokens``; the
    fine-tuned model in ``mbart/``."""

    name = "mbart"
    folder = "mbart"
    model_types = ("mbart",)

    def load_model(self, path, dtype, artifact=False):
        return load_encoder_decoder(path, dtype=dtype, artifact=artifact)

    def wrap(self, model, projector, tokenizer, vocab, cfg) -> VisualMBart:
        s = cfg.stage2
        return VisualMBart(model, projector, tokenizer, vocab=vocab, tgt_lang=s.tgt_lang or None, label_smoothing=s.label_smoothing,
                           max_target_tokens=s.max_target_tokens)


BACKEND = MBartBackend()
