"""``fla-ds bench gpu bench.tiny=true``: the GPU bench's own code, with tiny shapes on the CPU,
run through the command line as a user runs it, so that it cannot rot before a GPU runs it.

Two runs, side by side (each one thread): a full one, whose JSON must hold every figure the
bench promises (the list below is written out here from what the command is meant to report,
not read from the module), numeric and positive, anything skipped named with its reason; and
one whose budget (``bench.budget_s``) ends it early, which must stop between measurements,
exit 0 and name everything it did not reach."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

STEP = ["step_s", "step_s_min", "step_s_max"]
STAGE1_TRAIN = ["clips_per_s", *STEP, "mfu", "peak_mem_gib"]
STAGE2_STEP = ["samples_per_s", "tokens_per_s", "target_tokens_per_s", *STEP, "peak_mem_gib", "seq_len"]
LOADER_PATH = ["clips_per_s_per_worker", "min", "max", "clips_per_cpu_s"]


def promised_figures() -> dict[str, list[str]]:
    """Measurement key -> its figures, for the default micro batches (stage 1: 1, 4, 8 and the
    largest; stage 2: 1, 4, 16) and both ZeRO stages, checkpointing on and off, cache and video."""
    figures = {
        "stage1.build": ["seconds"],
        "stage1.flops": ["flops_per_clip"],
        **{f"stage1.train.mb{mb}": STAGE1_TRAIN for mb in (1, 4, 8)},
        "stage1.train.largest": ["micro_batch", "clips_per_s", "mfu", "peak_mem_gib", "step_s"],
        "stage1.decode": ["clips_per_s"],
        "loader.shards": ["seconds"],
        "loader.decode": [f"{path}.{f}" for path in ("pil", "simplejpeg", "worker", "jpeg_bytes", "gpu") for f in LOADER_PATH],
        "loader.verdict": ["cores", "gpus", "worker_cores_per_gpu", "demand_clips_per_s_per_gpu", "cpu_decode.workers_needed_per_gpu",
                           "cpu_decode.capacity_clips_per_s_per_gpu", "gpu_decode.workers_needed_per_gpu"],
        "stage2.model": ["seconds"],
    }
    for zero in (2, 3):
        figures[f"stage2.zero{zero}.build"] = ["seconds"]
        if zero == 2:
            figures["stage2.zero2.activations"] = ["bytes_per_token", "bytes_per_token_layer"]
        for ckpt in ("on", "off"):
            for mb in (1, 4, 16):
                for source in ("cache", "video"):
                    figures[f"stage2.zero{zero}.ckpt_{ckpt}.mb{mb}.{source}"] = STAGE2_STEP
        figures[f"stage2.zero{zero}.decode"] = ["clips_per_s"]
    return figures


def start(out: Path, *overrides: str) -> subprocess.Popen:
    rendezvous = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # two benches run at once: each picks its own port
    env = {**{k: v for k, v in os.environ.items() if k not in rendezvous}, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "fla_ds", "bench", "gpu", "bench.tiny=true", f"bench.out={out}", "bench.warmup_steps=1", "bench.timed_steps=2",
           "bench.peak_tflops=1", *overrides]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=out.parent)


def finish(proc: subprocess.Popen, out: Path) -> tuple[dict, str]:
    text, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, text[-6000:]
    return json.loads(out.read_text("utf-8")), text


def skip_reason(doc: dict, figure: str) -> str:
    """Why ``figure`` is missing: the skip recorded for it or for a key it lies under ("")."""
    parts = figure.split(".")
    return next((doc["skipped"][k] for i in range(len(parts), 0, -1) if (k := ".".join(parts[:i])) in doc["skipped"]), "")


def accounted(doc: dict, key: str) -> bool:
    return any(k == key or k.startswith(key + ".") for k in [*doc["results"], *doc["skipped"]])


def test_tiny_bench_reports_every_promised_figure_and_its_budget_stops_it_cleanly(tmp_path):
    full_out, short_out = tmp_path / "full.json", tmp_path / "short.json"
    full, short = start(full_out), start(short_out, "bench.budget_s=15")
    doc, text = finish(full, full_out)
    cut, cut_text = finish(short, short_out)

    # The full run: every promised figure present, a finite positive number, or named as skipped
    # with a reason; on a machine without CUDA only the GPU-decode path may be missing.
    assert doc["finished"] and doc["tiny"] and doc["command"].startswith("fla-ds bench gpu bench.tiny=true")
    figures = promised_figures()
    assert set(figures) <= set(doc["promised"])
    missing, bad = [], []
    for key, names in figures.items():
        for name in names:
            figure = f"{key}.{name}"
            if figure in doc["results"]:
                value = doc["results"][figure]
                if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                    bad.append(f"{figure}={value!r}")
            elif not skip_reason(doc, figure):
                missing.append(figure)
    assert not missing and not bad, f"missing: {missing}; not positive numbers: {bad}"
    if not torch.cuda.is_available():
        assert set(doc["skipped"]) == {"loader.decode.gpu"}, doc["skipped"]
        assert "CUDA" in doc["skipped"]["loader.decode.gpu"]
    assert doc["results"]["stage1.train.largest.micro_batch"] >= 8
    assert "bound" in doc["notes"]["loader.verdict"]
    assert doc["results"]["stage2.zero2.ckpt_on.mb16.cache.seq_len"] == doc["results"]["stage2.zero3.ckpt_off.mb1.video.seq_len"]
    for line in ("stage1.train.mb1", "loader.verdict", "stage2.zero3.decode", "stage 1 training", "stage 2, tokens/s", "ZeRO-3 ckpt off video", "written to"):
        assert line in text  # each measurement as it ends, then the table
    assert not any(k.endswith(".traceback") for k in doc["notes"])

    # The short run: stopped by its own clock between measurements, exit 0, the JSON complete
    # (finished), some figures measured, and everything else named, for the budget.
    assert cut["finished"] and cut["budget_s"] == 15
    assert 0 < len(cut["results"]) < len(doc["results"])
    assert all(accounted(cut, key) for key in cut["promised"])
    assert any(v.startswith("budget:") for v in cut["skipped"].values()), cut["skipped"]
    assert "bench.budget_s=15" in skip_reason(cut, "stage2.zero3.decode"), cut["skipped"]  # itself, or a part above it
    assert "skipped" in cut_text
