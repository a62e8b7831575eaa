"""The training hot path on a CPU, run for real (tiny stage 1, one rank, DeepSpeed): no host sync
inside a training step (counted: tests/scripts/count_syncs.py), the logged loss as the per-step
reads logged it, evaluations and checkpoints at the planned epochs, the prefetcher, channels-last,
torch.compile, stage-1 decoding under ZeRO-3 (two ranks), LoRA dropout 0, and when stage-2
generation must be synchronised across ranks."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY_STAGE1, collect, free_port, losses, run, save_tiny_llama, synthetic_shards, train_tiny_tokenizer

from fla_ds.config import load_config
from fla_ds.feed import Prefetcher, RunningSums, batch_to_device
from fla_ds.model import VisualEncoder
from fla_ds.model.visual import real_frame_index
from fla_ds.stream import ShardStream

SCRIPTS = Path(__file__).parent / "scripts"
CPU = torch.device("cpu")

# 12 training clips, micro batch 2, global batch 4, one rank: 6 micro-batches and 3 optimizer
# steps (accumulation 2) per epoch, 12 steps in 4 epochs.
SCHEDULE = ["train.epochs=4", "train.log_every=4", "train.stop_check_every=5", "train.eval_every_epochs=2", "train.save_every_epochs=3",
            "train.keep_last=10", "light_t.dropout=0"]
LOG_STEPS = {1, 4, 8, 12}
STOP_CHECKS = {3, 5, 6, 9, 10, 12}  # every 5th step and each epoch's last


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hot-paths")
    return {"shards": synthetic_shards(root, train=12, dev=4), "tokenizer": train_tiny_tokenizer(root / "tokenizer")}


def counted(assets: dict, out: Path, *overrides: str, count: bool = True) -> dict:
    """Stage 1 through tests/scripts/count_syncs.py; its JSON, with ``run`` the run folder."""
    out.mkdir(parents=True, exist_ok=True)
    run([sys.executable, str(SCRIPTS / "count_syncs.py"), *([] if count else ["--no-count"]), str(out / "syncs.json"), "--stage", "1",
         f"stream.shards={assets['shards']}", f"train.tokenizer={assets['tokenizer']}", f"train.out={out / 'run'}", *TINY_STAGE1, *overrides])
    return {**json.loads((out / "syncs.json").read_text()), "run": out / "run"}


@pytest.fixture(scope="module")
def counted_run(assets, tmp_path_factory) -> dict:
    return counted(assets, tmp_path_factory.mktemp("counted"), *SCHEDULE)


def events(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r.get("event") == kind]


# ------------------------------------------------------------------ the training loop, counted


def test_a_training_step_reads_nothing_from_the_device_between_log_points(counted_run):
    """Forward, backward and the loop's bookkeeping read no device value; the log lines read the
    device-side sums and DeepSpeed's gradient norm (2 reads), the stop flag is agreed every 5th
    step and at each epoch's end (1 host-memory read). What remains is DeepSpeed's own, once
    per optimizer step: its ZeRO optimizer checks the gradient norm (twice in fp32 with
    clipping) and torch's AdamW reads its step count on a CPU (the fused CUDA one does not)."""
    records, gas = counted_run["records"], counted_run["gas"]
    assert counted_run["code"] == 0 and gas == 2
    kinds = Counter(r["kind"] for r in records)
    assert set(kinds) <= {"loader", "log", "stop", "deepspeed"}, [r for r in records if r["kind"] not in ("loader", "log", "stop", "deepspeed")]
    # A micro-batch that ends no optimizer step: nothing but the loader's own host-side work.
    assert [r for r in records if r["micro_batch"] % gas and r["kind"] != "loader"] == []
    assert Counter(r["step"] for r in records if r["kind"] == "log") == {step: 2 for step in LOG_STEPS}
    assert Counter(r["step"] for r in records if r["kind"] == "stop") == {step: 1 for step in STOP_CHECKS}
    per_step = Counter(r["micro_batch"] for r in records if r["kind"] == "deepspeed")
    assert set(per_step) == set(range(gas, 12 * gas + 1, gas)) and len(set(per_step.values())) == 1 and max(per_step.values()) <= 3


