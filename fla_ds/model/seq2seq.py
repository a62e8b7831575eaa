"""What the encoder-decoder backends share (mBART: fla_ds/model/mbart.py, T5/mT5:
fla_ds/model/t5.py): the projector's output goes in as the encoder's ``inputs_embeds``, the
decoder generates the text, everything is fine-tuned.

    features (B, T, D) --Projector--> encoder (inputs_embeds) --> decoder --> text

A backend is then a subclass of ``VisualSeq2Seq`` naming the attribute its language model
sits under (the prefix of its state-dict keys: ``mbart.``, ``t5.``), and a subclass of
``Seq2SeqBackend`` saying how its pretrained model loads and how the module is made.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn

from fla_ds.feed import to_device
from fla_ds.model.loss import IGNORE_INDEX, target_token_loss


class VisualSeq2Seq(nn.Module):
    """Projector + a Hugging Face encoder-decoder, all trainable.

    The projector's output goes in as ``inputs_embeds`` as it is: the projector is trained
    and learns whatever magnitude suits (mBART scales only looked-up word embeddings, T5 none).

    Targets: ``text EOS``; the decoder reads ``start text``, where ``start_id`` (a model id) is
    given (mBART: the target language's code) or the config's ``decoder_start_token_id`` (the
    pad token where the config has none, as T5's). The same start token begins generation.

    ``tokenizer``: the original tokenizer; ``vocab``: a ``fla_ds.vocab.IdMap`` when the model's
    vocabulary was trimmed (ids differ from the tokenizer's), None for the full vocabulary.
    ``max_target_tokens``: longer targets are cut (EOS kept)."""

    lm_attr: ClassVar[str] = "seq2seq"
    """The attribute the language model sits under: its state-dict prefix, in checkpoints."""
    lm_label: ClassVar[str] = "the language model"
    """How messages name it."""

    def __init__(self, lm, projector: nn.Module, tokenizer, vocab=None, start_id: int | None = None, label_smoothing: float = 0.2,
                 max_target_tokens: int | None = None):
        super().__init__()
        setattr(self, self.lm_attr, lm)  # registered as a submodule under that name
        self.projector = projector
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.label_smoothing = label_smoothing
        self.max_target_tokens = max_target_tokens
        config = lm.config
        self.pad_id, self.eos_id = int(config.pad_token_id), int(config.eos_token_id)
        start = getattr(config, "decoder_start_token_id", None)
        self.start_id = int(start_id if start_id is not None else start if start is not None else self.pad_id)
        positions = getattr(config, "max_position_embeddings", None)
        self.max_source_len: int | None = int(positions) if positions else None
        """Learned encoder positions (mBART); None where positions are relative (T5)."""

    @property
    def lm(self) -> nn.Module:
        """The encoder-decoder language model."""
        return getattr(self, self.lm_attr)

    # ---------------------------------------------------------------- ids

    def model_ids(self, original: Sequence[int]) -> list[int]:
        return self.vocab.from_original(original) if self.vocab is not None else list(original)

    def target_rows(self, texts: Sequence[str]) -> list[list[int]]:
        """Model ids of each text, cut to ``max_target_tokens``, then EOS."""
        rows = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        cut = self.max_target_tokens
        return [self.model_ids(row[:cut] if cut else row) + [self.eos_id] for row in rows]

    def teacher_forcing(self, rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(decoder_input_ids, decoder_attention_mask, labels), long (B, L), right-padded: the
        decoder reads ``start t_1 .. t_n`` and must predict ``t_1 .. t_n EOS``."""
        width = max(len(r) for r in rows)
        inputs = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # filled on the host, copied once each
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            labels[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            inputs[i, : len(row)] = torch.tensor([self.start_id] + row[:-1], dtype=torch.long)
        return to_device(inputs, device), to_device((labels != IGNORE_INDEX).long(), device), to_device(labels, device)

    def decode(self, rows: torch.Tensor) -> list[str]:
        """Generated rows, long (B, L), start token first -> texts: cut at the first EOS, back
        to the tokenizer's ids, specials dropped."""
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
        """(inputs_embeds (B, T, d_model) in the language model's dtype, attention mask long (B, T))."""
        if self.max_source_len is not None and features.shape[1] > self.max_source_len:
            # Learned positions stop there; indexing past them fails deep inside.
            raise ValueError(f"clips of {features.shape[1]} feature steps exceed {self.lm_label}'s {self.max_source_len} positions: "
                             "subsample or cut them")
        embeds = self.projector(features).to(self.lm.get_input_embeddings().weight.dtype)
        return embeds, to_device(feat_mask.long(), features.device)  # the loader's host mask in training

    # ---------------------------------------------------------------- training

    def forward(self, features: torch.Tensor, feat_mask: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_sum, n_tokens)``: label-smoothed cross-entropy SUMMED over the target tokens
        and EOS, and their count (``fla_ds.model.loss.target_token_loss``), for the loop to
        normalise across ranks."""
        embeds, mask = self.encoder_inputs(features, feat_mask)
        decoder_ids, decoder_mask, labels = self.teacher_forcing(self.target_rows(texts), features.device)
        logits = self.lm(
            inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask, use_cache=False
        ).logits
        return target_token_loss(logits, labels, self.label_smoothing)

    # ---------------------------------------------------------------- inference

    @torch.no_grad()
    def generate(
        self, features: torch.Tensor, feat_mask: torch.Tensor, max_new_tokens: int = 64, num_beams: int = 5, synced_gpus: bool = False
    ) -> list[str]:
        """Beam search; one string per clip. Put the module in eval mode first (dropout);
        ``synced_gpus=True`` on every rank under ZeRO-3."""
        embeds, mask = self.encoder_inputs(features, feat_mask)
        out = self.lm.generate(
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


class Seq2SeqBackend:
    """``fla_ds.backends.Backend`` for an encoder-decoder, fully fine-tuned: the whole model is
    trained and saved as a Hugging Face folder ``<folder>/`` (weights, tokenizer, and the
    ``id_map.json`` of a trimmed vocabulary). Subclasses give ``name``, ``folder``,
    ``model_types``, ``load_model`` and ``wrap``."""

    name: str
    folder: str
    model_types: tuple[str, ...] = ()

    @property
    def bundle_parts(self) -> tuple[str, ...]:
        return (self.folder,)

    def load_model(self, path: str | os.PathLike, dtype: torch.dtype, artifact: bool = False):
        """(model, tokenizer) from a folder; ``artifact``: a trained one, through
        ``fla_ds.artifacts.load_pretrained`` (raises ArtifactError)."""
        raise NotImplementedError

    def wrap(self, model, projector: nn.Module, tokenizer, vocab, cfg) -> VisualSeq2Seq:
        """The module around a loaded model, with the stage-2 settings of ``cfg``."""
        raise NotImplementedError

    def build(self, cfg, lm_path: str, feature_dim: int, dtype: torch.dtype, ds_config: dict | None = None) -> VisualSeq2Seq:
        from fla_ds.backends import new_projector, zero3_loading
        from fla_ds.vocab import IdMap

        keep = zero3_loading(ds_config)  # before from_pretrained
        projector = new_projector(cfg, lm_path, feature_dim, dtype)
        model, tokenizer = self.load_model(lm_path, dtype)
        module = self.wrap(model, projector, tokenizer, IdMap.load(lm_path), cfg)
        module.hf_deepspeed_config = keep  # lives as long as the model
        return module

    def trainable_state(self, model: VisualSeq2Seq) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}

    def save(self, model: VisualSeq2Seq, state: dict[str, torch.Tensor], step_dir: Path) -> None:
        out = Path(step_dir) / self.folder
        prefix = model.lm_attr + "."
        model.lm.save_pretrained(str(out), state_dict={k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, safe_serialization=True)
        model.tokenizer.save_pretrained(str(out))
        if model.vocab is not None:
            model.vocab.save(out)

    def load(self, folder: Path, cfg, projector: nn.Module, dtype: torch.dtype, bundle: dict) -> VisualSeq2Seq:
        from fla_ds.artifacts import hf_errors
        from fla_ds.vocab import IdMap

        where = Path(folder) / self.folder
        model, tokenizer = self.load_model(where, dtype, artifact=True)
        with hf_errors(where, "the vocabulary map"):
            vocab = IdMap.load(where)
        return self.wrap(model, projector, tokenizer, vocab, cfg)

    def check(self, step_dir: Path, cfg) -> None:
        from fla_ds.artifacts import check_hf_folder

        check_hf_folder(Path(step_dir) / self.folder, "config.json", "model")

    def export(self, bundle_dir: Path, cfg, merge: bool) -> dict:
        return {}  # fully fine-tuned: nothing to merge


def load_seq2seq(model_cls, path: str | os.PathLike, dtype: torch.dtype, artifact: bool):
    """(model, tokenizer) of class ``model_cls`` from a local folder, never from a hub. Under
    ZeRO-3 create ``HfDeepSpeedConfig`` before calling. ``artifact``: the folder is a trained
    artifact, loaded through ``fla_ds.artifacts.load_pretrained`` (safetensors only, every
    weight present and fitting; raises ArtifactError naming the folder or file)."""
    from transformers import AutoTokenizer

    if not artifact:
        model = model_cls.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        return model, AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    from fla_ds.artifacts import hf_errors, load_pretrained

    model = load_pretrained(model_cls, path, dtype=dtype)
    with hf_errors(path, "the tokenizer"):
        return model, AutoTokenizer.from_pretrained(str(path), local_files_only=True)
