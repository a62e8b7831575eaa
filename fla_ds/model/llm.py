"""Stage 2, decoder-only backend (``decoder_only``): a LLaMA-family model in 4-bit NF4 with
LoRA (QLoRA) reading the frozen encoder's features as soft tokens in front of a text prompt.

    features (B, T, D) --Projector--> visual tokens --+
    prompt + target ids --LLM input embeddings-------+--> [BOS] visual prompt target EOS --> LLM

Loading order under ZeRO-3: the caller creates ``HfDeepSpeedConfig(ds_config)`` (and keeps a
reference to it) BEFORE calling ``load_decoder_only``, so that ``from_pretrained`` partitions
the weights while loading; then wraps ``VisualLLM`` with ``deepspeed.initialize``. Everything
here runs the model through its modules (never reads a weight's values), so the ZeRO-3 hooks
gather what each call needs; ``generate`` must then get ``synced_gpus=True`` on every rank.

A saved adapter is a plain peft folder: ``PeftModel.from_pretrained(base, folder)`` loads it
in a process without DeepSpeed (``load_for_inference`` does that with the same dtypes as
training, so its outputs equal the trained model's). A step folder holds ``adapter/`` and
``tokenizer/``. A bundle (``fla-ds export``) holds the base model itself (``base/``), or with
``--merge`` the adapter folded into the dequantized 4-bit weights (``model/``, full precision),
which then need neither bitsandbytes nor peft (fla_ds/model/merge.py).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fla_ds.feed import to_device
from fla_ds.model.loss import IGNORE_INDEX, target_token_loss

# ------------------------------------------------------------------------------ loading


def nf4_config(dtype: torch.dtype):
    """QLoRA's quantisation: NF4 with double quantisation. Compute and storage dtype are the
    training dtype: ZeRO-3 partitions and gathers parameters by dtype, and a 4-bit weight
    stored as uint8 beside bf16 parameters breaks its flat buffers."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def keep_4bit_weights_unpacked(model: nn.Module) -> int:
    """Turn off bitsandbytes' CPU repacking on every ``Linear4bit``; returns how many.

    Why: bitsandbytes 0.50.2, on a CPU with AVX512-BF16 (the machines this project runs on),
    rewrites a 4-bit weight IN PLACE into a CPU-only packed layout the first time the layer
    runs in eval mode without grad, i.e. on the first ``generate``. Nothing fails, but from
    then on: the weight's dtype and shape change (uint8 instead of the storage dtype), so
    ZeRO-3 generates garbage and ``save_checkpoint`` crashes; gradients through the layer are
    silently wrong (the packed kernel has no autograd formula), so training after an
    evaluation degrades; and ``save_pretrained`` converts the weight back lossily, changing
    the model it saves from. Off everywhere, so every machine computes alike; it only costs
    some CPU inference speed. ``tests/test_llm_backends.py`` keeps the regression test."""
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes, so no 4-bit layer to fix
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def cast_floating_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter to ``dtype``, except the 4-bit weights.

    ``prepare_model_for_kbit_training`` upcasts norms, embeddings and the LM head to fp32 and
    peft may create LoRA weights in fp32; ZeRO-3 under bf16 refuses a model of mixed dtypes.
    A ``Params4bit`` stored as bf16 looks floating but holds packed 4-bit codes: casting it
    would destroy it, so it is skipped by type (peft skips it the same way)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype and type(param).__name__ != "Params4bit":
            param.data = param.data.to(dtype)


