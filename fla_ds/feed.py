"""Batches onto the training device without stalling the host, and the loop's running sums kept
there between log lines (fla_ds/trainer.py wires both).

A GPU runs what the host queued for it; the host stalls, waiting for that queue to drain,
whenever it reads a device value (``.item()``, ``float()``, ``int()``, ``bool()``,
``.tolist()``, a data-dependent shape such as ``x[mask]``) or copies from pageable host memory
(a plain ``.to(device)`` synchronises the stream). So here:

- ``to_device``: a host tensor copied from pinned memory with ``non_blocking=True``.
- ``Prefetcher``: batch i+1 is taken from the loader and its copy issued, on a side stream,
  before batch i's compute is queued; the compute stream waits for that copy only (an event on
  the device), never the host.
- ``RunningSums``: the loss and the token count summed on the device, read (one sync) only when
  a log line is written.

On a CPU the copies are no-ops and there is no side stream, but the code path is the same, so
the CPU tests run it (tests/test_hot_paths.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any

import torch

HOST_FIELDS = ("valid",)
"""Batch fields the loop reads on the host (counting samples): never copied to the device."""


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without a host sync: a host tensor goes through pinned memory
    and a ``non_blocking`` copy on CUDA; elsewhere (or already there) a plain ``.to``."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return (tensor if tensor.is_pinned() else tensor.pin_memory()).to(device, non_blocking=True)


def batch_to_device(batch: Any, device: torch.device) -> Any:
    """A loader batch (a dataclass, fla_ds/batch.py) with every tensor field on ``device``
    (``to_device``), except ``HOST_FIELDS``; other fields (texts, ids, positions) as they are."""
    moved = {f.name: to_device(value, device) for f in dataclasses.fields(batch)
             if isinstance(value := getattr(batch, f.name), torch.Tensor) and f.name not in HOST_FIELDS}
    return dataclasses.replace(batch, **moved)


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors inside a batch-like value: a tensor, a dataclass, a mapping or a sequence."""
    if isinstance(value, torch.Tensor):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from tensors_in(getattr(value, f.name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


class Prefetcher:
    """Iterates ``batches`` one ahead, yielding ``(batch, inputs)`` with ``inputs =
    move(batch)`` (the stage's device inputs): batch i+1 is taken from the loader and moved
    before batch i is yielded, so its host work (pinning, target ids) and its copy overlap
    batch i's compute. On CUDA ``move`` runs on a side stream; the compute stream waits for it
    with an event, and the caching allocator is told (``record_stream``) where the tensors are
    used. ``ahead``: how many batches the loader has handed out that were not yielded yet (0 or
    1), for a checkpoint taken while iterating (``Trainer.save``)."""

    def __init__(self, batches: Iterable, move: Callable[[Any], Any], device: torch.device):
        self.batches, self.move, self.device = batches, move, device
        self.copy_stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        self.ahead = 0

    def fetch(self, iterator: Iterator) -> tuple[Any, Any] | None:
        for batch in iterator:
            with torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else nullcontext():
                return batch, self.move(batch)
        return None

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        iterator = iter(self.batches)
        upcoming = self.fetch(iterator)
        self.ahead = int(upcoming is not None)
        try:
            while upcoming is not None:
                batch, inputs = upcoming
                if self.copy_stream is not None:
                    compute = torch.cuda.current_stream(self.device)
                    compute.wait_stream(self.copy_stream)
                    for tensor in tensors_in(inputs):
                        tensor.record_stream(compute)
                upcoming = self.fetch(iterator)
                self.ahead = int(upcoming is not None)
                yield batch, inputs
        finally:
            self.ahead = 0


class RunningSums:
    """This rank's training loss and target tokens since the last log line, summed on the device
    (float64: exact token counts, no rounding of the loss sums). ``add`` never syncs; ``read``
    syncs once. What it reports is what the loop logged before the sums moved to the device: the
    mean over micro-batches of (loss summed over a micro-batch's tokens / its token count,
    at least 1), and the token count."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.micro_batches = 0
        self.samples = 0

    def add(self, loss_sum: torch.Tensor, n_tokens: torch.Tensor, samples: int) -> None:
        """``loss_sum``: float scalar, one micro-batch's loss summed over its ``n_tokens``
        (integer scalar) target tokens, both on the device; ``samples``: its real samples (a
        host count)."""
        tokens = n_tokens.detach().to(torch.float64)
        self.sums += torch.stack([loss_sum.detach().to(torch.float64) / tokens.clamp(min=1.0), tokens])
        self.micro_batches += 1
        self.samples += samples

    def read(self) -> tuple[float, float]:
        """(mean loss per token over the micro-batches added, tokens added): one host sync."""
        loss, tokens = self.sums.tolist()
        return loss / max(1, self.micro_batches), tokens
