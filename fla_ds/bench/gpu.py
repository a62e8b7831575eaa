"""``fla-ds bench gpu [key=value ...]``: what one GPU does with this project, in one call of
under 10 minutes, with nothing downloaded (random weights of the real shapes, synthetic clips of
the paper's size: fla_ds/bench/gpu_inputs.py).

    fla-ds bench gpu                          # writes bench-gpu.json (bench.out=FILE elsewhere)
    fla-ds bench gpu stage2.lora_dropout=0    # any key of the stage configs, benched as set
    fla-ds bench gpu bench.tiny=true          # the same code with tiny shapes on the CPU (CI)

Measured, each as timed steps after warm-up steps (``bench.warmup_steps``, ``bench.timed_steps``;
figures from the median step, with its min and max), never as sums of parts:

- stage 1 (fla_ds/bench/gpu_stage1.py): clips/s, model-FLOPs utilisation and peak memory per
  micro batch (``bench.stage1_micro_batches``, then doubling to the largest that fits), beam-5
  decoding clips/s;
- the loader (fla_ds/bench/gpu_loader.py): clips/s per worker for each decode path, and whether
  this node's cores (``os.sched_getaffinity``) per GPU can feed stage 1's measured rate;
- stage 2 (fla_ds/bench/gpu_stage2.py) with a LLaMA-2-7B-shaped model quantised to NF4 on load,
  LoRA as the stage-2 config says: tokens/s and peak memory per micro batch
  (``bench.stage2_micro_batches``), ZeRO-2 and ZeRO-3, gradient checkpointing on and off, the
  step reading the feature cache and the step running the frozen encoder on video; beam-5
  decoding clips/s.

Its own timer (``bench.budget_s``) stops it between measurements: what did not fit is listed in
``skipped`` with the reason, as is a micro batch that ran out of memory, and a measurement that
failed (then with its traceback in ``notes``, and exit code 1). The JSON (written atomically
after every measurement): ``results`` {figure key: number}, ``skipped`` {measurement or figure
key: reason}, ``notes`` {key: text}, ``promised`` (every measurement key of the plan), ``units``,
``machine``, ``command``.
"""
from __future__ import annotations

import gc
import logging
import os
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

log = logging.getLogger("fla_ds")

PEAK_TFLOPS = (
    # (name fragment, dense bf16 TFLOP/s without sparsity), first match wins: NVIDIA's data
    # sheets (H100 SXM5 989.4, H100 PCIe 756, H100 NVL 835; H200 SXM the same as H100 SXM and
    # H200 NVL 835; A100 312; L40S 362; L4 121; A10 125; B200 2250; GH200 989).
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("GH200", 989.4), ("H100", 989.4), ("H200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
)
UNITS = {
    "clips_per_s": "clips/s", "samples_per_s": "samples/s", "tokens_per_s": "tokens/s (every real input position)",
    "target_tokens_per_s": "target tokens/s (the loss's)", "step_s": "s (median step)", "step_s_min": "s", "step_s_max": "s",
    "mfu": "fraction of the device's peak dense bf16 FLOP/s", "peak_mem_gib": "GiB (CUDA max_memory_allocated; CPU: process peak RSS)",
    "clips_per_s_per_worker": "clips/s of one loader worker", "micro_batch": "samples", "seq_len": "tokens per sample",
    "flops_per_clip": "FLOP (forward + backward)", "seconds": "s",
}
EXIT_FAILED = 1
"""A measurement failed with an error (not the budget, not out of memory): see ``skipped`` and ``notes``."""


def peak_tflops(name: str, configured: float) -> float | None:
    """The device's peak dense bf16 TFLOP/s: ``bench.peak_tflops`` when set, else the table by
    device name; None when neither knows (MFU is then skipped, with that reason)."""
    if configured > 0:
        return configured
    return next((value for fragment, value in PEAK_TFLOPS if fragment in name), None)


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak_memory() -> None:
    """Start a new peak: CUDA's allocator statistics, or on a CPU the process's peak RSS
    (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak then covers the whole process
        pass


def peak_memory_gib() -> float:
    """GiB since ``reset_peak_memory``: CUDA ``max_memory_allocated``, or the CPU process's VmHWM."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_steps(step: Callable[[], object], warmup: int, steps: int) -> dict:
    """``warmup`` untimed calls, then ``steps`` timed ones (each ended by a device sync):
    {step_s: median, step_s_min, step_s_max} in seconds."""
    for _ in range(warmup):
        step()
    synchronize()
    times = []
    for _ in range(max(1, steps)):
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times)}


