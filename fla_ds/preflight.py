"""Checks before a launch: everything that can be known wrong before a process group starts.

``fla_ds/train.py`` runs ``check_launch`` on every rank before ``init_distributed`` and before
anything is written; ``fla_ds/train.py --check`` runs only the checks (the Slurm scripts call it
before ``srun``, so a bad job fails in seconds instead of after its GPUs are allocated). A
problem is a ``LaunchError``: one line naming the setting or file and what to do, exit code 2.

Checked: the DeepSpeed JSON and its "auto" values, the batch arithmetic for this launch's
world size, the shard (or feature-cache) index of the training and evaluation splits, the
stage's inputs (tokenizer or vocabulary, ImageNet weights; the stage-1 encoder checkpoint and
the language model folder), a run folder whose checkpoints hold another model (refused: a
rerun never silently mixes two models nor rewrites the run's config), and free disk for the
next checkpoint.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import OmegaConf

from fla_ds.loggers import check_loggers

MODEL_KEYS = {
    1: ("visual.out_dim", "visual.temporal_kernel", "light_t.d_model", "light_t.heads", "light_t.encoder_layers",
        "light_t.decoder_layers", "light_t.ffn", "light_t.adapter_hidden", "light_t.max_target_tokens", "train.vocab", "train.tokenizer"),
    2: ("stage2.backend", "stage2.model", "stage2.qlora", "stage2.lora_r", "stage2.lora_alpha", "stage2.lora_targets",
        "stage2.projector_hidden"),
}
"""Settings that shape what a checkpoint holds: a run folder's checkpoints and a rerun must agree."""


class LaunchError(ValueError):
    """This launch cannot work; the message is one line naming what to change."""


def check_launch(cfg, stage: int, world: int) -> list[str]:
    """Every check of the module docstring for a launch of ``world`` ranks. Returns what was
    checked, a line each (printed by ``--check``); raises LaunchError at the first problem."""
    facts = [check_loggers(cfg.train.loggers), check_deepspeed(cfg, world)]
    facts += check_shards(cfg, stage)
    facts += check_stage1_inputs(cfg) if stage == 1 else check_stage2_inputs(cfg)
    facts.append(check_run_folder(cfg, stage))
    facts.append(check_free_space(Path(cfg.train.out)))
    return facts


def check_deepspeed(cfg, world: int) -> str:
    from fla_ds.engine import fill_ds_config, load_ds_config

    try:
        template = load_ds_config(cfg.train.ds_config)
    except (FileNotFoundError, ValueError) as exc:
        raise LaunchError(f"train.ds_config: {exc}") from None
    micro, total = cfg.train.micro_batch, cfg.train.global_batch
    if total % (micro * world):
        fits = max(1, round(total / (micro * world))) * micro * world
        raise LaunchError(f"train.global_batch={total} is not a multiple of train.micro_batch x ranks = {micro} x {world}: "
                          f"e.g. train.global_batch={fits}, or a smaller train.micro_batch")
    try:
        filled = fill_ds_config(template, cfg, world, hidden_size=1)  # dtype does not matter for the check
    except ValueError as exc:
        raise LaunchError(f"train.ds_config {cfg.train.ds_config}: {exc}") from None
    zero = filled.get("zero_optimization", {}).get("stage", 0)
    return (f"deepspeed: {cfg.train.ds_config} (ZeRO-{zero}), {world} ranks x micro batch {micro} x "
            f"{filled['gradient_accumulation_steps']} accumulation = global batch {total}")


def check_shards(cfg, stage: int) -> list[str]:
    from fla_ds.shards.index import IndexFormatError, load_index

    folder = cfg.stage2.features if stage == 2 and cfg.stage2.features else cfg.stream.shards
    facts = []
    for split in dict.fromkeys(("train", cfg.eval.split)):
        try:
            entry = load_index(folder, split)
        except IndexFormatError as exc:
            raise LaunchError(str(exc)) from None
        facts.append(f"shards: {folder} split {split}: {entry['samples']} samples in {len(entry['shards'])} shards")
    return facts


def check_stage1_inputs(cfg) -> list[str]:
    t = cfg.train
    if t.vocab:
        if not Path(t.vocab).is_file():
            raise LaunchError(f"train.vocab: {t.vocab} does not exist (a vocab.json from `fla-ds vocab`)")
        return [f"vocabulary: {t.vocab}"]
    if t.tokenizer and not (Path(t.tokenizer) / "tokenizer.json").is_file() and not (Path(t.tokenizer) / "tokenizer_config.json").is_file():
        raise LaunchError(f"train.tokenizer: {t.tokenizer} is not a Hugging Face tokenizer folder (no tokenizer.json)")
    if cfg.visual.pretrained and not Path(cfg.visual.pretrained).is_file():
        raise LaunchError(f"visual.pretrained: {cfg.visual.pretrained} does not exist")
    return [f"tokenizer: {t.tokenizer or 'the embedded SmolLM2 tokenizer'}"]


