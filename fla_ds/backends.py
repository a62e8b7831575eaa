"""Stage-2 language-model backends, by the name ``stage2.backend`` gives: a registry, as
``fla_ds.corpus.READERS`` is for corpora.

A backend is one module holding a ``BACKEND`` object that satisfies ``Backend`` below, and one
line in ``BACKENDS``; nothing else in fla_ds names a backend. Stage 2 (``fla_ds/stage2.py``),
inference and export (``fla_ds/translator.py``, ``fla_ds/inference.py``) and the benchmark go
through ``get_backend(cfg.stage2.backend)`` alone.

    decoder_only   fla_ds/model/llm.py    a LLaMA-family causal LM in 4-bit NF4 with LoRA (QLoRA);
                                          the visual tokens go in front of a text prompt
    mbart          fla_ds/model/mbart.py  mBART fully fine-tuned, the projector output as the
                                          encoder's input embeddings (the paper's)
    t5             fla_ds/model/t5.py     T5 / mT5 likewise (Uni-Sign's and SpaMo's choice)

This module stays light (the config schema imports ``BACKENDS`` to refuse unknown names at
parse time): a backend's module is imported only when ``get_backend`` asks for it.
"""
from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

BACKENDS: dict[str, str] = {
    "decoder_only": "fla_ds.model.llm",
    "mbart": "fla_ds.model.mbart",
    "t5": "fla_ds.model.t5",
}
"""name -> the module whose ``BACKEND`` implements it."""


class VisualLanguageModel(Protocol):
    """What a backend builds and loads: the ``torch.nn.Module`` DeepSpeed wraps in stage 2 (the
    projector plus a pretrained language model reading its output), and what translates.

    features: float (B, T, D), the frozen stage-1 encoder's (any float dtype: the projector
    casts); feat_mask: bool (B, T), True on real positions, which come first (padding may hold
    anything). In training the mask is the loader's, in host memory (``fla_ds.stage2.Stage2Inputs``),
    so the model can lay out its inputs without reading the device; copy it with
    ``fla_ds.feed.to_device`` where the device needs it. In inference it is on the device."""

    projector: torch.nn.Module
    """``fla_ds.model.projector.Projector``: features (B, T, D) -> (B, T, hidden); saved into
    ``projector/`` by the stage, with its own learning rate."""
    tokenizer: Any
    """The language model's (original) tokenizer."""

    def __call__(self, features: torch.Tensor, feat_mask: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss: float scalar, the cross-entropy SUMMED over the B texts' target tokens and
        EOS; n_tokens: long scalar, how many): the training loop divides by the count of all
        ranks (``fla_ds.model.loss.target_token_loss``)."""

    def generate(self, features: torch.Tensor, feat_mask: torch.Tensor, max_new_tokens: int = 64, num_beams: int = 5,
                 synced_gpus: bool = False) -> list[str]:
        """Beam search, one text per clip (B strings), specials dropped. In eval mode;
        ``synced_gpus=True`` on every rank under ZeRO-3 (else ranks hang)."""


@runtime_checkable
class Backend(Protocol):
    """One stage-2 backend: how its model is built for training, what of it is trained and
    saved, how a step folder or bundle loads it back for inference (untrusted input: through
    ``fla_ds.artifacts``), and what a bundle takes."""

    name: str
    """Its ``stage2.backend`` value."""
    folder: str
    """The sub-folder of a step folder holding what it trained (``adapter``, ``mbart``, ``t5``)."""
    bundle_parts: tuple[str, ...]
    """What an inference bundle copies from a step folder besides config.yaml, encoder/ and
    projector/ (its folder, and e.g. the tokenizer)."""
    model_types: tuple[str, ...]
    """The Hugging Face ``model_type`` values of the models it can load (empty: any); checked
    from config.json before a launch (``fla_ds.preflight``)."""

    def build(self, cfg, lm_path: str, feature_dim: int, dtype: torch.dtype, ds_config: dict | None = None) -> VisualLanguageModel:
        """The model to train: a new projector (``new_projector``) and the pretrained language
        model at ``lm_path`` (``language_model_path``), every parameter in ``dtype``, the
        trainable ones requiring grad. ``ds_config``: the resolved DeepSpeed config; under
        ZeRO-3 the model must load partitioned (``zero3_loading``)."""

    def trainable_state(self, model: VisualLanguageModel) -> dict[str, torch.Tensor]:
        """CPU copies of the state-dict entries that training changes, ``projector.*``
        included: what a checkpoint keeps besides DeepSpeed's state. Under ZeRO-3 call it
        inside ``fla_ds.distributed.gathered`` of the trainable parameters."""

    def save(self, model: VisualLanguageModel, state: dict[str, torch.Tensor], step_dir: Path) -> None:
        """Write ``step_dir/<folder>`` (and whatever else it needs at inference, e.g. the
        tokenizer) from ``state`` (``trainable_state``), in Hugging Face formats, safetensors.
        Rank 0 only."""

    def load(self, folder: Path, cfg, projector: torch.nn.Module, dtype: torch.dtype, bundle: dict) -> VisualLanguageModel:
        """The trained model from a verified stage-2 step folder or bundle ``folder`` (its
        config ``cfg``, its loaded ``projector``; ``bundle``: its bundle.json, {} for a step
        folder), every weight checked by ``fla_ds.artifacts``; raises ArtifactError."""

    def check(self, step_dir: Path, cfg) -> None:
        """Check the weights a bundle takes from ``step_dir`` without loading the language
        model (``fla-ds export``, before anything is copied); raises ArtifactError."""

    def export(self, bundle_dir: Path, cfg, merge: bool) -> dict:
        """Finish a bundle whose parts are already copied into ``bundle_dir`` (``--merge``:
        what there is to fold in); returns the fields it adds to bundle.json."""


def get_backend(name: str) -> Backend:
    """The backend registered as ``name``; ValueError naming the valid ones otherwise."""
    key = str(name).strip().lower()
    if key not in BACKENDS:
        raise ValueError(f"stage2.backend must be one of {', '.join(BACKENDS)}, got '{name}'")
    return importlib.import_module(BACKENDS[key]).BACKEND


# ------------------------------------------------------------------ what every backend shares


def language_model_path(cfg) -> str:
    """``stage2.model``, or the embedded SmolLM2-135M-Instruct where it is empty."""
    if cfg.stage2.model:
        return cfg.stage2.model
    from fla_ds.llm_assets import smollm2_path

    return str(smollm2_path())


def lm_hidden_size(path: str) -> int:
    """The language model's width, from its config alone (a local folder or a hub id), before
    any weight loads."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    return int(getattr(config, "hidden_size", None) or config.d_model)