def out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Skip(Exception):
    """A measurement that cannot run (a prerequisite missing); its message is the reason."""


class Bench:
    """The run's record and its clock: measurements are taken through ``measure``, which
    skips one the budget cannot cover, records OOM and errors as skipped with their reason,
    and rewrites the JSON after each. ``promised``: every measurement key of the plan, in order."""

    def __init__(self, out: Path, budget_s: float, promised: list[str], header: dict):
        self.out, self.budget_s, self.promised, self.header = out, budget_s, promised, header
        self.started = time.monotonic()
        self.results: dict[str, float] = {}
        self.skipped: dict[str, str] = {}
        self.notes: dict[str, object] = {}
        self.took: dict[str, float] = {}
        self.failed = False

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def skip(self, key: str, reason: str) -> None:
        self.skipped.setdefault(key, reason)

    def measure(self, key: str, fn: Callable[[], dict], need_s: float = 0.0, kind: str = "") -> dict | None:
        """Run ``fn`` -> {figure: number, or a str: why that figure is skipped}; figures land in
        ``results`` as ``key.figure``. Returns them, or None when skipped or failed. ``need_s``:
        what it is expected to take (the last ``kind`` measurement's time once there is one)."""
        values = self.attempt(key, fn, need_s, kind)
        if values is not None:
            self.record(key, values)
        return values

    def record(self, key: str, values: dict) -> None:
        """Figures already measured (numbers, or a str: why that one is skipped) under ``key``."""
        for figure, value in values.items():
            if isinstance(value, str):
                self.skip(f"{key}.{figure}", value)
            else:
                self.results[f"{key}.{figure}"] = float(value)
        self.print_row(key, values)
        self.save()

    def prepare(self, key: str, fn: Callable[[], object], need_s: float = 0.0) -> object | None:
        """Build what later measurements need (a model, an engine, shards) under the same
        rules; its time is the figure ``key.seconds``. Returns what ``fn`` built, or None."""
        start = time.monotonic()
        built = self.attempt(key, fn, need_s, kind=key)
        if built is not None:
            self.record(key, {"seconds": time.monotonic() - start})
        return built

    def attempt(self, key: str, fn: Callable[[], object], need_s: float, kind: str) -> object | None:
        need = self.took.get(kind, need_s) if kind else need_s
        if self.left() <= need:
            self.skip(key, f"budget: {max(0.0, self.left()):.0f} s of bench.budget_s={self.budget_s:g} left, this needs about {need:.0f} s")
            return None
        start, result = time.monotonic(), None
        try:
            result = fn()
        except Skip as exc:
            self.skip(key, str(exc))
        except Exception as exc:  # one failed measurement is reported, and the others still run
            self.record_failure(key, exc)
        finally:
            if kind:
                self.took[kind] = time.monotonic() - start
        if result is None:
            free_memory()  # here, once the exception and the frames it holds are gone
        return result

    def record_failure(self, key: str, exc: Exception) -> None:
        if out_of_memory(exc):
            self.skip(key, f"out of memory: {' '.join(str(exc).split())[:200]}")
            return
        self.failed = True
        self.skip(key, f"error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        self.notes[f"{key}.traceback"] = "".join(traceback.format_exception(exc)[-12:])
        print(f"bench gpu: {key} failed:\n{self.notes[f'{key}.traceback']}", file=sys.stderr)

    def skip_all(self, keys: list[str], reason: str) -> None:
        for key in keys:
            self.skip(key, reason)

    def print_row(self, key: str, values: dict) -> None:
        shown = "  ".join(f"{k}={v:.4g}" if not isinstance(v, str) else f"{k}=skipped" for k, v in values.items())
        print(f"  {key:<34} {shown}", flush=True)

    def document(self, finished: bool) -> dict:
        return {**self.header, "finished": finished, "elapsed_s": time.monotonic() - self.started, "budget_s": self.budget_s,
                "results": self.results, "skipped": self.skipped, "notes": self.notes, "promised": self.promised, "units": UNITS}

    def save(self, finished: bool = False) -> None:
        from fla_ds.atomic import atomic_write_json

        atomic_write_json(self.out, self.document(finished))


# ------------------------------------------------------------------ the run


def machine() -> dict:
    import platform

    info = {"device": device_name(), "gpus": torch.cuda.device_count(), "cores": len(os.sched_getaffinity(0)), "torch": torch.__version__,
            "cuda": torch.version.cuda or "", "python": platform.python_version(), "host": platform.node()}
    if torch.cuda.is_available():
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    return info


def plan(cfg) -> list[str]:
    """Every measurement key, in the order they run."""
    from fla_ds.bench.gpu_loader import loader_plan
    from fla_ds.bench.gpu_stage1 import stage1_plan
    from fla_ds.bench.gpu_stage2 import stage2_plan

    return stage1_plan(cfg) + loader_plan() + stage2_plan(cfg)


def run_gpu(cfg, overrides: list[str] | tuple[str, ...] = ()) -> int:
    """The whole bench (module docstring); returns the exit code: 0, ``EXIT_FAILED`` when a
    measurement failed with an error, 2 without a GPU unless ``bench.tiny``."""
    import tempfile

    b = cfg.bench
    tiny = bool(b.tiny)
    if not tiny and not torch.cuda.is_available():
        print("fla-ds: error: bench gpu needs a CUDA device (bench.tiny=true runs its tiny-shape version on the CPU)", file=sys.stderr)
        return 2
    out = Path(b.out or "bench-gpu.json")
    command = " ".join(["fla-ds bench gpu", *overrides])
    header = {"bench": "fla-ds bench gpu", "command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "tiny": tiny}
    from fla_ds.bench.gpu_inputs import bench_configs

    configs = bench_configs(cfg, list(overrides), tiny)  # a bad override is the user's error (exit 2), before anything runs
    bench = Bench(out, float(b.budget_s), plan(cfg), header)
    print(f"bench gpu: {header['machine']['device']}, {header['machine']['cores']} cores, budget {b.budget_s:g} s{', tiny shapes' if tiny else ''} -> {out}")
    quiet_libraries()
    scratch = Path(tempfile.mkdtemp(prefix="fla-ds-bench-gpu-"))
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # DeepSpeed's per-step deprecation notices
            if tiny:
                torch.set_num_threads(1)  # tiny tensors: threads cost more than they save, and CI shares its cores
            run_sections(bench, cfg, *configs, tiny, scratch)
    except Exception as exc:  # a fault outside any one measurement: recorded, and the JSON still written
        bench.record_failure("bench", exc)
    finally:
        torch.set_num_threads(threads)
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
        from fla_ds.distributed import shutdown

        shutdown()
    for key in bench.promised:  # a section that ended early leaves no key unaccounted for
        if not any(k == key or k.startswith(key + ".") for k in [*bench.results, *bench.skipped]):
            bench.skip(key, "not reached")
    bench.save(finished=True)
    print_summary(bench)
    return EXIT_FAILED if bench.failed else 0


def run_sections(bench: Bench, cfg, cfg1, cfg2, tiny: bool, scratch: Path) -> None:
    """Stage 1 (its rate feeds the loader's verdict), the loader, stage 2; ``cfg1``/``cfg2``:
    the stage configs benched (``gpu_inputs.bench_configs``)."""
    from fla_ds.bench.gpu_loader import run_loader
    from fla_ds.bench.gpu_stage1 import run_stage1
    from fla_ds.bench.gpu_stage2 import run_stage2
    from fla_ds.distributed import init_distributed

    if bench.left() <= 0:  # nothing could run: say so without starting anything
        for key in bench.promised:
            bench.skip(key, f"budget: bench.budget_s={bench.budget_s:g} left no time")
        return
    init_distributed()  # one process: DeepSpeed's engines need a process group (NCCL on a GPU, gloo on a CPU)
    stage1_rate = run_stage1(bench, cfg, cfg1, tiny, scratch)
    free_memory()
    run_loader(bench, cfg, cfg1, tiny, scratch, stage1_rate)
    run_stage2(bench, cfg, cfg1, cfg2, tiny, scratch)


def quiet_libraries() -> None:
    """DeepSpeed and transformers log every engine set-up at INFO: the table stays readable."""
    for name in ("DeepSpeed", "deepspeed", "transformers", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_warning()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def print_summary(bench: Bench) -> None:
    """The table of headline figures, then what was skipped and why, then the notes."""
    doc = bench.document(True)
    print_table(doc["results"])
    print(f"bench gpu: {len(doc['results'])} figures in {doc['elapsed_s']:.0f} s; written to {bench.out}")
    if bench.skipped:
        print(f"skipped ({len(bench.skipped)}):")
        for key, reason in bench.skipped.items():
            print(f"  {key:<34} {reason}")
    for key, note in bench.notes.items():
        if not key.endswith(".traceback"):
            print(f"  note {key}: {note}")


def print_table(r: dict[str, float]) -> None:
    """Stage 1 per micro batch, the loader per decode path, stage 2 as a grid (rows: ZeRO stage,
    checkpointing, input; columns: micro batch), decoding; "-" where a figure is missing."""
    def cell(key: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(r[key]) if key in r else "-"

    print("\nstage 1 training          micro batch    clips/s      MFU   peak GiB")
    for mb in sorted({int(k.split(".")[2][2:]) for k in r if k.startswith("stage1.train.mb") and k.endswith(".clips_per_s")}):
        key = f"stage1.train.mb{mb}"
        print(f"  {'':<24}{mb:>11} {cell(key + '.clips_per_s'):>10} {cell(key + '.mfu', '{:.3f}'):>8} {cell(key + '.peak_mem_gib', '{:.2f}'):>10}")
    print(f"stage 1 beam-5 decoding: {cell('stage1.decode.clips_per_s')} clips/s")
    paths = ("pil", "simplejpeg", "worker", "jpeg_bytes", "gpu")
    print("loader, clips/s per worker: " + ", ".join(f"{p} {cell(f'loader.decode.{p}.clips_per_s_per_worker')}" for p in paths))
    mbs = sorted({int(k.split(".")[3][2:]) for k in r if k.startswith("stage2.zero") and ".mb" in k and k.endswith(".tokens_per_s")})
    print("stage 2, tokens/s (peak GiB)" + "".join(f"{'mb' + str(mb):>20}" for mb in mbs))
    for zero in (2, 3):
        for ckpt in ("on", "off"):
            for source in ("cache", "video"):
                row = [f"stage2.zero{zero}.ckpt_{ckpt}.mb{mb}.{source}" for mb in mbs]
                cells = [f"{cell(k + '.tokens_per_s', '{:.0f}')} ({cell(k + '.peak_mem_gib', '{:.1f}')})" for k in row]
                print(f"  ZeRO-{zero} ckpt {ckpt:<3} {source:<6}   " + "".join(f"{c:>20}" for c in cells))
    print("stage 2 beam-5 decoding, clips/s: " + ", ".join(f"ZeRO-{z} {cell(f'stage2.zero{z}.decode.clips_per_s')}" for z in (2, 3)) + "\n")
