"""Checkpoints: self-contained step folders, written whole or not at all, resumable anywhere.

``RUN/step-N/`` holds everything to resume exactly or to use the weights elsewhere:
- ``engine/``: DeepSpeed's state (model, optimizer, scheduler), written by every rank;
- ``trainer.json``: epoch, step, the loader's position, metrics, the world size and ZeRO stage
  it was written with; ``rng-<rank>.json``: RNG states;
- the stage's exports (e.g. ``encoder.safetensors`` for stage 2), the resolved config, the
  vocabulary; written by rank 0 after every rank has finished writing;
- ``COMPLETE``: lists every file with its size and sha256.

Writing (``save_checkpoint``): every rank writes into ``RUN/.step-N.partial/``; rank 0 adds
``trainer.json`` and ``COMPLETE``, renames the folder to ``step-N`` (atomic), and only then
replaces ``RUN/latest``. A kill at any moment leaves the previous checkpoints as they were and
at most a ``.partial`` folder, removed by the next save. A complete checkpoint is never
deleted or rewritten in place: a second save of a step that is already complete is skipped,
and ``prune`` keeps the newest ``keep_last``, the best and whatever ``latest`` names. Before
writing, every rank checks that its filesystem has room for a checkpoint the size of the last
one; a failed write is a ``SaveError`` naming the folder and the cause (no space left on
device, quota, I/O error).

Resuming (``choose_resume``, ``load_checkpoint``): rank 0 picks the newest intact checkpoint
(sizes, and sha256 unless ``train.verify_checkpoints=false``) and broadcasts it; a damaged one
falls back to the previous with a warning. A checkpoint written by another world size or ZeRO
stage is converted by DeepSpeed's universal checkpoint tool (``ds_to_universal``) into a
temporary folder first, and loaded with ``"load_universal": true``: any checkpoint resumes on
any number of ranks, with its optimizer state.

Nothing is unpickled: every ``torch.load`` in a training process is forced to
``weights_only=True`` (``enforce_weights_only``; the conversion runs in a child process under
the same rule), with only DeepSpeed's three plain record types allowed; everything else is
JSON or safetensors.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from fla_ds.atomic import atomic_write_json, atomic_write_text
from fla_ds.distributed import barrier, rank

log = logging.getLogger("fla_ds")
STEP_RE = re.compile(r"^step-(\d+)$")
ENGINE_TAG = "state"


# ------------------------------------------------------------------ safe loading of DeepSpeed files

WEIGHTS_ONLY_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def enforce_weights_only() -> None:
    """Every ``torch.load`` of this process reads tensors and plain data only (PyTorch's
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which overrides even an explicit ``weights_only=False`` in
    library code), allowing the three plain record types DeepSpeed's own files contain."""
    os.environ[WEIGHTS_ONLY_ENV] = "1"
    torch.serialization.add_safe_globals(_deepspeed_safe_globals())


# ------------------------------------------------------------------ RNG state