def new_projector(cfg, lm_path: str, feature_dim: int, dtype: torch.dtype):
    """A freshly initialised projector: features (B, T, ``feature_dim``) -> the language
    model's width, with ``stage2.projector_hidden`` hidden units (0: that width), in ``dtype``.
    Built before the language model loads, so its initialisation draws the same random numbers
    whatever the backend."""
    from fla_ds.model.projector import Projector

    return Projector(feature_dim, lm_hidden_size(lm_path), cfg.stage2.projector_hidden or None).to(dtype)


def zero3_loading(ds_config: dict | None):
    """``HfDeepSpeedConfig`` for a ZeRO-3 DeepSpeed config, None otherwise. Create it BEFORE
    ``from_pretrained``, so that transformers partitions the weights while loading them, and
    keep a reference as long as the model lives: transformers holds it only weakly."""
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


# ------------------------------------------------------------------ a base model inside a bundle

PRETRAINED_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
"""Besides the safetensors weights (``model.safetensors``, or its index and the shards it
names), what a Hugging Face model folder needs to load: config, generation config, tokenizer.
Never ``*.bin``/``*.pt`` (pickles), ``*.py`` (remote code) or anything else the folder holds."""


def local_model_folder(name: str) -> Path:
    """The folder a language model loads from: ``name`` itself, or a hub id's snapshot already
    in the Hugging Face cache (nothing is downloaded). Raises ArtifactError."""
    from fla_ds.artifacts import ArtifactError, one_line

    if Path(name).is_dir():
        return Path(name).resolve()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{name}: the base model is neither a folder nor in the Hugging Face cache ({one_line(exc)})") from None


def pretrained_file_names(folder: Path) -> list[str]:
    """The files of ``folder`` that ``copy_pretrained`` takes (``PRETRAINED_FILES`` present,
    and the safetensors weights). Raises ArtifactError when it has no safetensors weights."""
    from fla_ds.artifacts import ArtifactError, read_json

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        shards = list(weight_map.values()) if isinstance(weight_map, dict) else []
        if not shards or any(not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors") for n in shards):
            raise ArtifactError(f"{index}: its weight_map does not name safetensors files of the folder")
        weights = [index.name, *sorted(set(shards))]
    elif (folder / "model.safetensors").is_file():
        weights = ["model.safetensors"]
    else:
        raise ArtifactError(f"{folder}: the base model has no model.safetensors (or its index): a bundle holds safetensors weights only "
                            "(save the model with save_pretrained(..., safe_serialization=True) and train from that)")
    return weights + [n for n in PRETRAINED_FILES if (folder / n).is_file()]


def copy_pretrained(source: Path, dest: Path) -> list[str]:
    """Copy the Hugging Face model folder ``source`` into ``dest`` (a new folder), only the files
    it needs to load (``pretrained_file_names``; links, such as the Hugging Face cache's, are
    followed and written as plain files), then check the copy as an artifact (safetensors
    intact, index consistent: ``fla_ds.artifacts.check_hf_folder``). Returns the names copied.
    Raises ArtifactError."""
    import shutil

    from fla_ds.artifacts import check_hf_folder

    names = pretrained_file_names(Path(source))
    dest.mkdir(parents=True)
    for name in names:
        shutil.copyfile(Path(source) / name, dest / name)
    check_hf_folder(dest, "config.json", "model")
    return names
