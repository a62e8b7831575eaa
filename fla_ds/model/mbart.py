"""Stage 2, encoder-decoder backend, as published: mBART (mBART-large-cc25 in the paper), fully
fine-tuned, with the projector's output in place of the encoder's word embeddings and no
text prompt.

    features (B, T, D) --Projector--> mBART encoder --> mBART decoder --> text

The vocabulary can be trimmed to the training corpus as the paper does (``trim_mbart_vocab``):
the embedding table, the tied LM head and ``final_logits_bias`` keep only the rows of the
tokens the texts use plus the specials, so the softmax runs over a few thousand tokens
instead of 250 000. Texts still go through the original tokenizer; an ``IdMap`` translates
its ids to the model's and back. Trim once, before training and outside ZeRO-3 (a partitioned
table cannot be cut): ``save_pretrained`` the trimmed model and ``IdMap.save`` next to it,
and load that folder for training.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

IGNORE_INDEX = -100
ID_MAP_NAME = "id_map.json"
SPECIAL_CONFIG_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id")
"""Token ids a config or generation config may hold, remapped when the vocabulary is trimmed."""


def load_encoder_decoder(path: str | os.PathLike, dtype: torch.dtype = torch.float32, artifact: bool = False):
    """(MBartForConditionalGeneration, tokenizer) from a local folder. Under ZeRO-3 create
    ``HfDeepSpeedConfig`` before calling (as for the decoder-only backend). ``artifact``: the
    folder is a trained artifact (a stage-2 ``mbart/``), loaded through
    ``fla_ds.artifacts.load_pretrained`` (safetensors only, every weight present and fitting;
    raises ArtifactError naming the folder or file)."""
    from transformers import AutoTokenizer, MBartForConditionalGeneration

    if not artifact:
        model = MBartForConditionalGeneration.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    from fla_ds.artifacts import hf_errors, load_pretrained

    model = load_pretrained(MBartForConditionalGeneration, path, dtype=dtype)
    with hf_errors(path, "the tokenizer"):
        return model, AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ------------------------------------------------------------------------------ trimmed vocabulary


class IdMap:
    """Model ids <-> tokenizer ids of a trimmed vocabulary. ``kept[new] = original``,
    ascending, so mBART's specials 0..3 (<s>, <pad>, </s>, <unk>) keep their ids. Method
    names follow ``TrimmedVocab`` (from_original, to_original)."""

    def __init__(self, kept: Sequence[int], unk_original: Optional[int] = None):
        self.kept = [int(i) for i in kept]
        self._new = {orig: new for new, orig in enumerate(self.kept)}
        self.unk_id = self._new.get(unk_original) if unk_original is not None else None

    @property
    def size(self) -> int:
        return len(self.kept)

    def from_original(self, ids: Iterable[int]) -> list[int]:
        """New ids; a token outside the trimmed vocabulary becomes UNK (an error without one)."""
        out = []
        for i in ids:
            new = self._new.get(int(i), self.unk_id)
            if new is None:
                raise KeyError(f"token id {int(i)} is not in the trimmed vocabulary, which has no UNK")
            out.append(new)
        return out

    def to_original(self, ids: Iterable[int] | torch.Tensor) -> list[int]:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return [self.kept[int(i)] for i in ids]

    def save(self, folder: str | os.PathLike) -> Path:
        path = Path(folder) / ID_MAP_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        unk = self.kept[self.unk_id] if self.unk_id is not None else None
        path.write_text(json.dumps({"kept": self.kept, "unk_original": unk}) + "\n", "utf-8")
        return path

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Optional["IdMap"]:
        """The map saved in ``folder``, or None where there is none (an untrimmed model)."""
        path = Path(folder) / ID_MAP_NAME
        if not path.is_file():
            return None
        data = json.loads(path.read_text("utf-8"))
        return cls(data["kept"], data.get("unk_original"))


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
    id_map = IdMap(kept, tokenizer.unk_token_id)
    index = torch.tensor(kept, dtype=torch.long, device=model.get_input_embeddings().weight.device)
    cut_vocab_rows(model, index)
    new_pad = id_map.from_original([model.config.pad_token_id])[0] if model.config.pad_token_id is not None else None
    for module in (model.get_input_embeddings(), model.model.encoder.embed_tokens, model.model.decoder.embed_tokens):
        module.num_embeddings, module.padding_idx = len(kept), new_pad
    model.get_output_embeddings().out_features = len(kept)
    remap_special_ids(model, id_map)
    return model, id_map


def cut_vocab_rows(model, index: torch.Tensor) -> None:
    tables = [model.get_input_embeddings().weight, model.model.encoder.embed_tokens.weight, model.model.decoder.embed_tokens.weight, model.get_output_embeddings().weight]
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


class VisualMBart(nn.Module):
    """Projector + mBART, all trainable (the paper fine-tunes mBART fully).

    The projector's output goes in as ``inputs_embeds``. mBART multiplies WORD embeddings by
    ``embed_scale`` (sqrt(d_model) when ``scale_embedding``) only when it looks up input_ids;
    ``inputs_embeds`` are used as given. No scale is applied here: the projector is trained
    and learns whatever magnitude suits, and the encoder's ``layernorm_embedding`` right after
    the learned positions normalises the sum anyway.

    Targets: ``text </s>``; the decoder reads ``start text``, where ``start`` is the language
    code ``tgt_lang`` when given (mBART-cc25's convention: the decoder starts from the target
    language's code, e.g. "de_DE") or the config's ``decoder_start_token_id`` (</s>). The
    same start token begins generation.

    ``tokenizer``: the original tokenizer; ``vocab``: the ``IdMap`` that ``trim_mbart_vocab``
    returned for a trimmed model, None for the full vocabulary."""

    def __init__(
        self,
        mbart,
        projector: nn.Module,
        tokenizer,
        vocab=None,
        tgt_lang: Optional[str] = None,
        label_smoothing: float = 0.2,
        max_target_tokens: Optional[int] = None,
    ):
        super().__init__()
        self.mbart = mbart
        self.projector = projector
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.label_smoothing = label_smoothing
        self.max_target_tokens = max_target_tokens
        config = mbart.config
        self.pad_id, self.eos_id = int(config.pad_token_id), int(config.eos_token_id)
        self.start_id = self.model_ids([token_id(tokenizer, tgt_lang)])[0] if tgt_lang else int(config.decoder_start_token_id)
        self.max_source_len = int(config.max_position_embeddings)

    # ---------------------------------------------------------------- ids

    def model_ids(self, original: Sequence[int]) -> list[int]:
        return self.vocab.from_original(original) if self.vocab is not None else list(original)

    def target_rows(self, texts: Sequence[str]) -> list[list[int]]:
        rows = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        cut = self.max_target_tokens
        return [self.model_ids(row[:cut] if cut else row) + [self.eos_id] for row in rows]

    def teacher_forcing(self, rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(decoder_input_ids, decoder_attention_mask, labels), right-padded: the decoder reads
        ``start t_1 .. t_n`` and must predict ``t_1 .. t_n </s>``."""
        width = max(len(r) for r in rows)
        inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long, device=device)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long, device=device)
        for i, row in enumerate(rows):
            labels[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
            inputs[i, : len(row)] = torch.tensor([self.start_id] + row[:-1], dtype=torch.long, device=device)
        return inputs, (labels != IGNORE_INDEX).long(), labels

    def decode(self, rows: torch.Tensor) -> list[str]:
        """Generated rows (start token first) -> texts: cut at the first </s>, back to the
        tokenizer's ids, specials dropped."""
        texts = []
        for row in rows.tolist():
            row = row[1:]
            if self.eos_id in row:
                row = row[: row.index(self.eos_id)]
            row = [i for i in row if i != self.pad_id]
            original = self.vocab.to_original(row) if self.vocab is not None else row
            texts.append(self.tokenizer.decode(original, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip())
        return texts

    # ---------------------------------------------------------------- encoder input

    def encoder_inputs(self, features: torch.Tensor, feat_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if features.shape[1] > self.max_source_len:
            # mBART's learned positions stop there; indexing past them fails deep inside.
            raise ValueError(f"clips of {features.shape[1]} feature steps exceed mBART's {self.max_source_len} positions: subsample or cut them")
        embeds = self.projector(features).to(self.mbart.get_input_embeddings().weight.dtype)
        return embeds, feat_mask.to(device=features.device, dtype=torch.long)

    # ---------------------------------------------------------------- training

    def forward(self, features: torch.Tensor, feat_mask: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_sum, n_tokens)``: label-smoothed cross-entropy SUMMED over the target tokens
        and </s> (torch's definition: (1 - eps) NLL + eps x mean over the vocabulary of
        -log p; padding contributes nothing), and their count, for the loop to normalise
        across ranks."""
        embeds, mask = self.encoder_inputs(features, feat_mask)
        decoder_ids, decoder_mask, labels = self.teacher_forcing(self.target_rows(texts), features.device)
        logits = self.mbart(
            inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask, use_cache=False
        ).logits
        counted = labels != IGNORE_INDEX
        loss = F.cross_entropy(logits[counted].float(), labels[counted], label_smoothing=self.label_smoothing, reduction="sum")
        return loss, counted.sum()

    # ---------------------------------------------------------------- inference

    @torch.no_grad()
    def generate(
        self, features: torch.Tensor, feat_mask: torch.Tensor, num_beams: int = 5, max_new_tokens: int = 64, synced_gpus: bool = False
    ) -> list[str]:
        """Beam search; one string per clip. Put the module in eval mode first (dropout);
        ``synced_gpus=True`` on every rank under ZeRO-3."""
        embeds, mask = self.encoder_inputs(features, feat_mask)
        out = self.mbart.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            decoder_start_token_id=self.start_id,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            synced_gpus=synced_gpus,
        )
        return self.decode(out)
