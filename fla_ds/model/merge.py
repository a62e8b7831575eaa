"""``fla-ds export --merge`` for the decoder-only backend: the LoRA adapter folded into the base
weights the trained model computed with (the dequantized NF4 ones under QLoRA), and the check
that the merged model's logits equal the unmerged model's (``merge_check``)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from fla_ds.model.llm import VisualLLM, load_base, load_generation_tokenizer


def dequantized_base(path: str | os.PathLike) -> nn.Module:
    """The base model in float32 with every weight that QLoRA quantises holding what the 4-bit
    model computes with: its NF4 codes, quantised from float32 as ``load_for_inference`` does on
    a CPU, dequantized (``bitsandbytes.functional.dequantize_4bit``). The weights 4-bit loading
    leaves alone (embeddings, norms, LM head) are the file's, as there."""
    import bitsandbytes as bnb

    quantized, model = load_base(path, qlora=True, dtype=torch.float32), load_base(path, qlora=False, dtype=torch.float32)
    for name, module in quantized.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight, target = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state), model.get_submodule(name).weight
            if weight.shape != target.shape:  # copy_ would broadcast
                raise RuntimeError(f"{path}: {name} dequantizes to {list(weight.shape)}, the model has {list(target.shape)}")
            target.data.copy_(weight)
    return model


def merge_adapter(base_path: str | os.PathLike, adapter: Path, out: Path, qlora: bool) -> None:
    """The adapter folded into float32 base weights, saved with the tokenizer into ``out``: no
    bitsandbytes and no peft needed to run it. ``qlora``: the adapter was trained on the 4-bit
    base, so it is folded into the dequantized NF4 weights (``dequantized_base``), not into the
    original ones, which the trained model never saw. The adapter is checked first (raises
    ArtifactError)."""
    from fla_ds.artifacts import load_adapter

    base = (lambda: dequantized_base(base_path)) if qlora else (lambda: load_base(base_path, qlora=False, dtype=torch.float32))
    load_adapter(base_path, adapter, base).merge_and_unload().save_pretrained(str(out), safe_serialization=True)
    load_generation_tokenizer(base_path).save_pretrained(str(out))


MERGE_RTOL = 1e-3
"""How far merged logits may stray from the unmerged model's, relative to the largest logit
(at least 1). Both compute in float32 from the same dequantized NF4 values, so what remains is
float32 rounding: W + s*B@A rounded once instead of x@W + s*(x@A)@B summed, about 1e-6 of the
logit scale (measured: 2e-6 of 2.8 on the tests' 2-layer LLaMA, 9e-5 of 32 on SmolLM2-135M, 30
layers). A merge into the original un-quantized weights misses every weight's NF4 rounding and
moves logits by 0.3-0.45 of their scale (0.87 of 2.8; 14 of 32). 1e-3 sits ~300x from both."""
PROBE = "2 seeded N(0,1) feature clips (8 and 5 steps) + the prompt; logits at every real position, float32 on the CPU"


def probe_clips(feature_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge check's fixed input (``PROBE``): features float32 (2, 8, ``feature_dim``),
    mask bool (2, 8), the second clip padded after 5 steps."""
    mask = torch.tensor([[True] * 8, [True] * 5 + [False] * 3])
    return torch.randn(2, 8, feature_dim, generator=torch.Generator().manual_seed(0)) * mask.unsqueeze(-1), mask


@torch.no_grad()
def probe_logits(model: VisualLLM, features: torch.Tensor, feat_mask: torch.Tensor) -> torch.Tensor:
    """float32 (N, vocab): the next-token logits at the N real positions of [BOS] visual prompt
    rows (``VisualLLM.build_batch``), the model in eval mode."""
    batch = model.build_batch(features, feat_mask, None)
    logits = model.llm(inputs_embeds=batch.embeds, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    return logits[batch.attention_mask.bool()].float()


def merge_check(unmerged: VisualLLM, merged: VisualLLM) -> dict:
    """``{max_abs_logit_diff, tolerance, probe}`` of two models with the same projector on the
    probe; tolerance ``MERGE_RTOL`` x the unmerged model's largest logit (at least 1)."""
    features, mask = probe_clips(unmerged.projector.config()["in_dim"])
    reference = probe_logits(unmerged, features, mask)
    diff = (probe_logits(merged, features, mask) - reference).abs().max().item()
    return {"max_abs_logit_diff": diff, "tolerance": MERGE_RTOL * max(1.0, reference.abs().max().item()), "probe": PROBE}