def test_the_logged_loss_is_what_reading_every_micro_batch_logged(counted_run):
    """Before the sums moved to the device the loop read float(loss_sum) / max(1, n_tokens) per
    micro-batch and logged their mean since the last log line or the epoch's start (3 steps per
    epoch): recomputed from the raw values."""
    gas, micro = counted_run["gas"], counted_run["micro_losses"]
    logged = losses(counted_run["run"])
    assert sorted(logged) == sorted(LOG_STEPS) and len(micro) == 12 * gas
    previous = 0
    for step in sorted(LOG_STEPS):
        start = max(previous, (step - 1) // 3 * 3)
        expected = float(np.mean([loss / max(1.0, float(n)) for loss, n in micro[start * gas: step * gas]]))
        assert logged[step] == pytest.approx(expected, rel=1e-12, abs=0), step
        previous = step


def test_evaluations_and_checkpoints_come_at_the_planned_epochs(counted_run):
    """eval_every_epochs=2, save_every_epochs=3, 4 epochs of 3 steps: evaluations after epochs 2
    and 4 (0-based 1, 3: the last always); checkpoints at step 6 (the first evaluation is a new
    best, which always saves), 9 (every 3rd epoch) and 12 (the last); none after epoch 1 (0-based
    0). RUN/best: the top score, the later of tied evaluations (both are saved)."""
    run_dir = counted_run["run"]
    evals = events(run_dir, "eval")
    assert [e["epoch"] for e in evals] == [1, 3] and [e["step"] for e in evals] == [6, 12]
    assert [e["step"] for e in events(run_dir, "checkpoint")] == [6, 9, 12]
    top = max(e["bleu4"] for e in evals)
    assert json.loads((run_dir / "best").read_text())["step"] == f"step-{[e['step'] for e in evals if e['bleu4'] == top][-1]}"


# ------------------------------------------------------------------ feeding the device


def test_the_prefetcher_yields_the_loaders_batches_one_ahead(assets):
    cfg = load_config(None, [f"stream.shards={assets['shards']}", "stream.num_workers=0", "train.micro_batch=2", "augment.crop_size=28",
                             "augment.keep_ratio=0.1", "augment.max_frames=6"])
    plain = collect(ShardStream.from_config(cfg))
    stream = ShardStream.from_config(cfg)
    feed = Prefetcher(stream, lambda batch: batch_to_device(batch, CPU), CPU)
    seen = []
    for batch, inputs in feed:
        assert feed.ahead == int(batch.step + 1 < len(plain)) and stream.steps_done == batch.step + 1 + feed.ahead
        assert inputs.valid is batch.valid  # the loader's host tensor, never copied
        seen.append(inputs)
    assert feed.ahead == 0 and len(seen) == len(plain) == 6
    for got, want in zip(seen, plain):
        assert got.id == want.id and torch.equal(got.video, want.video) and torch.equal(got.video_mask, want.video_mask)
        assert torch.equal(got.affine, want.affine) and torch.equal(got.valid, want.valid)


def test_running_sums_are_read_once_and_match_the_per_batch_reads():
    sums = RunningSums(CPU)
    values = [(torch.tensor(12.5), torch.tensor(5)), (torch.tensor(3.0), torch.tensor(0)), (torch.tensor(7.25), torch.tensor(3))]
    for loss, n in values:
        sums.add(loss, n, samples=2)
    assert sums.read() == pytest.approx((np.mean([float(a) / max(1.0, float(n)) for a, n in values]), 8.0)) and sums.samples == 6


def clip_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.tensor([[True] * 4, [True] * 2 + [False] * 2])
    return torch.randn(2, 4, 3, 32, 32, generator=g) * mask[:, :, None, None, None], mask


def test_the_encoder_gathers_real_frames_from_a_host_index_as_from_its_mask():
    torch.manual_seed(0)
    encoder = VisualEncoder(out_dim=8)
    video, mask = clip_batch()
    index = real_frame_index(mask)
    assert index.tolist() == [0, 1, 2, 3, 4, 5]
    with_mask, _ = encoder(video, mask)
    with_index, _ = encoder(video, mask, index)
    assert torch.equal(with_mask, with_index)


CHANNELS_LAST_RTOL = 3e-4
"""Largest difference allowed, relative to the tensor's largest value. fp32, ResNet-18 on 32x32
frames: measured 2e-6 in eval mode, 6e-5 in training mode (BatchNorm's batch statistics amplify
the convolutions' other summation order); a wrong layout would differ by O(1)."""


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    return (a - b).abs().max().item() <= rtol * a.abs().max().item()


def test_channels_last_gives_the_same_features_and_gradients():
    assert VisualEncoder.from_config(load_config(None, [])).channels_last is torch.cuda.is_available()  # default: on where CUDA is
    torch.manual_seed(0)
    plain = VisualEncoder(out_dim=8)
    fast = VisualEncoder(out_dim=8, channels_last=True)
    fast.load_state_dict(plain.state_dict())
    video, mask = clip_batch(1)
    for train in (False, True):
        outputs = []
        for encoder in (plain, fast):
            encoder.train(train).zero_grad()
            features, _ = encoder(video, mask)
            features.square().sum().backward()
            outputs.append((features, encoder.cnn.conv1.weight.grad.clone(), encoder.temporal.conv.weight.grad.clone()))
        for a, b in zip(*outputs):
            assert close(a, b, CHANNELS_LAST_RTOL), (train, (a - b).abs().max(), a.abs().max())
    assert close(plain.cnn.bn1.running_mean, fast.cnn.bn1.running_mean, CHANNELS_LAST_RTOL)


# ------------------------------------------------------------------ torch.compile


def test_train_compile_compiles_the_trained_module_and_keeps_its_losses(assets, counted_run, tmp_path):
    """The same run compiled (DeepSpeed's engine.compile): its first two steps' micro-batch losses
    equal the eager run's (their learning rates do not depend on the run's length; step 2's
    loss follows from step 1's compiled backward). aot_eager: dynamo captures the graphs and
    AOTAutograd derives the backward, without generating code. The default inductor backend
    took 277 s to compile a tiny model on this 2-core CPU with a cold cache: too slow here."""
    result = counted(assets, tmp_path, "train.epochs=1", "train.max_steps=2", "train.compile=true", "train.compile_backend=aot_eager",
                     "light_t.dropout=0", "eval.limit=2", "eval.beam_size=1", count=False)
    assert result["compiled_graphs"] >= 1
    flat = lambda pairs: [x for pair in pairs for x in pair]
    assert flat(result["micro_losses"]) == pytest.approx(flat(counted_run["micro_losses"][:4]), rel=1e-5)


# ------------------------------------------------------------------ decoding under ZeRO-3


def test_zero3_dev_decoding_runs_on_a_copy_so_ranks_may_stop_at_different_steps(assets, tmp_path):
    """Two ranks, ZeRO-3, one step: the decoding copy holds the engine's weights, and rank 1
    stopping after 2 steps while rank 0 decodes 12 does not hang (decoding on the hooked
    module inside a gather did: each step re-gathered, and rank 0 timed out waiting for rank 1)."""
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         str(SCRIPTS / "zero3_decode.py"), str(assets["shards"]), str(assets["tokenizer"]), str(tmp_path)], timeout=300)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["same_weights"] and not result["hooked"] and result["refreshed_at"] == result["step"] == 1
    assert len(result["hypotheses"]) == 1


