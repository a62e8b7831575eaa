"""The stage-2 projector: frozen visual features -> the language model's embedding space.

FLa-LLM's adapter is an MLP with one hidden layer; LLaVA's ``mlp2x_gelu`` is the same shape
with the hidden width equal to the output width, which is the default here. The caller gives
it its own learning rate (the paper: 1e-3 against 1e-5 for mBART) and saves it as its own
file next to the language-model adapter, so that a later run can point at it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn

WEIGHTS_NAME = "projector.safetensors"
CONFIG_NAME = "projector.json"
MAX_WIDTH = 1 << 16
"""Widths a saved projector config may give (a hostile one could otherwise ask for any
amount of memory before its weights are even read)."""


class Projector(nn.Module):
    """Linear(in_dim, hidden) - GELU - Linear(hidden, out_dim), applied per time step.

    Accepts features in any float dtype: they are cast to the weights' dtype first, because
    a feature cache written in float32 meets a projector cast to bf16 for DeepSpeed."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        self.in_dim, self.out_dim, self.hidden = in_dim, out_dim, hidden or out_dim
        self.fc1 = nn.Linear(in_dim, self.hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(self.hidden, out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, in_dim) -> (B, T, out_dim)."""
        # The dtype of a ZeRO-3 partitioned weight is still its real dtype (only its shape is empty).
        return self.fc2(self.act(self.fc1(features.to(self.fc1.weight.dtype))))

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "hidden": self.hidden}

    def save(self, folder: str | os.PathLike, state_dict: dict | None = None) -> Path:
        """Write ``projector.safetensors`` + ``projector.json`` into ``folder``. Under ZeRO-3
        pass the gathered ``state_dict`` (this module's own parameters are partitioned)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(folder / WEIGHTS_NAME))
        (folder / CONFIG_NAME).write_text(json.dumps(self.config(), indent=1, sort_keys=True) + "\n", "utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None) -> Projector:
        """The projector saved in ``folder`` (a trained artifact: the caller verified the
        folder's manifest). Raises ArtifactError naming the file: ``projector.json`` not
        {in_dim, out_dim, hidden} as sizes, ``projector.safetensors`` not intact safetensors
        or not fitting the sizes."""
        from fla_ds.artifacts import ArtifactError, load_safetensors, load_state, read_json

        folder = Path(folder)
        config = read_json(folder / CONFIG_NAME)
        if (not isinstance(config, dict) or set(config) != {"in_dim", "out_dim", "hidden"}
                or not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= MAX_WIDTH for v in config.values())):
            raise ArtifactError(f"{folder / CONFIG_NAME}: not {{in_dim, out_dim, hidden}} as sizes from 1 to {MAX_WIDTH}")
        projector = cls(**config)
        weights = folder / WEIGHTS_NAME
        load_state(projector, load_safetensors(weights), weights)
        return projector.to(dtype) if dtype is not None else projector