def rng_state() -> dict:
    state = {
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def _jsonable(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (tuple, list)):
        return [_jsonable(o) for o in obj]
    return obj


def _tuples(obj):
    return tuple(_tuples(o) for o in obj) if isinstance(obj, list) else obj


# ------------------------------------------------------------------ the COMPLETE manifest


def write_complete(step_dir: Path) -> None:
    """The COMPLETE manifest (fla_ds.artifacts.write_manifest: every file, its size and sha256)."""
    from fla_ds.artifacts import write_manifest

    write_manifest(step_dir)


def check_complete(step_dir: Path, hashes: bool) -> str | None:
    """None when the folder is intact, else what is wrong (one line). ``hashes``: check every
    file's sha256 too (DeepSpeed's state included), not only the sizes."""
    from fla_ds.artifacts import ArtifactError, verify_folder

    try:
        verify_folder(step_dir, hash_training_state=hashes, hashes=hashes)
    except ArtifactError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------ saving


def step_dirs(run_dir: Path) -> list[Path]:
    """Step folders, newest first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("step-*") if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


class SaveError(RuntimeError):
    """A checkpoint could not be written; the message is one line naming the folder and the
    cause. The previous checkpoints are untouched."""


def partial_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f".step-{step}.partial"


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_failure(exc: BaseException, folder: Path) -> str:
    """What went wrong with a write, in words: the OS error where one is in the chain (PyTorch's
    serializer reports a full disk as 'basic_ios::clear: iostream error'), else the free space
    when it ran out, else the exception's first line."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno:
            return os.strerror(seen.errno).lower()
        seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(folder if folder.exists() else folder.parent).free
    except OSError:
        free = None
    if free is not None and free < LOW_SPACE_BYTES:
        return f"no space left on device ({free / 2**20:.1f} MiB free)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"write failed ({type(exc).__name__}: {first[:200]})"


LOW_SPACE_BYTES = 64 << 20
"""Below this much free space a failed write is reported as a full disk."""


def check_room(run_dir: Path, step: int) -> None:
    """Every rank: is there room for a checkpoint as large as the newest complete one (plus a
    margin)? All ranks agree (a collective), so that all refuse together rather than one
    failing mid-write while the others wait. Raises SaveError."""
    newest = next((p for p in step_dirs(run_dir) if (p / "COMPLETE").is_file()), None)
    need = int(folder_bytes(newest) * 1.1) + LOW_SPACE_BYTES if newest is not None else 0
    from fla_ds.distributed import device

    free = shutil.disk_usage(run_dir).free
    flag = torch.tensor([1.0 if free >= need else 0.0], device=device())
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    if flag.item() < 1.0:
        where = f"{free / 2**20:.0f} MiB free here" if free < need else "another rank's filesystem is short"
        raise SaveError(f"cannot save step-{step} in {run_dir}: no space left on device ({where}, a checkpoint needs about "
                        f"{need / 2**20:.0f} MiB); the previous checkpoint stays latest")


def save_checkpoint(engine, run_dir: Path, step: int, trainer_state: dict, export: Callable[[Path], None]) -> Path:
    """Write ``RUN/step-<step>`` (module docstring); every rank calls this. ``export(folder)``
    runs on every rank (it may gather ZeRO-3 parameters, a collective) and writes the stage's
    files from rank 0. Returns the step folder; raises SaveError."""
    final = run_dir / f"step-{step}"
    done = [(final / "COMPLETE").is_file()] if rank() == 0 else [None]
    if dist.is_initialized():
        dist.broadcast_object_list(done, src=0)
    if done[0]:
        log.info("step-%d is already saved complete: not written again", step)
        return final
    tmp = partial_dir(run_dir, step)
    if rank() == 0:
        for leftover in (tmp, final):  # a killed earlier attempt; never a complete folder
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    check_room(run_dir, step)
    try:
        # Frozen weights (a 4-bit base model) come from their own files, not from every checkpoint.
        engine.save_checkpoint(str(tmp / "engine"), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
        atomic_write_json(tmp / f"rng-{rank():05d}.json", rng_state())
        export(tmp)
    except Exception as exc:
        raise SaveError(f"saving step-{step} in {run_dir} failed on rank {rank()}: {write_failure(exc, tmp)}; "
                        f"the previous checkpoint stays latest") from None
    barrier()  # every rank's files are on disk
    if rank() == 0:
        try:
            atomic_write_json(tmp / "trainer.json", trainer_state)
            write_complete(tmp)
            os.replace(tmp, final)
            fsync_dir(run_dir)
            atomic_write_text(run_dir / "latest", final.name + "\n")
        except Exception as exc:
            raise SaveError(f"saving step-{step} in {run_dir} failed: {write_failure(exc, tmp)}; the previous checkpoint stays latest") from None
    barrier()
    return final


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a crash after it must not undo it)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_partials(run_dir: Path) -> None:
    """Rank 0 at start: folders of saves that were killed (never complete ones)."""
    if rank() == 0:
        for p in run_dir.glob(".step-*.partial"):
            shutil.rmtree(p, ignore_errors=True)
        for p in run_dir.glob(".universal-*"):
            shutil.rmtree(p, ignore_errors=True)


def mark_best(run_dir: Path, step_dir: Path, metric: str, value: float) -> None:
    if rank() == 0:
        atomic_write_json(run_dir / "best", {"step": step_dir.name, "metric": metric, "value": value})


def read_best(run_dir: Path) -> dict | None:
    path = run_dir / "best"
    return json.loads(path.read_text("utf-8")) if path.is_file() else None


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints, the best and the one ``latest``
    names; rank 0 only. Incomplete folders are not touched here (see remove_partials)."""
    if rank() != 0:
        return
    keep = {(read_best(run_dir) or {}).get("step"), read_latest(run_dir)}
    complete = [p for p in step_dirs(run_dir) if (p / "COMPLETE").is_file()]
    for p in complete[max(keep_last, 1):]:
        if p.name not in keep:
            shutil.rmtree(p, ignore_errors=True)


def read_latest(run_dir: Path) -> str | None:
    path = run_dir / "latest"
    return path.read_text("utf-8").strip() if path.is_file() else None


# ------------------------------------------------------------------ resuming


def choose_resume(run_dir: Path, hashes: bool) -> Path | None:
    """Rank 0 picks the newest intact checkpoint and tells the others: a stressed shared
    filesystem can show ranks different listings."""
    choice = [None]
    if rank() == 0:
        for candidate in step_dirs(run_dir):
            problem = check_complete(candidate, hashes)
            if problem is None:
                choice[0] = str(candidate)
                break
            log.warning("checkpoint %s is not usable (%s); trying the previous one", candidate, problem)
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def saved_layout(step_dir: Path) -> tuple[int, int]:
    """(world size, ZeRO stage) a checkpoint was written with: from trainer.json, or for older
    checkpoints from DeepSpeed's file names (one optimizer file per data-parallel rank)."""
    state = json.loads((step_dir / "trainer.json").read_text("utf-8"))
    if "world_size" in state and "zero_stage" in state:
        return int(state["world_size"]), int(state["zero_stage"])
    files = list((step_dir / "engine" / ENGINE_TAG).glob("*optim_states.pt"))
    zero3 = any("model_states" in p.name and p.name.startswith("zero_pp_rank") for p in (step_dir / "engine" / ENGINE_TAG).iterdir())
    return max(1, len(files)), 3 if zero3 else 2


CONVERT = """
import sys, argparse
from fla_ds.checkpoint import enforce_weights_only
enforce_weights_only()
from deepspeed.checkpoint import ds_to_universal
ds_to_universal.main(argparse.Namespace(input_folder=sys.argv[1], output_folder=sys.argv[2], num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
"""


def universal_copy(step_dir: Path, run_dir: Path, timeout_s: int = 3600) -> Path:
    """Rank 0: ``step_dir``'s DeepSpeed state in DeepSpeed's universal format (independent of
    world size and ZeRO partitioning), converted by ``deepspeed.checkpoint.ds_to_universal`` in a
    child process into ``RUN/.universal-step-N/engine``. The checkpoint itself is only read.
    Raises ResumeError (one line) when the conversion fails."""
    out = run_dir / f".universal-{step_dir.name}"
    shutil.rmtree(out, ignore_errors=True)
    target = out / "engine"
    target.mkdir(parents=True)
    cmd = [sys.executable, "-c", CONVERT, str(step_dir / "engine" / ENGINE_TAG), str(target / ENGINE_TAG)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ResumeError(f"converting {step_dir} to DeepSpeed's universal checkpoint failed: {last}")
    return out


class ResumeError(RuntimeError):
    """A checkpoint cannot be resumed from; one line."""


def load_checkpoint(engine, step_dir: Path, universal: Path | None = None) -> dict:
    """Restore the engine (from ``universal``, a converted copy, when given) and this rank's
    RNG; returns the trainer state."""
    source = (universal or step_dir) / "engine"
    load_path, _ = engine.load_checkpoint(str(source), tag=ENGINE_TAG, load_module_strict=False)
    if load_path is None:
        raise ResumeError(f"DeepSpeed could not load {source}")
    rng_file = step_dir / f"rng-{rank():05d}.json"
    if rng_file.is_file() and universal is None:  # absent or meaningless when the ranks changed
        set_rng_state(json.loads(rng_file.read_text("utf-8")))
    return json.loads((step_dir / "trainer.json").read_text("utf-8"))


def describe_choice(path: str | Path, step_dir: Path) -> str:
    """One line saying which checkpoint a run folder ``path`` resolved to (``resolve_step_dir``)
    and why: its best by the metric that chose it, with how many evaluations share that score
    (a tie moves "best" to the later checkpoint when it is saved), or its
    latest when none was evaluated. Empty when ``path`` named the step folder itself."""
    run, chosen = Path(path), Path(step_dir).name
    if Path(path).resolve() == Path(step_dir).resolve():
        return ""
    best = read_best(run) or {}
    if best.get("step") != chosen:
        return f"{path}: a run folder; using its latest checkpoint {chosen} (none was chosen as best by an evaluation)"
    metric, value = str(best.get("metric", "")), best.get("value")
    key = metric.split()[-1] if metric else ""
    ties = []
    for metrics_file in sorted(run.glob("eval/step-*/metrics.json")):
        try:
            if json.loads(metrics_file.read_text("utf-8")).get(key) == value:
                ties.append(metrics_file.parent.name)
        except (OSError, ValueError):
            continue
    shared = f"; {len(ties)} evaluations share this score, the latest saved one is kept" if len(ties) > 1 else ""
    shown = f"{value:.2f}" if isinstance(value, (int, float)) else str(value)
    return f"{path}: a run folder; using its best checkpoint {chosen} ({metric} {shown}{shared})"


def resolve_step_dir(path: str | Path) -> Path:
    """A complete step folder, or a run folder's best checkpoint (else its latest)."""
    p = Path(path)
    if (p / "COMPLETE").is_file():
        return p
    best = read_best(p)
    names = ([best["step"]] if best else []) + ([(p / "latest").read_text().strip()] if (p / "latest").is_file() else [])
    for name in names:
        if (p / name / "COMPLETE").is_file():
            return p / name
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or run folder")
    if (p / "config.yaml").is_file() or (p / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{path}: a run folder with no complete checkpoint yet (the first is written at the end of the first epoch)")
    raise FileNotFoundError(f"{path} is neither a complete step-N checkpoint nor a run folder with one")