# ------------------------------------------------------------------ stage 2


def test_lora_dropout_0_keeps_no_dropout_module_and_saves_activation_memory(tmp_path):
    """What the backward pass keeps for one QLoRA training step of a 2-layer LLaMA, by the
    dropout on the LoRA branch (measured on SmolLM2-135M too: 382 -> 276 MiB, -28%)."""
    from fla_ds.model.llm import load_decoder_only

    path = save_tiny_llama(tmp_path / "llama")
    saved, kinds = {}, {}
    for dropout in (0.05, 0.0):
        torch.manual_seed(0)
        model, _ = load_decoder_only(path, qlora=True, lora_dropout=dropout, dtype=torch.bfloat16, gradient_checkpointing=False)
        kinds[dropout] = {type(m).__name__ for name, m in model.named_modules() if name.endswith("lora_dropout.default")}
        storages: dict[int, int] = {}

        def keep(tensor, storages=storages):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        ids = torch.randint(3, 200, (4, 64))
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            out = model.train()(input_ids=ids, labels=ids)
        out.loss.backward()
        assert torch.isfinite(out.loss) and any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
        saved[dropout] = sum(storages.values())
    assert kinds == {0.05: {"Dropout"}, 0.0: {"Identity"}}
    assert saved[0.0] < 0.8 * saved[0.05], saved  # measured 0.73
