"""The one training loop, shared by stage 1 and stage 2.

It only wires components: a ``Stage`` (what is trained and how a batch becomes a loss or a
translation: fla_ds/stage1.py, fla_ds/stage2.py), the loader (fla_ds/stream.py), DeepSpeed,
checkpoints (fla_ds/checkpoint.py), evaluation (fla_ds/evaluate/run.py) and the run log
(fla_ds/loggers.py).

Loss normalisation: a stage returns the loss summed over its target tokens and their count.
The loop divides by the token count of all ranks (one all_reduce), scaled by the world size
because DeepSpeed averages gradients over ranks: every target token of the step weighs the
same, whatever its rank or sentence length.

Preemption: SIGTERM, SIGUSR1 or a first SIGINT sets a flag; ranks agree on it every
``train.stop_check_every`` optimizer steps, at an epoch's last step and before every evaluation
batch (one all_reduce of a host-memory flag: no device sync), save a checkpoint at that step
boundary and return 0. The time from the signal to the exit is at most ``stop_check_every``
optimizer steps (or one evaluation batch) plus one save; an evaluation cut short is recorded
(``eval_due``) and run first when the run resumes. Loader workers ignore these signals
(launchers and Slurm signal whole process groups): only the ranks act on them.

No host sync per micro-batch: batches reach the device one ahead through pinned memory
(fla_ds/feed.py ``Prefetcher``), the loss and token counts are summed on the device
(``RunningSums``) and read only on log steps. What still waits for the device per optimizer
step is DeepSpeed's own (its ZeRO optimizer checks the gradient norm); tests/test_hot_paths.py
counts them all.

Evaluation and checkpoints at epoch ends follow ``train.eval_every_epochs`` and
``train.save_every_epochs``; the last epoch always does both, and an evaluation that finds a new
best always saves (``after_epoch``).

Resuming on another world size or ZeRO stage: the checkpoint is converted to DeepSpeed's
universal format before the engine is built (fla_ds/checkpoint.py); the loader re-plans the
epoch's remaining samples over the new layout (fla_ds/stream.py).
"""
from __future__ import annotations

import itertools
import json
import logging
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from fla_ds import checkpoint
from fla_ds.batch import Batch
from fla_ds.config import save_resolved
from fla_ds.distributed import Placement, barrier, device
from fla_ds.engine import accumulation_steps, build_optimizer, fill_ds_config, load_ds_config, resolve_dtype, seed_everything, warmup_cosine
from fla_ds.feed import Prefetcher, RunningSums
from fla_ds.loggers import RunLog
from fla_ds.stream import STOP_SIGNALS, ShardStream, Source

log = logging.getLogger("fla_ds")


class Stage(Protocol):
    """What the loop needs from a stage (fla_ds/stage1.py, fla_ds/stage2.py)."""

    name: str
    hidden_size: int
    """Sizes ZeRO-3's buckets ("auto" values)."""

    def prepare(self) -> None:
        """Every rank, after the process group exists and before ``build``: the stage's I/O
        (e.g. stage 1 builds its vocabulary on rank 0 behind a barrier). Constructors do none."""

    def source(self) -> Source: ...

    def inputs(self, batch: Batch):
        """The model inputs of a loader batch on the device, copied without a host sync
        (``fla_ds.feed.to_device``); the loop calls it one batch ahead, on a side stream on a
        GPU, and hands the result to ``loss``."""

    def build(self, ds_config: dict, dtype: torch.dtype) -> torch.nn.Module:
        """The module DeepSpeed wraps (what is trained), its parameters in ``dtype``.
        ``ds_config`` is the resolved DeepSpeed config: Hugging Face models need it before
        loading under ZeRO-3."""

    def param_groups(self, model: torch.nn.Module) -> list[dict]: ...

    def loss(self, engine, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss summed over the batch's target tokens, their count), device tensors, on this
        rank; ``inputs`` from ``inputs``. Must not read device values (no host sync)."""

    def translate(self, engine, batch: Batch) -> list[str]: ...

    def export(self, engine, step_dir: Path) -> None:
        """Called on every rank at each save (it may gather ZeRO-3 parameters); writes the
        stage's own files (weights for the next stage, adapters, vocabulary) from rank 0."""


# ------------------------------------------------------------------ preemption


class StopFlag:
    """Set by SIGTERM, SIGUSR1 or a first SIGINT (a second SIGINT interrupts at once, as
    Ctrl-C twice does); read by every rank at the same points (``agreed``). ``received`` (on
    the class) is the last stop signal this process got, for the error path of train.py.

    The ranks agree over a gloo group of their own on a flag in host memory: on GPUs the
    default (NCCL) group would need the flag on the device and a device-to-host read, which
    waits for every queued kernel. Construct it on every rank (creating the group is a
    collective)."""

    received: str | None = None

    def __init__(self):
        self.raised: str | None = None
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        if signum == signal.SIGINT and self.raised == "SIGINT":
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        self.raised = StopFlag.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """A collective (host memory only): True on every rank when any rank got a stop signal."""
        flag = torch.tensor([1 if self.raised else 0], dtype=torch.int32)
        if self.group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())


