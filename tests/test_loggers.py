"""fla_ds/loggers.py: every sink writes what RunLog is given, read back with the tool's own
reader (TensorBoard's EventAccumulator, `wandb leet inspect --json`, MlflowClient on the file
store); a resumed RunLog continues the same wandb and MLflow runs; other ranks write nothing;
unknown names and missing tracker packages are one line. No training: the fan-out directly."""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fla_ds.config import ConfigError, load_config
from fla_ds.loggers import LOGGERS, RunLog
from fla_ds.preflight import LaunchError

ALL = ["jsonl", "console", "tensorboard", "wandb", "mlflow"]
REPO = Path(__file__).resolve().parent.parent

TOTAL = 4

STEPS = [
    (1, {"epoch": 0, "loss": 2.5, "lr": 0.01, "samples_per_s": 12.75, "tokens_per_s": 300.5}),
    (2, {"epoch": 0, "loss": 1.25, "lr": 0.005, "samples_per_s": 13.0, "tokens_per_s": 310.0}),
]
EVENTS = [
    ("eval", {"step": 2, "epoch": 0, "bleu4": 12.5, "rouge_l": 30.25}),
    ("checkpoint", {"step": 2, "path": "runs/x/step-2"}),
    ("preempted", {"step": 2, "signal": "SIGTERM"}),
]
LATER_STEPS = [(3, {"epoch": 1, "loss": 0.75, "lr": 0.0025, "samples_per_s": 14.0, "tokens_per_s": 320.0}),
               (4, {"epoch": 1, "loss": 0.5, "lr": 0.001, "samples_per_s": 14.5, "tokens_per_s": 330.0})]


@contextlib.contextmanager
def offline_env(home: Path):
    """The user's tracker settings out of the way, wandb's own folders under ``home``, and any
    connection leaving this machine from this process refused and recorded."""
    attempts = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def local(host) -> bool:
        return str(host) in ("localhost", "::1", "") or str(host).startswith("127.")

    def connect(sock, address):
        if sock.family != socket.AF_UNIX and not local(address[0]):
            attempts.append(address)
            raise OSError("no network in this test")
        return real_connect(sock, address)

    def getaddrinfo(host, *args, **kwargs):
        if not local(host):
            attempts.append(host)
            raise socket.gaierror("no network in this test")
        return real_getaddrinfo(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ERROR_REPORTING", "WANDB_SERVICE", "MLFLOW_TRACKING_URI",
                     "MLFLOW_DISABLE_TELEMETRY", "MLFLOW_ALLOW_FILE_STORE"):
            mp.setenv(name, "")  # recorded, so that what the sinks set is undone too
            mp.delenv(name)
        for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(name, str(home / name.lower()))
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        yield attempts