def load_generation_tokenizer(path: str | os.PathLike):
    """The model's tokenizer, padding on the LEFT (batched generation continues every row from
    the right edge) and with a pad token (EOS where it has none, as LLaMA's)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no EOS token: generation could never stop")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(path: str | os.PathLike, qlora: bool, dtype: torch.dtype, device_map=None, artifact: bool = False):
    """The causal LM from a local folder, in 4-bit NF4 when ``qlora``; repacking turned off.
    ``artifact``: the folder is a trained artifact (a bundle's merged ``model/``), loaded
    through ``fla_ds.artifacts.load_pretrained`` (safetensors only, every weight present and
    fitting; raises ArtifactError); otherwise a pre-trained model, as Hugging Face loads it."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if qlora:
        kwargs["quantization_config"] = nf4_config(dtype)
    if artifact:
        from fla_ds.artifacts import load_pretrained

        model = load_pretrained(AutoModelForCausalLM, path, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
    fixed = keep_4bit_weights_unpacked(model)
    if qlora and fixed == 0:
        raise RuntimeError(f"{path} loaded in 4-bit but holds no bitsandbytes Linear4bit layer")
    return model


def freeze_base(model, qlora: bool, gradient_checkpointing: bool):
    """Freeze every base weight (LoRA adds the trainable ones) and turn on activation
    checkpointing when asked; for 4-bit, peft's ``prepare_model_for_kbit_training``.

    Reentrant checkpointing: the non-reentrant kind checks the shapes of saved tensors on
    recompute, and under ZeRO-3 frozen weights are partitioned again by then (shape [0]), which
    fails (huggingface/transformers#47254). Reentrant checkpointing needs its inputs to require
    grad, which the projector's output does (and ``enable_input_require_grads`` ensures)."""
    kwargs = {"use_reentrant": True}
    if qlora:
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=kwargs)
    model.requires_grad_(False)
    if gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    return model


def load_decoder_only(
    path: str | os.PathLike,
    qlora: bool = True,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    target_modules: str | Sequence[str] = "all-linear",
    dtype: torch.dtype = torch.bfloat16,
    gradient_checkpointing: bool = True,
    device_map=None,
):
    """(peft model, tokenizer) ready for stage-2 training.

    ``qlora``: the base in 4-bit NF4 (QLoRA); False loads it in ``dtype`` (tests, GPU runs in
    full precision); LoRA is applied either way, and only LoRA parameters are trainable.
    Every floating parameter ends in ``dtype`` (ZeRO-3 + bf16 needs that; DeepSpeed keeps the
    fp32 master copies of the trainable ones). Under ZeRO-3, call this after creating
    ``HfDeepSpeedConfig`` (see the module docstring). ``device_map`` (e.g. ``{"": local_rank}``)
    quantises straight onto a GPU instead of on the CPU first; leave it None under ZeRO-3,
    which places the weights itself."""
    from peft import LoraConfig, get_peft_model

    tokenizer = load_generation_tokenizer(path)
    model = freeze_base(load_base(path, qlora, dtype, device_map), qlora, gradient_checkpointing)
    lora = LoraConfig(task_type="CAUSAL_LM", r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules)
    model = get_peft_model(model, lora, autocast_adapter_dtype=False)
    cast_floating_params(model, dtype)
    model.config.use_cache = False  # training; generate turns the cache on for itself
    return model, tokenizer


def save_adapter(model, folder: str | os.PathLike, state_dict: dict | None = None) -> None:
    """The LoRA adapter as a Hugging Face peft folder (adapter_config.json +
    adapter_model.safetensors). ``model``: a ``VisualLLM`` or the peft model. Under ZeRO-3
    the parameters are partitioned: pass a gathered ``state_dict`` (of either; peft keeps only
    the adapter's entries) and call it on one rank."""
    peft_model = model.llm if isinstance(model, VisualLLM) else model
    if state_dict is not None and isinstance(model, VisualLLM):
        # A VisualLLM's names carry "llm." in front of the peft model's own.
        state_dict = {k[len("llm."):] if k.startswith("llm.") else k: v for k, v in state_dict.items()}
    peft_model.save_pretrained(str(folder), state_dict=state_dict, safe_serialization=True)


def load_for_inference(base_path: str | os.PathLike, adapter_folder: str | os.PathLike, qlora: bool = True, dtype: torch.dtype = torch.bfloat16,
                       artifact: bool = False):
    """(peft model in eval mode, tokenizer): the base as in training (4-bit when ``qlora``,
    every other weight in ``dtype``) with the saved adapter, frozen. No DeepSpeed needed.
    The adapter is checked before the base loads (``fla_ds.artifacts.load_adapter``: safetensors
    only, every tensor present and of the shape its config gives); ``artifact``: the base is a
    bundle's ``base/``, checked as a trained artifact (``load_base``). Raises ArtifactError."""
    from fla_ds.artifacts import hf_errors, load_adapter

    with hf_errors(base_path, "the tokenizer"):
        tokenizer = load_generation_tokenizer(base_path)
    model = load_adapter(base_path, adapter_folder, lambda: load_base(base_path, qlora, dtype, artifact=artifact), autocast_adapter_dtype=False)
    cast_floating_params(model, dtype)  # the same dtypes as in training, so the same outputs
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------ the model


@dataclass
class LMBatch:
    """One left-padded batch of input embeddings for the LLM."""

    embeds: torch.Tensor  # (B, L, H)
    attention_mask: torch.Tensor  # (B, L) long, 0 on padding
    position_ids: torch.Tensor  # (B, L) long
    labels: torch.Tensor | None  # (B, L) long, IGNORE_INDEX except target tokens + EOS


def leading_special_ids(tokenizer) -> list[int]:
    """BOS if this tokenizer puts one in front of a text (LLaMA 2 and 3 do, SmolLM2 does not):
    the sequence then starts the way the model saw every sequence start in pre-training."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [bos] if ids[:1] == [bos] else []


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids counted over real positions only, exactly as Hugging Face ``generate``
    derives them (padding gets 0), so training and generation place every token alike."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def left_pad(rows: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """(L_i, H) rows -> (B, ``width``, H), zeros on the left. Lengths are host ints: no sync."""
    return torch.stack([F.pad(r, (0, 0, width - len(r), 0)) for r in rows])


def prefix_lengths(mask: torch.Tensor) -> list[int]:
    """Real positions per row of a (B, T) bool mask whose real positions come first (every
    batch fla_ds makes: ``fla_ds.batch.collate_features``; the encoder keeps its input mask).
    A host mask is read through numpy, never the device, and checked to be such a prefix
    (raises ValueError); a device mask costs one host sync for all rows (inference)."""
    if mask.device.type != "cpu":
        return mask.sum(1).tolist()
    real = mask.numpy().astype(bool)
    lengths = real.sum(1)
    if not (real == (np.arange(real.shape[1])[None, :] < lengths[:, None])).all():
        raise ValueError("feature mask: real positions must come first in every row (padding only at the end)")
    return lengths.tolist()


class VisualLLM(nn.Module):
    """Projector + causal LM. Each row is, left-padded to the batch's longest:

        [BOS] v_1 .. v_n  prompt tokens  target tokens EOS

    where v_1..v_n are the projected features of the clip's REAL frames only (padded frames
    are dropped, so all padding of a row sits on its left and carries attention mask 0).
    Labels are IGNORE_INDEX everywhere except the target tokens and EOS: the loss is on the
    translation only. The target is tokenized on its own (no leading space), the same way in
    training and in generation, so generated ids decode straight into the text.

    ``max_target_tokens``: longer targets are cut (EOS kept) to bound memory."""

    def __init__(self, llm, tokenizer, projector: nn.Module, prompt: str, max_target_tokens: int | None = None):
        super().__init__()
        self.llm = llm
        self.projector = projector
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.max_target_tokens = max_target_tokens
        self.head_ids = leading_special_ids(tokenizer)
        self.prompt_ids: list[int] = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        self.eos_id = int(tokenizer.eos_token_id)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)

    # ---------------------------------------------------------------- inputs

    def target_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, cut to ``max_target_tokens``, then EOS."""
        rows = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        cut = self.max_target_tokens
        return [(row[:cut] if cut else row) + [self.eos_id] for row in rows]

    def embed_text(self, rows: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
        """(B, max len, H) input embeddings of right-padded id rows, in one call of the LLM's
        embedding module (under ZeRO-3 its hook gathers the partitioned table)."""
        ids = torch.full((len(rows), max(len(r) for r in rows)), self.pad_id, dtype=torch.long)  # filled on the host, copied once
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return self.llm.get_input_embeddings()(to_device(ids, device))

    def build_batch(self, features: torch.Tensor, feat_mask: torch.Tensor, targets: list[list[int]] | None) -> LMBatch:
        """Rows as in the class docstring; ``targets`` None gives generation inputs (no target).
        features: (B, T, D) on the device; feat_mask: bool (B, T), real positions first, on the
        host (training passes the loader's: the whole layout is then worked out on the host and
        nothing waits on the device) or on the device (one host sync, ``prefix_lengths``)."""
        device = features.device
        lengths = prefix_lengths(feat_mask)
        tails = [self.prompt_ids + t for t in targets] if targets is not None else [self.prompt_ids] * len(features)
        text_rows = [self.head_ids + tail for tail in tails]
        text = self.embed_text(text_rows, device)
        # The projector may run in another dtype (fp32 features, bf16 LLM): the LLM's own.
        visual = self.projector(features).to(text.dtype)
        n_head = len(self.head_ids)
        rows = [torch.cat([text[i, :n_head], visual[i, : lengths[i]], text[i, n_head : len(text_rows[i])]]) for i in range(len(text_rows))]
        sizes = [len(r) for r in rows]  # host ints: the layout never reads the device
        width = max(sizes)
        attention_mask = (torch.arange(width)[None, :] >= width - torch.tensor(sizes)[:, None]).long()  # host: left padding is 0
        labels = None
        if targets is not None:
            # Every row ends with its target, so after left padding the targets are right-aligned.
            labels = torch.full(attention_mask.shape, IGNORE_INDEX, dtype=torch.long)
            for i, target in enumerate(targets):
                labels[i, width - len(target) :] = torch.tensor(target, dtype=torch.long)
            labels = to_device(labels, device)
        return LMBatch(left_pad(rows, width), to_device(attention_mask, device), to_device(positions_from_mask(attention_mask), device), labels)

    # ---------------------------------------------------------------- training

    def forward(self, features: torch.Tensor, feat_mask: torch.Tensor, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss_sum, n_tokens)``: cross-entropy SUMMED over the target tokens and EOS, and
        how many there are (features: float (B, T, D), feat_mask: bool (B, T), B texts); the
        training loop divides by the count all-reduced across ranks
        (``fla_ds.model.loss.target_token_loss``)."""
        targets = self.target_ids(texts)
        batch = self.build_batch(features, feat_mask, targets)
        width = batch.labels.shape[1]
        # Targets are right-aligned: logits are needed only for the last (longest target + 1)
        # positions, which spares the (B, L, vocab) tensor over visual and prompt tokens.
        keep = min(max(len(t) for t in targets) + 1, width)
        out = self.llm(
            inputs_embeds=batch.embeds,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
            logits_to_keep=keep,
        )
        logits = out.logits[:, :-1]  # positions width-keep .. width-2 predict the next token
        return target_token_loss(logits, batch.labels[:, width - keep + 1 :])

    # ---------------------------------------------------------------- inference

    @torch.no_grad()
    def generate(
        self, features: torch.Tensor, feat_mask: torch.Tensor, max_new_tokens: int = 64, num_beams: int = 5, synced_gpus: bool = False
    ) -> list[str]:
        """Beam search from [BOS] visual prompt; one string per clip. features: float (B, T, D),
        feat_mask: bool (B, T). Put the module in eval mode first (LoRA dropout).
        ``synced_gpus=True`` on every rank under ZeRO-3."""
        batch = self.build_batch(features, feat_mask, None)
        # Without input_ids, generate returns only the new tokens.
        out = self.llm.generate(
            inputs_embeds=batch.embeds,
            attention_mask=batch.attention_mask,
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            do_sample=False,
            synced_gpus=synced_gpus,
            pad_token_id=self.pad_id,
            eos_token_id=self.eos_id,
            use_cache=True,
        )
        texts = self.tokenizer.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [t.strip() for t in texts]


# ------------------------------------------------------------------------------ the backend


class DecoderOnlyBackend:
    """``stage2.backend=decoder_only`` (``fla_ds.backends.Backend``): ``stage2.model`` any
    LLaMA-family folder (default the embedded SmolLM2-135M-Instruct), QLoRA (``stage2.qlora``,
    ``lora_*``), ``stage2.prompt``; the LoRA adapter in ``adapter/``, the tokenizer in
    ``tokenizer/``. A bundle holds the base model in ``base/``, or the merged model in ``model/``."""

    name = "decoder_only"
    folder = "adapter"
    bundle_parts = ("adapter", "tokenizer")
    model_types: tuple[str, ...] = ()  # any causal LM transformers loads
    base = "base"  # the bundle's copy of the base model (fla_ds.backends.copy_pretrained)

    def build(self, cfg, lm_path: str, feature_dim: int, dtype: torch.dtype, ds_config: dict | None = None) -> VisualLLM:
        from fla_ds.backends import new_projector, zero3_loading

        s = cfg.stage2
        keep = zero3_loading(ds_config)  # before from_pretrained
        projector = new_projector(cfg, lm_path, feature_dim, dtype)
        llm, tokenizer = load_decoder_only(lm_path, qlora=s.qlora, lora_r=s.lora_r, lora_alpha=s.lora_alpha, lora_dropout=s.lora_dropout,
                                           target_modules=s.lora_targets, dtype=dtype, gradient_checkpointing=cfg.train.gradient_checkpointing)
        model = VisualLLM(llm, tokenizer, projector, s.prompt, max_target_tokens=s.max_target_tokens)
        model.hf_deepspeed_config = keep  # lives as long as the model
        return model

    def trainable_state(self, model: VisualLLM) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items() if "projector." in k or "lora_" in k}

    def save(self, model: VisualLLM, state: dict[str, torch.Tensor], step_dir: Path) -> None:
        save_adapter(model, Path(step_dir) / self.folder, state_dict=state)
        model.tokenizer.save_pretrained(str(Path(step_dir) / "tokenizer"))

    def load(self, folder: Path, cfg, projector: nn.Module, dtype: torch.dtype, bundle: dict) -> VisualLLM:
        from fla_ds.artifacts import ArtifactError, hf_errors
        from fla_ds.backends import language_model_path

        s, folder = cfg.stage2, Path(folder)
        if bundle.get("merged"):
            llm = load_base(folder / "model", qlora=False, dtype=dtype, artifact=True).eval()
            with hf_errors(folder / "model", "the tokenizer"):
                tokenizer = load_generation_tokenizer(folder / "model")
        elif bundle:  # never stage2.model: a bundle reads only itself (base_model checked by read_bundle_info)
            if not bundle.get("base_model"):
                raise ArtifactError(f"{folder / 'bundle.json'}: names no base_model inside the bundle (run fla-ds export again)")
            llm, tokenizer = load_for_inference(bundle["base_model"], folder / self.folder, qlora=s.qlora, dtype=dtype, artifact=True)
        else:
            llm, tokenizer = load_for_inference(language_model_path(cfg), folder / self.folder, qlora=s.qlora, dtype=dtype)
        return VisualLLM(llm, tokenizer, projector, s.prompt, max_target_tokens=s.max_target_tokens)

    def check(self, step_dir: Path, cfg) -> None:
        from fla_ds.artifacts import check_adapter
        from fla_ds.backends import language_model_path

        check_adapter(Path(step_dir) / self.folder, language_model_path(cfg))

    def export(self, bundle_dir: Path, cfg, merge: bool) -> dict:
        """The base model copied into ``base/``; ``merge``: the merged model in ``model/`` instead, refused
        (ArtifactError) when its logits stray from the unmerged model's past the tolerance (``merge_check``)."""
        from fla_ds.artifacts import ArtifactError
        from fla_ds.backends import copy_pretrained, language_model_path, local_model_folder
        from fla_ds.model.merge import merge_adapter, merge_check
        from fla_ds.model.projector import Projector

        bundle_dir, source, s = Path(bundle_dir), local_model_folder(language_model_path(cfg)), cfg.stage2
        info = {"base_model_source": str(source)}  # provenance only: loading never reads it
        if not merge:
            copy_pretrained(source, bundle_dir / self.base)
            return {**info, "base_model": self.base}
        merge_adapter(source, bundle_dir / self.folder, bundle_dir / "model", qlora=s.qlora)
        projector = Projector.load(bundle_dir / "projector", dtype=torch.float32)  # the check runs in float32 on the CPU
        unmerged = VisualLLM(*load_for_inference(source, bundle_dir / self.folder, qlora=s.qlora, dtype=torch.float32), projector, s.prompt)
        check = merge_check(unmerged, self.load(bundle_dir, cfg, projector, torch.float32, {"merged": True}).eval())
        if check["max_abs_logit_diff"] > check["tolerance"]:
            raise ArtifactError(f"{bundle_dir / 'model'}: merged logits differ from the unmerged model's by up to {check['max_abs_logit_diff']:.3g} "
                                f"on the probe, past the tolerance {check['tolerance']:.3g}; no bundle written (export without --merge)")
        return {**info, "merged": True, "merge_check": check}


BACKEND = DecoderOnlyBackend()
