"""Checkpoints: self-contained step folders, atomic pointers, safe loading, auto-resume.

``RUN/step-N/`` holds everything to resume exactly or to use the weights elsewhere:
- ``engine/``: DeepSpeed's state (model, optimizer, scheduler), written by every rank;
- ``trainer.json``: epoch, step, the loader's position, metrics; ``rng-<rank>.json``: RNG states;
- the stage's exports (e.g. ``encoder.safetensors`` for stage 2), the resolved config, the
  vocabulary; written by rank 0 after every rank has finished writing;
- ``COMPLETE``: written last; lists every file with its size and sha256. A folder without it
  was interrupted and is never resumed from.
``RUN/latest`` and ``RUN/best`` are small text files replaced atomically afterwards.

Loading never unpickles arbitrary objects: DeepSpeed's files are read with
``torch.load(weights_only=True)`` (a checkpoint engine of ours), allowing only the three plain
DeepSpeed record types they contain; everything else is JSON or safetensors. A damaged newest
checkpoint (missing file, wrong size or hash, unreadable) makes resume fall back to the
previous complete one with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from fla_ds.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger("fla_ds")
STEP_RE = re.compile(r"^step-(\d+)$")
ENGINE_TAG = "state"


# ------------------------------------------------------------------ safe loading of DeepSpeed files


def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def install_safe_loading(engine) -> None:
    """Make the engine read its checkpoint files with weights_only=True."""
    safe = _deepspeed_safe_globals()

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load


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


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def write_complete(step_dir: Path) -> None:
    files = {str(p.relative_to(step_dir)): {"bytes": p.stat().st_size, "sha256": file_digest(p)}
             for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != "COMPLETE" and not p.name.endswith(".tmp")}
    atomic_write_json(step_dir / "COMPLETE", {"files": files})


def check_complete(step_dir: Path, hashes: bool) -> Optional[str]:
    """None when the folder is intact, else what is wrong (one line)."""
    marker = step_dir / "COMPLETE"
    if not marker.is_file():
        return "no COMPLETE marker (interrupted while saving)"
    try:
        files = json.loads(marker.read_text("utf-8"))["files"]
    except (ValueError, KeyError):
        return "COMPLETE marker is unreadable"
    for name, facts in files.items():
        path = step_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != facts["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {facts['bytes']}"
        if hashes and file_digest(path) != facts["sha256"]:
            return f"{name} does not match its sha256"
    return None


# ------------------------------------------------------------------ saving


def step_dirs(run_dir: Path) -> list[Path]:
    """Step folders, newest first."""
    found = [(int(m.group(1)), p) for p in run_dir.glob("step-*") if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(engine, run_dir: Path, step: int, trainer_state: dict, export: Callable[[Path], None]) -> Path:
    """Every rank calls this. ``export(step_dir)`` runs on every rank (it may gather ZeRO-3
    parameters, a collective) and writes its files from rank 0."""
    step_dir = run_dir / f"step-{step}"
    if rank() == 0 and step_dir.exists():  # a half-written folder of an earlier attempt
        shutil.rmtree(step_dir)
    barrier()
    # Frozen weights (a 4-bit base model) come from their own files, not from every checkpoint.
    engine.save_checkpoint(str(step_dir / "engine"), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    atomic_write_json(step_dir / f"rng-{rank():05d}.json", rng_state())
    export(step_dir)
    barrier()  # every rank's files are on disk
    if rank() == 0:
        atomic_write_json(step_dir / "trainer.json", trainer_state)
        write_complete(step_dir)
        atomic_write_text(run_dir / "latest", step_dir.name + "\n")
    barrier()
    return step_dir


def mark_best(run_dir: Path, step_dir: Path, metric: str, value: float) -> None:
    if rank() == 0:
        atomic_write_json(run_dir / "best", {"step": step_dir.name, "metric": metric, "value": value})


def read_best(run_dir: Path) -> Optional[dict]:
    path = run_dir / "best"
    return json.loads(path.read_text("utf-8")) if path.is_file() else None


def prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints and the best; rank 0 only."""
    if rank() != 0:
        return
    best = (read_best(run_dir) or {}).get("step")
    complete = [p for p in step_dirs(run_dir) if (p / "COMPLETE").is_file()]
    for p in complete[keep_last:]:
        if p.name != best:
            shutil.rmtree(p, ignore_errors=True)


# ------------------------------------------------------------------ resuming


def choose_resume(run_dir: Path, hashes: bool) -> Optional[Path]:
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


def load_checkpoint(engine, step_dir: Path) -> dict:
    """Restore the engine and this rank's RNG; returns the trainer state."""
    load_path, _ = engine.load_checkpoint(str(step_dir / "engine"), tag=ENGINE_TAG, load_module_strict=False)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {step_dir / 'engine'}")
    rng_file = step_dir / f"rng-{rank():05d}.json"
    if rng_file.is_file():  # absent when the number of ranks changed
        set_rng_state(json.loads(rng_file.read_text("utf-8")))
    return json.loads((step_dir / "trainer.json").read_text("utf-8"))


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
    raise FileNotFoundError(f"{path} is neither a complete step-N checkpoint nor a run folder with one")
