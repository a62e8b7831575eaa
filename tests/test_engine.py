"""The pure parts of the training engine, fast and without DeepSpeed: schedules, batch
arithmetic and the DeepSpeed JSON's "auto" values, precision, checkpoint pruning and the
choice of the checkpoint to resume from, Slurm placement."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fla_ds.checkpoint import check_complete, choose_resume, prune, read_latest, saved_layout, step_dirs, write_complete
from fla_ds.config import Precision, load_config
from fla_ds.distributed import detect_placement, first_host_of, slurm_port
from fla_ds.engine import accumulation_steps, build_optimizer, fill_ds_config, resolve_dtype, warmup_cosine


def test_warmup_then_cosine_to_the_floor():
    f = warmup_cosine(total_steps=110, warmup=10, min_ratio=0.1)
    assert [f(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)


def test_accumulation_divides_the_global_batch_or_names_both_sizes():
    assert accumulation_steps(256, 16, 8) == 2
    with pytest.raises(ValueError, match="train.global_batch=8 is not a multiple of train.micro_batch x ranks = 8 x 16"):
        accumulation_steps(8, 8, 16)


def test_auto_values_and_precision_are_resolved_once():
    cfg = load_config(None, ["train.global_batch=16", "train.micro_batch=2", "train.grad_clip=0.5"])
    template = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}
    filled = fill_ds_config(template, cfg, world=4, hidden_size=8, dtype=torch.bfloat16)
    assert filled == {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 0.5,
                      "bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "reduce_bucket_size": 64}}
    with pytest.raises(ValueError, match='no value known for "mystery"'):
        fill_ds_config({"mystery": "auto"}, cfg, world=1, hidden_size=8)
    assert resolve_dtype(Precision.auto, cuda=False) == torch.float32 and resolve_dtype(Precision.auto, cuda=True) == torch.bfloat16
    assert resolve_dtype(Precision.bf16, cuda=False) == torch.bfloat16 and resolve_dtype(Precision.fp32, cuda=True) == torch.float32


def test_the_optimizer_follows_the_config():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert isinstance(build_optimizer([{"params": params}], load_config(None, ["train.optimizer=sgd"])), torch.optim.SGD)
    assert isinstance(build_optimizer([{"params": params}], load_config(None, ["train.optimizer=adamw"])), torch.optim.AdamW)


@pytest.mark.parametrize("name, kind", [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)])
def test_the_optimizer_is_fused_where_cuda_is_and_steps_alike(name, kind):
    """fused=True on CUDA (one kernel per update, no host sync); torch's default elsewhere. Both
    update alike (checked here with torch's fused CPU kernels)."""
    cfg = load_config(None, [f"train.optimizer={name}", "train.weight_decay=0.01"])
    steps = []
    for cuda in (True, False):
        params = [torch.nn.Parameter(torch.arange(4.0))]
        optimizer = build_optimizer([{"params": params}], cfg, cuda=cuda)
        assert isinstance(optimizer, kind) and bool(optimizer.defaults.get("fused")) is cuda
        for _ in range(3):
            params[0].grad = torch.tensor([0.5, -1.0, 2.0, 0.0])
            optimizer.step()
        steps.append(params[0].detach())
    assert torch.allclose(*steps, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ checkpoints, without an engine


def fake_step(run: Path, step: int, complete: bool = True, world: int = 2, zero: int = 2) -> Path:
    folder = run / f"step-{step}"
    (folder / "engine" / "state").mkdir(parents=True)
    (folder / "engine" / "state" / "mp_rank_00_model_states.pt").write_bytes(b"x" * step)
    (folder / "trainer.json").write_text(json.dumps({"step": step, "world_size": world, "zero_stage": zero}))
    if complete:
        write_complete(folder)
    return folder


def test_pruning_keeps_the_newest_the_best_and_latest_and_never_touches_incomplete(tmp_path):
    for step in (2, 4, 6, 8, 10):
        fake_step(tmp_path, step)
    fake_step(tmp_path, 12, complete=False)  # a save in progress or killed
    (tmp_path / "best").write_text(json.dumps({"step": "step-2"}))
    (tmp_path / "latest").write_text("step-4\n")
    prune(tmp_path, keep_last=2)
    assert [p.name for p in step_dirs(tmp_path)] == ["step-12", "step-10", "step-8", "step-4", "step-2"]
    assert read_latest(tmp_path) == "step-4"


def test_resume_picks_the_newest_intact_checkpoint(tmp_path):
    for step in (2, 4, 6):
        fake_step(tmp_path, step)
    fake_step(tmp_path, 8, complete=False)
    (tmp_path / "step-6" / "trainer.json").write_text("{}")  # damaged after saving
    assert check_complete(tmp_path / "step-6", hashes=True) is not None
    assert choose_resume(tmp_path, hashes=True) == tmp_path / "step-4"
    assert choose_resume(tmp_path / "empty", hashes=True) is None


def test_the_layout_a_checkpoint_was_written_with(tmp_path):
    assert saved_layout(fake_step(tmp_path, 2, world=4, zero=3)) == (4, 3)
    old = fake_step(tmp_path, 3)
    (old / "trainer.json").write_text(json.dumps({"step": 3}))  # written before the layout was recorded
    for rank in range(3):
        (old / "engine" / "state" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(b"")
    assert saved_layout(old) == (3, 2)


# ------------------------------------------------------------------ placement


@pytest.mark.parametrize("nodelist, first", [("n1", "n1"), ("n1,n2", "n1"), ("gpu[03-05,07]", "gpu03"), ("gpu[03-05,07],cpu01", "gpu03"),
                                             ("node-[1-2]", "node-1"), ("x[001-002]", "x001")])
def test_the_master_is_the_first_host_of_the_node_list(nodelist, first):
    assert first_host_of(nodelist) == first


def test_placement_from_each_launchers_environment(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert detect_placement(configure=False).world_size == 1
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    placement = detect_placement(configure=False)
    assert (placement.rank, placement.local_rank, placement.world_size, placement.launcher) == (3, 1, 4, "torchrun")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    placement = detect_placement(configure=False)
    assert (placement.rank, placement.world_size, placement.launcher) == (5, 8, "srun")
    assert 20000 <= slurm_port("123456") < 40000 and slurm_port("1") != slurm_port("2")


PORT_RACE = """
import os, socket, sys
import fla_ds.distributed as d
busy = socket.socket(); busy.bind(("127.0.0.1", 0)); busy.listen()   # another process holds the port we pick first
picks = iter([busy.getsockname()[1]])
pick = d._free_port
d._free_port = lambda: next(picks, None) or pick()
placement = d.init_distributed()
import torch.distributed as dist
print(placement.launcher, dist.is_initialized(), int(os.environ["MASTER_PORT"]) != busy.getsockname()[1])
"""


def test_a_single_process_picks_another_port_when_its_free_port_is_taken_before_it_binds():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID")}
    proc = subprocess.run([sys.executable, "-c", PORT_RACE], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].split() == ["single", "True", "True"], proc.stdout[-2000:]