# ------------------------------------------------------------------ the loop


@dataclass
class Progress:
    epoch: int = 0
    step: int = 0
    """Optimizer steps done."""
    best: float | None = None
    eval_due: bool = False
    """The evaluation after the last finished epoch was cut short by a stop signal."""


class Trainer:
    """The loop: the stage's model under DeepSpeed, the loader, checkpoints, evaluation, the
    run log. Launch: fla_ds/train.py."""

    def __init__(self, cfg, stage: Stage, placement: Placement):
        import deepspeed

        self.cfg, self.stage, self.placement = cfg, stage, placement
        self.run_dir = Path(cfg.train.out)
        self.rank, self.world = placement.rank, placement.world_size
        seed_everything(cfg.train.seed, self.rank, cfg.train.deterministic)
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not (self.run_dir / "config.yaml").is_file():  # the run's first launch; never rewritten
                save_resolved(cfg, self.run_dir)
        checkpoint.remove_partials(self.run_dir)
        stage.prepare()
        self.source = stage.source()
        self.dtype = resolve_dtype(cfg.train.precision)  # decided once, here
        self.stream = ShardStream(OmegaConf.merge(cfg.stream, {"shards": self.source.shards, "split": "train", "train": True}),
                                  self.rank, self.world, cfg.train.micro_batch, self.source.augment)
        self.gas = accumulation_steps(cfg.train.global_batch, cfg.train.micro_batch, self.world)
        ds_config = fill_ds_config(load_ds_config(cfg.train.ds_config), cfg, self.world, stage.hidden_size, self.dtype)
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.resume_from, self.universal = self.prepare_resume()
        if self.universal is not None:
            ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
        model = stage.build(ds_config, self.dtype)
        self.total_steps = self.planned_steps()
        optimizer = build_optimizer(stage.param_groups(model), cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(self.total_steps, cfg.train.warmup_steps, cfg.train.min_lr_ratio))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        if cfg.train.compile:
            self.engine.compile(backend=cfg.train.compile_backend)
        self.progress = Progress()
        self.stop = StopFlag()
        self.sums = RunningSums(device())
        self.feed: Prefetcher | None = None
        self.log = RunLog(self.run_dir, self.rank, cfg.train.loggers, total_steps=self.total_steps, project=cfg.train.project)

    def planned_steps(self) -> int:
        per_epoch = len(self.stream) // self.gas
        if per_epoch == 0:
            raise ValueError(f"an epoch has {len(self.stream)} batches per rank, fewer than the {self.gas} accumulation steps: lower train.global_batch")
        total = per_epoch * self.cfg.train.epochs
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total

    # -------------------------------------------------------------- resume and save

    def prepare_resume(self) -> tuple[Path | None, Path | None]:
        """The checkpoint to resume from (None: a fresh run) and, when it was written by another
        world size or ZeRO stage, its universal copy (rank 0 converts; the others wait)."""
        choice = self.cfg.train.resume
        if choice == "none":
            return None, None
        step_dir = Path(choice) if choice != "auto" else checkpoint.choose_resume(self.run_dir, self.cfg.train.verify_checkpoints)
        if step_dir is None:
            return None, None
        world, zero = checkpoint.saved_layout(step_dir)
        if (world, zero) == (self.world, self.zero_stage):
            return step_dir, None
        log.info("%s was written by %d ranks with ZeRO-%d, this run has %d with ZeRO-%d: converting it to DeepSpeed's "
                 "universal checkpoint", step_dir, world, zero, self.world, self.zero_stage)
        problem = [None]
        universal = self.run_dir / f".universal-{step_dir.name}"
        if self.rank == 0:
            try:
                checkpoint.universal_copy(step_dir, self.run_dir)
            except checkpoint.ResumeError as exc:
                problem[0] = str(exc)
        if dist.is_initialized():
            dist.broadcast_object_list(problem, src=0)
        if problem[0]:
            raise checkpoint.ResumeError(problem[0])
        return step_dir, universal

    def resume(self) -> None:
        if self.resume_from is None:
            return
        state = checkpoint.load_checkpoint(self.engine, self.resume_from, self.universal)
        self.stream.load_state_dict(state["loader"])
        self.progress = Progress(state["epoch"], state["step"], state.get("best"), bool(state.get("eval_due")))
        if self.universal is not None:
            barrier()  # every rank has read the converted copy
            if self.rank == 0:
                shutil.rmtree(self.universal, ignore_errors=True)
        log.info("resumed from %s at epoch %d, step %d", self.resume_from, self.progress.epoch, self.progress.step)

    def save(self, metrics: dict | None = None) -> Path:
        p = self.progress
        loader = self.stream.state_dict()
        if self.feed is not None:  # a batch fetched ahead is not trained on yet: the resume reads it again
            loader["steps_done"] -= self.feed.ahead
        state = {"epoch": p.epoch, "step": p.step, "best": p.best, "eval_due": p.eval_due, "loader": loader,
                 "metrics": {k: v for k, v in (metrics or {}).items() if k != "examples"}, "world_size": self.world, "zero_stage": self.zero_stage}
        step_dir = checkpoint.save_checkpoint(self.engine, self.run_dir, p.step, state, lambda d: self.stage.export(self.engine, d))
        self.log.event("checkpoint", step=p.step, path=str(step_dir))
        return step_dir

    # -------------------------------------------------------------- steps

    def train_micro_batch(self, inputs, samples: int) -> None:
        """Forward, backward and (at an accumulation boundary) the optimizer step of one
        micro-batch (``inputs``: the stage's, on the device; ``samples``: its real samples, a
        host count); its loss and tokens go into ``self.sums``. Reads no device value."""
        loss_sum, n_tokens = self.stage.loss(self.engine, inputs)
        tokens = n_tokens.detach().to(torch.float32).reshape(1).clone()
        if dist.is_initialized():
            dist.all_reduce(tokens)
        loss = loss_sum * self.world / tokens.clamp(min=1.0)
        self.engine.backward(loss)
        self.engine.step()
        self.sums.add(loss_sum, n_tokens, samples)

    def evaluate(self) -> dict:
        """Decode dev on every rank; raises EvaluationInterrupted when a stop is agreed."""
        from fla_ds.evaluate.run import evaluate_split

        out_dir = self.run_dir / "eval" / f"step-{self.progress.step}"
        e = self.cfg.eval
        self.log.event("evaluating", step=self.progress.step, split=e.split, beam=e.beam_size, limit=e.limit)  # on its own line: a long decode is not a hang
        self.engine.eval()
        try:
            return evaluate_split(lambda batch: self.stage.translate(self.engine, batch), self.cfg, self.rank, self.world, out_dir,
                                  source=self.source, should_stop=self.stop.agreed)
        finally:
            self.engine.train()

    def epoch_end_plan(self, trained_epoch: int, final: bool) -> tuple[bool, bool]:
        """(evaluate, save) at the end of ``trained_epoch`` (0-based): every
        ``eval_every_epochs``-th / ``save_every_epochs``-th epoch (0: none), a step that
        ``eval.every_steps`` / ``train.save_every`` names (run_epoch leaves an epoch's last step
        to this), and always at the ``final`` one (the last epoch, or the step budget spent)."""
        t, step = self.cfg.train, self.progress.step
        every = lambda n, count: n > 0 and count % n == 0
        evaluate = final or every(t.eval_every_epochs, trained_epoch + 1) or every(self.cfg.eval.every_steps, step)
        return evaluate, final or every(t.save_every_epochs, trained_epoch + 1) or every(t.save_every, step)

    def after_epoch(self, trained_epoch: int, final: bool = True, due: bool = False) -> str:
        """Evaluate on dev, save, keep the best by ``train.best_metric``, prune old checkpoints,
        as ``epoch_end_plan`` says; ``due``: the evaluation a stop cut short, run (and saved)
        whatever the plan. An evaluation that finds a new best saves even off the plan, so that
        RUN/best names the weights it scored. ``trained_epoch``: the epoch the weights finished
        (what the eval line reports). Returns 'preempted' when a stop signal cut the evaluation
        short (saved, with eval_due), else 'saved' or 'kept going'."""
        from fla_ds.evaluate.run import EvaluationInterrupted

        evaluate, save = self.epoch_end_plan(trained_epoch, final)
        metrics, score, metric = {}, None, self.cfg.train.best_metric
        if evaluate or due:
            try:
                metrics = self.evaluate()
            except EvaluationInterrupted:
                self.progress.eval_due = True
                self.save()
                self.log.event("preempted", step=self.progress.step, signal=self.stop.raised or "another rank", during="evaluation")
                return "preempted"
            self.progress.eval_due = False
            self.log_evaluation(metrics, trained_epoch)
            score = metrics.get(metric)
        # A tie moves "best" to the later, more trained weights when they are saved anyway
        # (several all-zero evaluations early in training must not leave "best" at the first).
        improved = score is not None and (self.progress.best is None or score > self.progress.best or (score == self.progress.best and save))
        if not (save or due or improved):
            return "kept going"
        step_dir = self.save(metrics)
        if improved:
            self.progress.best = score
            checkpoint.mark_best(self.run_dir, step_dir, f"{self.cfg.eval.split} {metric}", score)
        checkpoint.prune(self.run_dir, self.cfg.train.keep_last)
        return "saved"

    def log_evaluation(self, metrics: dict, epoch: int) -> None:
        """The scores on one line, then a few examples: translation beside reference."""
        scores = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.log.event("eval", step=self.progress.step, epoch=epoch, **scores)
        if metrics.get("examples"):
            self.log.event("examples", step=self.progress.step, examples=metrics["examples"])

    def summarize(self, outcome: str, seconds: float) -> None:
        """The closing summary: where training stopped, its pace, the best checkpoint and its
        scores, where the checkpoints are."""
        p, best = self.progress, checkpoint.read_best(self.run_dir) or {}
        scores = {}
        if best.get("step") and (self.run_dir / best["step"] / "trainer.json").is_file():
            saved = json.loads((self.run_dir / best["step"] / "trainer.json").read_text("utf-8")).get("metrics", {})
            scores = {k: v for k, v in saved.items() if k in ("bleu4", "rouge_l", "bleu_13a") and isinstance(v, (int, float))}
        self.log.event("summary", outcome=outcome, step=p.step, total_steps=self.total_steps, epoch=p.epoch, seconds=seconds,
                       samples_per_s=self.samples_seen / seconds if seconds > 0 else 0.0, run_dir=str(self.run_dir),
                       latest=checkpoint.read_latest(self.run_dir), best={**best, "scores": scores} if best else {})

    def done(self) -> bool:
        return self.progress.step >= self.total_steps

    def run_epoch(self) -> str:
        """Train until the epoch ends ('epoch'), the step budget is spent ('budget') or a stop
        signal was agreed on ('preempted', after saving). An epoch ends at an optimizer step
        boundary: batches beyond the last whole accumulation are left out, and never read (the
        prefetcher takes no batch the loop will not train on)."""
        cfg, p = self.cfg.train, self.progress
        usable = (self.stream.steps_done + len(self.stream)) // self.gas * self.gas
        wanted = min(usable - self.stream.steps_done, (self.total_steps - p.step) * self.gas)
        self.feed = Prefetcher(itertools.islice(self.stream, max(0, wanted)), self.stage.inputs, device())
        self.sums.reset()
        started = time.perf_counter()
        try:
            for batch, inputs in self.feed:
                samples = int(batch.valid.numpy().sum())  # the loader's host tensor: no device involved
                self.train_micro_batch(inputs, samples * self.world)
                self.samples_seen += samples * self.world
                trained = batch.step + 1  # this epoch's batches trained on by this rank
                if trained % self.gas:
                    continue
                p.step += 1
                last = trained >= usable or self.done()  # the epoch's end evaluates and saves as its plan says
                if p.step % cfg.log_every == 0 or p.step == 1:
                    self.log_progress(time.perf_counter() - started)
                    started = time.perf_counter()
                if (p.step % max(1, cfg.stop_check_every) == 0 or last) and self.stop.agreed():
                    return self.preempted()
                if cfg.save_every and p.step % cfg.save_every == 0 and not last:
                    self.save()
                if self.cfg.eval.every_steps and p.step % self.cfg.eval.every_steps == 0 and not last:
                    from fla_ds.evaluate.run import EvaluationInterrupted

                    try:
                        self.log_evaluation(self.evaluate(), p.epoch)
                    except EvaluationInterrupted:
                        return self.preempted()
                if trained >= usable:
                    break
                if self.done():
                    return "budget"
            return "epoch"
        finally:
            self.feed = None

    def log_progress(self, seconds: float) -> None:
        """The log line of a step: the device-side sums read (the loop's one host sync besides
        the stop flag), with learning rate, throughput and health."""
        loss, tokens = self.sums.read()
        self.log.step(self.progress.step, epoch=self.progress.epoch, loss=loss, lr=self.engine.get_lr()[-1],
                      samples_per_s=self.sums.samples / seconds, tokens_per_s=tokens * self.world / seconds, **self.health())
        self.sums.reset()

    def health(self) -> dict:
        """Gradient norm (DeepSpeed's, before clipping) and, on a GPU, peak memory since the last
        log line: read only on log steps (each is a host sync)."""
        values = {}
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            values["grad_norm"] = float(norm)
        if torch.cuda.is_available():
            values["gpu_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
        return values

    def preempted(self) -> str:
        self.save()
        self.log.event("preempted", step=self.progress.step, signal=self.stop.raised or "another rank")
        return "preempted"

    def fit(self) -> int:
        started = time.perf_counter()
        self.samples_seen = 0
        self.resume()
        p = self.progress
        self.engine.train()
        outcome = "finished"
        if p.eval_due and self.after_epoch(p.epoch - 1, due=True) == "preempted":  # the evaluation a stop cut short
            outcome = "preempted"
        while outcome != "preempted" and not self.done() and p.epoch < self.cfg.train.epochs:
            self.stream.set_epoch(p.epoch)
            result = self.run_epoch()
            if result == "preempted":
                outcome = "preempted"
                break
            trained = p.epoch
            if result == "epoch":
                p.epoch += 1
                self.stream.set_epoch(p.epoch)  # the checkpoint resumes at the next epoch's start
            if self.after_epoch(trained, final=self.done() or p.epoch >= self.cfg.train.epochs) == "preempted":
                outcome = "preempted"
        self.summarize(outcome, time.perf_counter() - started)
        self.log.close()
        return 0
