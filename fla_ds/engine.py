"""The DeepSpeed engine's set-up, decided once per run from the config: precision, the
resolved DeepSpeed JSON (its "auto" values), the optimizer and the learning-rate schedule,
seeds. Pure functions: fla_ds/trainer.py wires them.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import torch

from fla_ds.config import Optimizer, Precision


def seed_everything(seed: int, rank: int, deterministic: bool) -> None:
    """Seeds with a rank offset, so ranks draw different dropout masks."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # Deterministic mode also fills every torch.empty with NaN (a debugging aid, not part of
        # determinism): DeepSpeed's ZeRO-1/2 allocates its gradient buckets with torch.empty on
        # every backward, and the fill made a tiny CPU step 6x slower (3.2 s, not 0.5 s).
        torch.utils.deterministic.fill_uninitialized_memory = False
        torch.backends.cudnn.benchmark = False


def resolve_dtype(precision: Precision, cuda: bool | None = None) -> torch.dtype:
    """The training dtype: bf16 on a GPU for ``auto``, fp32 on a CPU (where fp16 is refused);
    decided here once and passed to the stage and the DeepSpeed JSON."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    precision = Precision(precision.value if isinstance(precision, Precision) else precision)
    if precision is Precision.bf16 or (precision is Precision.auto and cuda):
        return torch.bfloat16
    return torch.float32


def accumulation_steps(global_batch: int, micro_batch: int, world: int) -> int:
    """Gradient accumulation steps: global batch / (micro batch x ranks); ValueError when it
    does not divide."""
    per_step = micro_batch * world
    if global_batch % per_step:
        raise ValueError(f"train.global_batch={global_batch} is not a multiple of train.micro_batch x ranks = {micro_batch} x {world}")
    return global_batch // per_step


def fill_ds_config(template: dict, cfg, world: int, hidden_size: int, dtype: torch.dtype = torch.float32) -> dict:
    """Resolve every "auto" of a DeepSpeed JSON from our config (only the HF Trainer does it
    otherwise), so that one JSON serves every run. Raises ValueError for an "auto" it has no
    value for, or a batch that does not split over ``world`` ranks."""
    micro = cfg.train.micro_batch
    values = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation_steps(cfg.train.global_batch, micro, world),
        "train_batch_size": cfg.train.global_batch,
        "gradient_clipping": cfg.train.grad_clip,
        "reduce_bucket_size": hidden_size * hidden_size,
        "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
        "stage3_param_persistence_threshold": 10 * hidden_size,
    }

    def resolve(node, key=None):
        if isinstance(node, dict):
            return {k: resolve(v, k) for k, v in node.items()}
        if node == "auto":
            if key == "enabled":  # bf16.enabled
                return dtype == torch.bfloat16
            if key not in values:
                raise ValueError(f"DeepSpeed config: no value known for \"{key}\": \"auto\"")
            return values[key]
        return node

    return resolve(template)


def load_ds_config(path: str) -> dict:
    """A DeepSpeed JSON by path, or relative to the repository (ds_configs/...). Raises
    FileNotFoundError, or ValueError naming the file when it is not JSON."""
    candidates = [Path(path), Path(__file__).resolve().parent.parent / path]
    for p in candidates:
        if p.is_file():
            try:
                return json.loads(p.read_text("utf-8"))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{p}: not valid JSON ({exc})") from None
    raise FileNotFoundError(f"DeepSpeed config {path} not found")


def build_optimizer(groups: list[dict], cfg, cuda: bool | None = None) -> torch.optim.Optimizer:
    """SGD with momentum (the paper's stage 1) or AdamW, over the stage's parameter groups.
    ``cuda`` (default: whether CUDA is available): torch's fused implementation (``fused=True``:
    one kernel for the whole update instead of several per tensor, no host sync), which DeepSpeed
    steps like any torch optimizer over its flat fp32 partitions; elsewhere torch's default
    implementation, as before."""
    t = cfg.train
    fused = {"fused": True} if (torch.cuda.is_available() if cuda is None else cuda) else {}
    if Optimizer(t.optimizer.value if isinstance(t.optimizer, Optimizer) else t.optimizer) is Optimizer.sgd:
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, **fused)
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, **fused)


def warmup_cosine(total_steps: int, warmup: int, min_ratio: float):
    """The LR factor per step: linear warm-up over ``warmup`` steps, then cosine decay to
    ``min_ratio`` at ``total_steps`` (the paper's cosine schedule)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