def write_launch(folder: Path, steps, events, loggers=ALL, rank: int = 0) -> str:
    """One launch of a run: what the trainer would tell RunLog. Returns the console output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        log = RunLog(folder, rank, loggers, total_steps=TOTAL, project="fla-ds-test")
        for step, values in steps:
            log.step(step, **values)
        for kind, values in events:
            log.event(kind, **values)
        log.close()
    return out.getvalue()


def file_store(folder: Path):
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(folder / "mlruns").resolve().as_uri())


def wandb_records(segment: Path) -> list[dict]:
    """The records of one offline run folder, as wandb's own CLI prints them."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(segment)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, WANDB_MODE="offline"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def wandb_history(segment: Path) -> dict[int, dict]:
    return {r["history"]["step"]["num"]: {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            for r in wandb_records(segment) if r["type"] == "history"}


def wandb_segments(folder: Path) -> list[Path]:
    """Its offline run folders, oldest first (offline-run-<time>-<id>[-N]: -1 when a second
    launch starts within the same second)."""
    return sorted((folder / "wandb").glob("offline-run-*"))


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected_scalars(steps, events) -> dict[str, dict[int, float]]:
    """What a tracker should hold: train/<key> per step, dev/<key> per evaluation."""
    want: dict[str, dict[int, float]] = {}
    for step, values in steps:
        for k, v in values.items():
            want.setdefault(f"train/{k}", {})[step] = float(v)
    for kind, values in events:
        if kind == "eval":
            for k, v in values.items():
                if k != "step":
                    want.setdefault(f"dev/{k}", {})[values["step"]] = float(v)
    return want


@pytest.fixture(scope="module", autouse=True)
def stop_wandb_service():
    """wandb keeps a service process per Python process; stop it with this module."""
    yield
    if sys.modules.get("wandb") is not None:
        sys.modules["wandb"].teardown()


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """One launch with every sink, logging STEPS then EVENTS."""
    home = tmp_path_factory.mktemp("loggers")
    folder = home / "run"
    with offline_env(home) as attempts:
        console = write_launch(folder, STEPS, EVENTS)
        yield folder, console
    assert attempts == [], f"a sink tried the network: {attempts}"


def test_registry_holds_one_class_per_name():
    assert set(LOGGERS) == set(ALL) and all(isinstance(cls, type) for cls in LOGGERS.values())


def test_jsonl_records_steps_and_events(logged):
    folder, _ = logged
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert all(isinstance(r.pop("time"), float) for r in records)
    assert records == [{"step": s, **v} for s, v in STEPS] + [{"event": k, **v} for k, v in EVENTS]


def test_console_prints_plain_lines_off_a_terminal(logged):
    _, console = logged
    import re

    lines = [line for line in console.splitlines() if not line.startswith("wandb:")]
    # step / total, the values, and the time left at this launch's pace (unknown after one step)
    assert lines[0] == f"step 1/{TOTAL} epoch=0 loss=2.5 lr=0.01 samples_per_s=12.75 tokens_per_s=300.5 eta=?"
    assert re.fullmatch(rf"step 2/{TOTAL} epoch=0 loss=1\.25 lr=0\.005 samples_per_s=13 tokens_per_s=310 eta=\d+s", lines[1]), lines[1]
    assert lines[2:] == [
        "eval: step=2 epoch=0 bleu4=12.5 rouge_l=30.25",
        "checkpoint: step=2 path=runs/x/step-2",
        "preempted: step=2 signal=SIGTERM",
    ]


def test_tensorboard_holds_every_scalar_at_its_step(logged):
    folder, _ = logged
    got = tensorboard_scalars(folder)
    want = expected_scalars(STEPS, EVENTS)
    assert set(got) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == list(points)
        assert [v for _, v in got[tag]] == pytest.approx(list(points.values()), rel=1e-6)  # float32


def test_wandb_offline_run_holds_every_scalar_at_its_step(logged):
    folder, _ = logged
    ids = json.loads((folder / "trackers.json").read_text())["wandb"]
    [segment] = wandb_segments(folder)
    [run] = [r["run"] for r in wandb_records(segment) if r["type"] == "run"]
    assert (run["run_id"], run["project"], run["display_name"]) == (ids["id"], "fla-ds-test", "run")
    history = wandb_history(segment)
    for tag, points in expected_scalars(STEPS, EVENTS).items():
        assert {s: history[s][tag] for s in points} == points
    assert set().union(*history.values()) == set(expected_scalars(STEPS, EVENTS))


def test_mlflow_file_store_holds_every_scalar_at_its_step(logged):
    folder, _ = logged
    run_id = json.loads((folder / "trackers.json").read_text())["mlflow"]["run_id"]
    with offline_env(folder.parent):
        client = file_store(folder)
        run = client.get_run(run_id)
        assert (run.info.run_name, run.info.status) == ("run", "KILLED")  # the launch ended preempted
        assert client.get_experiment(run.info.experiment_id).name == "fla-ds-test"
        want = expected_scalars(STEPS, EVENTS)
        assert set(run.data.metrics) == set(want)
        for tag, points in want.items():
            assert {m.step: m.value for m in client.get_metric_history(run_id, tag)} == points


def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path):
    folder = tmp_path / "run"
    with offline_env(tmp_path) as attempts:
        write_launch(folder, STEPS, EVENTS[:1] + [("preempted", {"step": 2, "signal": "SIGUSR1"})])
        first = json.loads((folder / "trackers.json").read_text())
        write_launch(folder, LATER_STEPS, [])  # a new process would build a new RunLog just so
        assert json.loads((folder / "trackers.json").read_text()) == first
        steps = STEPS + LATER_STEPS

        # wandb: one offline folder per launch, one run id, the second a resume continuing the steps
        segments = wandb_segments(folder)
        assert len(segments) == 2
        runs = [[r["run"] for r in wandb_records(s) if r["type"] == "run"][0] for s in segments]
        assert {r["run_id"] for r in runs} == {first["wandb"]["id"]} and runs[1].get("resume") is True
        assert sorted(wandb_history(segments[0])) == [1, 2] and sorted(wandb_history(segments[1])) == [3, 4]
        assert {s: wandb_history(segments[1])[s]["train/loss"] for s in (3, 4)} == {3: 0.75, 4: 0.5}

        # MLflow: one run in the experiment, its history 1..4, finished
        client = file_store(folder)
        run = client.get_run(first["mlflow"]["run_id"])
        assert run.info.status == "FINISHED"
        assert [r.info.run_id for r in client.search_runs([run.info.experiment_id])] == [run.info.run_id]
        assert {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")} == {s: v["loss"] for s, v in steps}

        # TensorBoard and JSONL: both launches read as one run
        assert [s for s, _ in tensorboard_scalars(folder)["train/loss"]] == [1, 2, 3, 4]
        assert [json.loads(line).get("step") for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 2, 2, 2, 3, 4]
    assert attempts == []


NETWORK_PROBE = """
import json, socket, sys, time
from pathlib import Path
attempts = []
real = socket.socket.connect
def connect(sock, address):
    if sock.family != socket.AF_UNIX:
        attempts.append(str(address))
        raise OSError("no network here")
    return real(sock, address)
def getaddrinfo(host, *args, **kwargs):
    attempts.append(str(host))
    raise socket.gaierror("no network here")
socket.socket.connect, socket.getaddrinfo = connect, getaddrinfo
from fla_ds.loggers import RunLog
log = RunLog(Path(sys.argv[1]), 0, ["tensorboard", "wandb", "mlflow"], total_steps=2)
log.step(1, loss=1.5)
log.close()
time.sleep(1.5)  # MLflow's telemetry, when on, fetches its settings from a thread at import
print(json.dumps(attempts))
"""


def test_no_tracker_reaches_for_the_network(tmp_path):
    """In a fresh process outside pytest (MLflow turns its telemetry off by itself under pytest
    and CI): every connection from Python refused and recorded. wandb-core is not Python; it
    is offline (checked with strace: no socket but its own)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_")) and k not in ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS")}
    env.update({f"WANDB_{d}_DIR": str(tmp_path / d.lower()) for d in ("CONFIG", "CACHE", "DATA", "ARTIFACT")})
    proc = subprocess.run([sys.executable, "-c", NETWORK_PROBE, str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_other_ranks_write_nothing(tmp_path):
    folder = tmp_path / "run"
    with offline_env(tmp_path):
        assert write_launch(folder, STEPS, EVENTS, rank=1) == ""
    assert not folder.exists()


def test_an_unknown_logger_is_refused_at_parse_time_in_one_line():
    assert list(load_config(None, [f"train.loggers=[{','.join(ALL)}]"]).train.loggers) == ALL
    with pytest.raises(ConfigError) as err:
        load_config(None, ["train.loggers=[jsonl,tensorbord]"])
    assert "(did you mean 'tensorboard'?)" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name, package", [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("mlflow", "mlflow")])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, name, package):
    monkeypatch.setitem(sys.modules, package, None)  # how Python marks a package absent
    with pytest.raises(LaunchError) as err:
        RunLog(tmp_path / "run", 1, ["jsonl", name], total_steps=1)  # every rank checks, not only rank 0
    assert str(err.value) == f"train.loggers: {name} needs the {package} package, an optional extra: pip install 'fla-ds[tracking]'"
    assert not (tmp_path / "run").exists()


def test_train_py_check_refuses_a_missing_tracker_at_launch(tmp_path):
    code = ("import sys; sys.modules['wandb'] = None; from fla_ds.train import main; "
            f"sys.exit(main(['--check', '--stage', '1', 'train.loggers=[jsonl,wandb]', 'train.out={tmp_path / 'run'}']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "train.py: error: train.loggers: wandb needs the wandb package, an optional extra: pip install 'fla-ds[tracking]'"]
    assert not (tmp_path / "run").exists()