def check_stage2_inputs(cfg) -> list[str]:
    import torch

    from fla_ds.artifacts import ArtifactError, verify_folder
    from fla_ds.backends import get_backend
    from fla_ds.checkpoint import resolve_step_dir
    from fla_ds.model import load_frozen_encoder

    s = cfg.stage2
    if not s.encoder:
        raise LaunchError("stage2.encoder is required: the stage-1 checkpoint (a step folder, or a run folder: its best)")
    try:
        encoder = resolve_step_dir(s.encoder)
    except FileNotFoundError as exc:
        raise LaunchError(f"stage2.encoder: {exc}") from None
    try:
        verify_folder(encoder)  # the manifest, every file's size and sha256 (fla_ds.artifacts)
        load_frozen_encoder(encoder, torch.float32)  # safetensors, and the shapes its config builds
    except ArtifactError as exc:
        raise LaunchError(str(exc)) from None  # names the file
    facts = [f"encoder: {encoder}"]
    if s.model:
        model = Path(s.model)
        if not (model / "config.json").is_file():
            raise LaunchError(f"stage2.model: {s.model} is not a local model folder with a config.json "
                              f"(compute nodes are offline: download it once, then give its folder)")
        check_model_type(model / "config.json", get_backend(s.backend))
        facts.append(f"language model: {s.model}")
    else:
        facts.append("language model: the embedded SmolLM2-135M-Instruct")
    return facts


def check_model_type(config_file: Path, backend) -> None:
    """The model's ``model_type`` is one the backend loads (``Backend.model_types``; any when
    it names none)."""
    import json

    if not backend.model_types:
        return
    try:
        model_type = json.loads(config_file.read_text("utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as exc:
        raise LaunchError(f"stage2.model: {config_file} cannot be read as a model config ({exc})") from None
    if model_type not in backend.model_types:
        raise LaunchError(f"stage2.model: {config_file.parent} holds a {model_type!r} model; stage2.backend={backend.name} loads "
                          f"{', '.join(backend.model_types)} models")


def newest_complete(run_dir: Path) -> Path | None:
    from fla_ds.checkpoint import step_dirs

    return next((p for p in step_dirs(run_dir) if (p / "COMPLETE").is_file()), None) if run_dir.is_dir() else None


def checkpoint_stage(step_dir: Path) -> int:
    return 2 if (step_dir / "projector").is_dir() else 1


def check_run_folder(cfg, stage: int) -> str:
    """A run folder with checkpoints continues only the model they hold."""
    run_dir = Path(cfg.train.out)
    resume = cfg.train.resume
    if resume not in ("auto", "none"):
        from fla_ds.checkpoint import check_complete

        problem = check_complete(Path(resume), hashes=False) if Path(resume).is_dir() else "does not exist"
        if problem:
            raise LaunchError(f"train.resume: {resume} {problem}")
    newest = newest_complete(run_dir)
    if newest is None:
        return f"run folder: {run_dir} (new)"
    if resume == "none":
        raise LaunchError(f"train.out: {run_dir} already holds checkpoints ({newest.name}); train.resume=none would mix two runs "
                          f"in one folder: give this run another train.out")
    if checkpoint_stage(newest) != stage:
        raise LaunchError(f"train.out: {run_dir} holds stage-{checkpoint_stage(newest)} checkpoints; "
                          f"give this stage-{stage} run another train.out")
    theirs = OmegaConf.load(newest / "config.yaml")
    for key in MODEL_KEYS[stage]:
        mine, saved = OmegaConf.select(cfg, key), OmegaConf.select(theirs, key)
        if mine != saved:
            raise LaunchError(f"train.out: {run_dir} holds checkpoints of another model ({key} is {saved!r} there, {mine!r} "
                              f"here): give this run another train.out, or set {key}={saved}")
    return f"run folder: {run_dir} (resumes from {newest.name} unless train.resume says otherwise)"


def check_free_space(run_dir: Path) -> str:
    """Room for one more checkpoint the size of the newest one (fla_ds.checkpoint.check_room
    checks again before every save)."""
    from fla_ds.checkpoint import LOW_SPACE_BYTES, folder_bytes

    newest = newest_complete(run_dir)
    probe = run_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = int(folder_bytes(newest) * 1.1) + LOW_SPACE_BYTES if newest is not None else LOW_SPACE_BYTES
    if free < need:
        raise LaunchError(f"train.out: {run_dir} has {free / 2**20:.0f} MiB free, a checkpoint needs about {need / 2**20:.0f} MiB")
    return f"disk: {free / 2**30:.1f} GiB free for checkpoints"
