"""Where a run's metrics go: one sink class per name ``train.loggers`` may give (``LOGGERS``,
the registry: a new logger is one class here and one line there), and ``RunLog``, the fan-out
the trainer writes to.

Rank 0 writes; on every other rank ``RunLog`` is a no-op. The sinks:

- ``jsonl``: ``RUN/metrics.jsonl``, one JSON record a line, ``{"time", "step", ...values}``
  and ``{"time", "event", ...values}`` (the Slurm scripts and the tests parse it).
- ``console``: a progress bar on a terminal; plain ``step N key=value`` lines otherwise (under
  Slurm, where a bar fills the log with carriage returns); every event as ``kind: key=value``.
- ``tensorboard``: ``RUN/tensorboard``.
- ``wandb``: Weights & Biases, offline unless ``WANDB_MODE`` is set: each launch writes
  ``RUN/wandb/offline-run-<time>-<id>/``, all with the run's one id;
  ``wandb sync RUN/wandb/offline-run-*`` uploads them, in order, into one run.
- ``mlflow``: the tracking URI in ``MLFLOW_TRACKING_URI``, else the file store
  ``file:RUN/mlruns`` (``mlflow ui --backend-store-uri RUN/mlruns``, from the full ``mlflow``
  package, shows it). The file store needs no server and no SQLite lock on a shared
  filesystem; MLflow 3 keeps it in maintenance mode behind ``MLFLOW_ALLOW_FILE_STORE``, which
  is set for it (``mlflow migrate-filestore`` moves a run to a database later).

Trackers (tensorboard, wandb, mlflow) receive numbers: a step's values as ``train/<key>`` and
an evaluation's as ``dev/<key>``, at their step. The other events (checkpoint, preempted) are
in ``metrics.jsonl`` and on the console.

One tracker run per training run: the wandb and MLflow run ids are stored in
``RUN/trackers.json`` on the first launch and reused on every resume, so a preempted run stays
one run whose steps continue. (TensorBoard needs no id: it reads the event files of every
launch in RUN/tensorboard as one run.)

Never any network unless asked for: wandb is offline unless ``WANDB_MODE`` says otherwise,
and then its crash reports are off too (``WANDB_ERROR_REPORTING``); MLflow's usage telemetry
is off (``MLFLOW_DISABLE_TELEMETRY``); an environment variable the user set wins in each case.

The trackers are an optional extra (``pip install 'fla-ds[tracking]'``); a chosen one whose
package is missing is one line naming the extra, at launch (``check_loggers``, from
fla_ds/preflight.py) and again when ``RunLog`` opens, on every rank alike.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("fla_ds")

EXTRA = "pip install 'fla-ds[tracking]'"
TRACKERS_FILE = "trackers.json"
EVENT_GROUPS = {"eval": "dev"}
"""The prefix of an event's numbers in the trackers (other events: the event's name)."""


@dataclass
class Run:
    """What a sink is opened with."""

    folder: Path
    total_steps: int
    project: str
    stored: dict = field(default_factory=dict)
    """What this sink stored in RUN/trackers.json on an earlier launch ({} on the first)."""


def numbers(values: dict, prefix: str) -> dict[str, float]:
    """The numeric values, keyed ``prefix/key`` (``step`` is the x axis, not a value)."""
    return {f"{prefix}/{k}": float(v) for k, v in values.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def format_values(values: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


class Sink:
    """One destination, opened on rank 0 only."""

    package: str | None = None
    """The module this sink imports beyond fla_ds's own requirements."""
    stored: dict = {}
    """What to keep in RUN/trackers.json for the next launch of this run."""

    def __init__(self, run: Run):
        self.run = run

    def step(self, step: int, values: dict) -> None:
        pass

    def event(self, kind: str, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlSink(Sink):
    """RUN/metrics.jsonl, appended to (a resumed run continues the same file)."""

    def __init__(self, run: Run):
        super().__init__(run)
        self.path = run.folder / "metrics.jsonl"

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")

    def step(self, step: int, values: dict) -> None:
        self.write({"time": time.time(), "step": step, **values})

    def event(self, kind: str, values: dict) -> None:
        self.write({"time": time.time(), "event": kind, **values})


class ConsoleSink(Sink):
    """What a person watching sees: a progress bar when stderr is a terminal, plain lines
    otherwise (under Slurm: ``step 30/540 epoch=0 loss=... samples_per_s=... eta=4m12s``);
    events always on their own lines (through the bar's ``write`` when there is one); an
    evaluation's example translations beside their references; the closing summary."""

    def __init__(self, run: Run):
        super().__init__(run)
        self.bar = None
        self.started: tuple[float, int] | None = None  # (time, step) of the first step of this launch
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=run.total_steps, unit="step", dynamic_ncols=True)

    def eta(self, step: int) -> str:
        """Time left at this launch's pace (steps since its first logged step)."""
        now = time.monotonic()
        if self.started is None:
            self.started = (now, step)
            return "?"
        t0, s0 = self.started
        if step <= s0:
            return "?"
        return duration((now - t0) / (step - s0) * max(0, self.run.total_steps - step))

    def step(self, step: int, values: dict) -> None:
        eta = self.eta(step)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{values.get('loss', 0):.3f}", lr=f"{values.get('lr', 0):.2e}", sps=f"{values.get('samples_per_s', 0):.1f}")
        else:
            print(f"step {step}/{self.run.total_steps} {format_values(values)} eta={eta}", flush=True)

    def say(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)  # above the bar, never into it
        else:
            print(line, flush=True)

    def event(self, kind: str, values: dict) -> None:
        if kind == "examples":
            for example in values.get("examples", []):
                self.say(f"  {example['id']}\n    reference:  {example['reference']}\n    hypothesis: {example['hypothesis']}")
            return
        if kind == "summary":
            self.say(summary_text(values))
            return
        shown = {k: v for k, v in values.items() if not isinstance(v, (str, list, dict)) or (isinstance(v, str) and len(v) < 80)}
        self.say(f"{kind}: " + format_values(shown))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration(seconds: float) -> str:
    """'4m12s', '1h03m', '37s'."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def summary_text(values: dict) -> str:
    """The closing lines of a run (the trainer's ``summary`` event)."""
    best = values.get("best") or {}
    scores = ", ".join(f"{k} {v:.2f}" for k, v in (best.get("scores") or {}).items())
    lines = [f"summary: {values.get('outcome', 'done')} at step {values.get('step')} of {values.get('total_steps')} "
             f"(epoch {values.get('epoch')}) in {duration(values.get('seconds', 0))}, {values.get('samples_per_s', 0):.1f} samples/s"]
    if best:
        lines.append(f"  best: {best.get('step')} by {best.get('metric')} {best.get('value', float('nan')):.2f}" + (f" ({scores})" if scores else ""))
    lines.append(f"  checkpoints: {values.get('run_dir')} (latest {values.get('latest')})")
    return "\n".join(lines)


class TensorBoardSink(Sink):
    """RUN/tensorboard (one event file per launch; TensorBoard reads them as one run)."""

    package = "tensorboard"

    def __init__(self, run: Run):
        super().__init__(run)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run.folder / "tensorboard"))

    def add(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def step(self, step: int, values: dict) -> None:
        self.add(numbers(values, "train"), step)

    def event(self, kind: str, values: dict) -> None:
        self.add(numbers(values, EVENT_GROUPS.get(kind, kind)), values.get("step", 0))

    def close(self) -> None:
        self.writer.close()


class WandbSink(Sink):
    """Weights & Biases, offline unless WANDB_MODE is set; one run id for every launch."""

    package = "wandb"

    def __init__(self, run: Run):
        super().__init__(run)
        mode = os.environ.get("WANDB_MODE") or "offline"  # online only when the user says so
        if mode in ("offline", "dryrun", "disabled"):
            os.environ.setdefault("WANDB_ERROR_REPORTING", "false")  # crash reports; read when wandb starts its service
        import wandb

        project = run.stored.get("project") or run.project
        self.wandb = wandb.init(dir=str(run.folder), project=project, name=run.folder.resolve().name, id=run.stored.get("id"),
                                resume="allow", mode=mode)
        self.stored = {"id": self.wandb.id, "project": project}

    def log(self, scalars: dict[str, float], step) -> None:
        if scalars:
            self.wandb.log(scalars, step=step)

    def step(self, step: int, values: dict) -> None:
        self.log(numbers(values, "train"), step)

    def event(self, kind: str, values: dict) -> None:
        self.log(numbers(values, EVENT_GROUPS.get(kind, kind)), values.get("step"))

    def close(self) -> None:
        self.wandb.finish()


class MlflowSink(Sink):
    """MLflow: MLFLOW_TRACKING_URI, else the file store RUN/mlruns; experiment train.project.
    A resumed launch reopens the stored run; a preempted launch leaves it KILLED (stopped, to
    be continued), a finished one FINISHED."""

    package = "mlflow"

    def __init__(self, run: Run):
        super().__init__(run)
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # read when mlflow is imported
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run.folder / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.status = "FINISHED"
        run_id = run.stored.get("run_id")
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
            except MlflowException as exc:
                log.warning("MLflow run %s of %s is not in %s (%s): starting a new one", run_id, run.folder / TRACKERS_FILE, uri,
                            str(exc).splitlines()[0])
                run_id = None
        if not run_id:
            experiment = self.client.get_experiment_by_name(run.project)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(run.project)
            run_id = self.client.create_run(experiment_id, run_name=run.folder.resolve().name).info.run_id
        self.run_id = run_id
        self.stored = {"run_id": run_id}

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if scalars:
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def step(self, step: int, values: dict) -> None:
        self.log(numbers(values, "train"), step)

    def event(self, kind: str, values: dict) -> None:
        if kind == "preempted":
            self.status = "KILLED"
        self.log(numbers(values, EVENT_GROUPS.get(kind, kind)), values.get("step", 0))

    def close(self) -> None:
        self.client.set_terminated(self.run_id, status=self.status)


LOGGERS: dict[str, type[Sink]] = {
    "jsonl": JsonlSink,
    "console": ConsoleSink,
    "tensorboard": TensorBoardSink,
    "wandb": WandbSink,
    "mlflow": MlflowSink,
}


def chosen(names: Iterable[str]) -> list[str]:
    """train.loggers as registry names, each once, in order (the config accepts any case)."""
    return list(dict.fromkeys(str(n).strip().lower() for n in names))


def check_loggers(names: Iterable[str]) -> str:
    """Each chosen logger is registered and its package importable (without importing it:
    every rank runs this at launch). Raises LaunchError in one line."""
    from fla_ds.preflight import LaunchError

    for name in chosen(names):
        sink = LOGGERS.get(name)
        if sink is None:
            raise LaunchError(f"train.loggers: '{name}' is not one of {', '.join(LOGGERS)}")
        if sink.package and importlib.util.find_spec(sink.package) is None:
            raise LaunchError(f"train.loggers: {name} needs the {sink.package} package, an optional extra: {EXTRA}")
    return f"loggers: {', '.join(chosen(names))}"


def read_trackers(folder: Path) -> dict:
    path = folder / TRACKERS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}): remove it to start new tracker runs") from None
    return data if isinstance(data, dict) else {}


class RunLog:
    """The fan-out the trainer writes to: every chosen sink on rank 0, nothing on the others."""

    def __init__(self, run_dir: Path, rank: int, loggers: Iterable[str], total_steps: int, project: str = "fla-ds"):
        names = chosen(loggers)
        check_loggers(names)  # on every rank, so that all fail alike
        self.sinks: list[Sink] = []
        if rank != 0:
            return
        folder = Path(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        stored = read_trackers(folder)
        try:
            for name in names:
                self.sinks.append(LOGGERS[name](Run(folder, total_steps, project, dict(stored.get(name) or {}))))
        except BaseException:
            self.close()
            raise
        ids = {**stored, **{name: sink.stored for name, sink in zip(names, self.sinks) if sink.stored}}
        if ids != stored:
            from fla_ds.atomic import atomic_write_json

            atomic_write_json(folder / TRACKERS_FILE, ids)

    def step(self, step: int, **values) -> None:
        for sink in self.sinks:
            sink.step(step, values)

    def event(self, kind: str, **values) -> None:
        for sink in self.sinks:
            sink.event(kind, values)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()
