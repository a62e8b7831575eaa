"""Files: written atomically, digested, locked.

Atomic writes: a file appears under its final name complete, or not at all. A kill at any
moment leaves either the old file or the new one; temporary files carry the writer's pid and a
'.tmp' suffix so that a later run can recognise and remove leftovers.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True) + "\n")


def remove_stale_tmp(folder: str | os.PathLike) -> int:
    """Delete leftovers of killed writers in ``folder``; returns how many."""
    removed = 0
    for p in Path(folder).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def folder_lock(folder: str | os.PathLike):
    """An exclusive lock on ``folder`` (its ``.lock`` file) for the duration: serialises index
    updates of builds (several splits, several feature-cache runs) sharing one folder."""
    with open(Path(folder) / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
