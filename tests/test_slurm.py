"""slurm/*.sh on a real two-node Slurm cluster on this machine (tests/slurm_cluster.py): stage 1
across two nodes, preemption -> checkpoint -> requeue -> resume, a shard build as a job array
that equals a one-machine build, and stage 2. Nodes are fake (both on localhost), ranks use gloo.
The scripts are submitted exactly as a user would, with their #SBATCH defaults except the
resources this small cluster has (--gpus-per-node=1 on fake GPUs, --cpus-per-task, --time)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_STAGE1, save_tiny_llama, synthetic_shards, train_tiny_tokenizer
from slurm_cluster import SlurmCluster

from fla_ds.checkpoint import check_complete

ROOT = Path(__file__).resolve().parent.parent
SLURM = ROOT / "slurm"
SMALL = ["--nodes=2", "--gpus-per-node=1", "--cpus-per-task=1", "--time=10"]
"""This cluster's nodes have 4 CPUs and 2 fake GPUs; the scripts' defaults ask for up to 32 and 8."""
TRAINS = {"stage1.sh": ("*_stage1.yaml",), "stage2.sh": ("*_llama7b_qlora.yaml", "*_mbart.yaml")}
"""The shipped configs each training script runs."""


def shipped(script: str) -> list[Path]:
    return sorted(c for pattern in TRAINS[script] for c in (ROOT / "fla_ds" / "configs").glob(pattern))


def job_env(cluster: SlurmCluster, **extra: str) -> dict:
    return dict(cluster.env, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
                FLA_DS_PYTHON=sys.executable, **extra)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def step_records(run_dir: Path) -> list[int]:
    return [r["step"] for r in records(run_dir) if "loss" in r]


def explain(cluster: SlurmCluster, log: Path) -> str:
    text = log.read_text(errors="replace")[-4000:] if log.is_file() else f"(no {log})"
    return f"\n--- job log\n{text}\n--- daemons{cluster.logs_tail(800)}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("slurm-assets")
    return {"shards": synthetic_shards(root), "tokenizer": train_tiny_tokenizer(root / "tokenizer")}


def submit_stage1(cluster: SlurmCluster, assets: dict, workdir: Path, *overrides: str) -> str:
    """sbatch from workdir (where the log and the relative run folder go), the script given by
    its absolute path: the job must find the repository by itself."""
    args = [f"stream.shards={assets['shards']}", f"train.tokenizer={assets['tokenizer']}", "train.out=run", *overrides]
    return cluster.sbatch([*SMALL, str(SLURM / "stage1.sh"), *args], cwd=workdir, env=job_env(cluster, FLA_DS_OVERRIDES=" ".join(TINY_STAGE1)))


@pytest.fixture(scope="module")
def stage1_job(slurm_cluster: SlurmCluster, assets, tmp_path_factory) -> dict:
    """A finished stage-1 job: 2 nodes x 1 rank, 4 steps and an evaluation."""
    workdir = tmp_path_factory.mktemp("stage1-job")
    job = submit_stage1(slurm_cluster, assets, workdir, "train.epochs=1", "train.max_steps=4")
    record = slurm_cluster.wait_done(job, timeout=300)
    return {"job": job, "record": record, "dir": workdir, "run": workdir / "run", "log": workdir / f"fla-stage1-{job}.out"}


# ------------------------------------------------------------------ the helpers, without Slurm


def bash(snippet: str, **env: str) -> str:
    proc = subprocess.run(["bash", "-c", f'source "{SLURM}/common.sh"; {snippet}'], capture_output=True, text=True, timeout=30,
                          env={"PATH": os.environ["PATH"], **env})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_processes_per_node_follow_the_gpus_slurm_gave():
    assert bash("fla_ds_gpus_per_node", SLURM_GPUS_ON_NODE="8").strip() == "8"
    assert bash("fla_ds_gpus_per_node", SLURM_GPUS_PER_NODE="a100:4").strip() == "4"
    assert bash("fla_ds_gpus_per_node", SLURM_GPUS_PER_NODE="0").strip() == "1"  # CPU: one process per node
    assert bash("fla_ds_gpus_per_node").strip() == "1"
    assert bash("fla_ds_gpus_per_node", SLURM_GPUS_ON_NODE="8", FLA_DS_GPUS_PER_NODE="2").strip() == "2"


def test_overrides_from_the_environment_and_the_command_line_go_last():
    out = bash('fla_ds_train_args "b=2" --stage 1 "c=x y"; printf "%s\\n" "${FLA_DS_ARGS[@]}"', FLA_DS_CONFIG="demo", FLA_DS_OVERRIDES="a=1 z=0")
    assert out.splitlines() == ["--config", "demo", "--stage", "1", "a=1", "z=0", "b=2", "c=x y"]


def test_the_config_and_the_batch_split_are_checked_before_launch(assets, tmp_path):
    inputs = f"stream.shards={assets['shards']} train.tokenizer={assets['tokenizer']}"
    run = bash(f"fla_ds_check_config 2 --stage 1 {inputs} train.micro_batch=4 train.out={tmp_path / 'x'}", FLA_DS_PYTHON=sys.executable,
               FLA_DS_ROOT=str(ROOT))
    assert run.strip() == str(tmp_path / "x")
    for ranks, override, message in [(16, "train.out=x", "train.global_batch=8 is not a multiple of train.micro_batch x ranks = 8 x 16"),
                                     (1, "train.lrr=1", "did you mean 'train.lr'")]:
        proc = subprocess.run(["bash", "-c", f'source "{SLURM}/common.sh"; fla_ds_check_config {ranks} --stage 1 {inputs} {override}'],
                              capture_output=True, text=True, timeout=60, env=dict(os.environ, FLA_DS_PYTHON=sys.executable, FLA_DS_ROOT=str(ROOT)))
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr


def sbatch_defaults(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", script.read_text(), re.M))


@pytest.mark.parametrize("script, config", [(s, c.stem) for s in TRAINS for c in shipped(s)])
def test_every_shipped_config_fits_its_scripts_default_layout(script, config):
    """The batch split train.py checks before a launch, at the ranks the script's #SBATCH
    defaults give (nodes x GPUs per node), for each script x config pair."""
    from fla_ds.config import load_config
    from fla_ds.preflight import check_deepspeed

    defaults = sbatch_defaults(SLURM / script)
    ranks = int(defaults["nodes"]) * int(defaults["gpus-per-node"])
    fact = check_deepspeed(load_config(config), ranks)
    assert f"{ranks} ranks x micro batch" in fact


def test_the_training_scripts_map_covers_every_shipped_config():
    covered = {c.stem for s in TRAINS for c in shipped(s)}
    assert covered | {"demo"} == {c.stem for c in (ROOT / "fla_ds" / "configs").glob("*.yaml")}
    assert len(covered) == 9


def test_shipped_stage2_configs_name_local_model_folders():
    """Compute nodes are offline: a hub id would fail after the GPUs are allocated."""
    from fla_ds.config import load_config

    for path in shipped("stage2.sh"):
        model = load_config(path.stem).stage2.model
        assert model.startswith("models/"), (path.name, model)


def test_a_run_counts_as_preempted_only_when_its_last_record_says_so(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"time": 1, "event": "checkpoint", "step": 4}\n{"time": 2, "event": "preempted", "step": 4}\n')
    assert bash(f'fla_ds_was_preempted "{tmp_path}" && echo yes || echo no').strip() == "yes"
    log.write_text(log.read_text() + '{"time": 3, "step": 5, "loss": 1.0}\n')
    assert bash(f'fla_ds_was_preempted "{tmp_path}" && echo yes || echo no').strip() == "no"
    # The trainer closes every launch with a summary, written by the JSONL sink itself.
    from fla_ds.loggers import RunLog

    for outcome, want in [("preempted", "yes"), ("finished", "no")]:
        log.unlink()
        run_log = RunLog(tmp_path, 0, ["jsonl"], total_steps=10)
        run_log.event("preempted", step=4, signal="SIGUSR1")
        run_log.event("summary", outcome=outcome, step=4, total_steps=10, epoch=0, seconds=1.0, samples_per_s=2.0,
                      run_dir=str(tmp_path), latest="step-4", best={})
        run_log.close()
        assert bash(f'fla_ds_was_preempted "{tmp_path}" && echo yes || echo no').strip() == want, log.read_text()


# ------------------------------------------------------------------ on the cluster


def test_stage1_trains_across_two_nodes(slurm_cluster, stage1_job):
    record, log, run = stage1_job["record"], stage1_job["log"], stage1_job["run"]
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", explain(slurm_cluster, log)
    text = log.read_text()  # the default --output, in the submit folder
    assert "2 nodes x 1 processes, master n1:" in text
    assert re.search(r"node 0 of 2: n1 ", text) and re.search(r"node 1 of 2: n2 ", text), text[-3000:]
    assert step_records(run) == [1, 2, 3, 4]
    final = run / "step-4"
    assert check_complete(final, hashes=True) is None
    # One rank per node, one process group: both ranks' state is in the checkpoint.
    assert (final / "rng-00000.json").is_file() and (final / "rng-00001.json").is_file()
    assert "requeue" not in text


def test_a_bad_config_fails_the_job_before_any_node_starts(slurm_cluster, assets, tmp_path):
    job = submit_stage1(slurm_cluster, assets, tmp_path, "train.lrr=1")
    record = slurm_cluster.wait_done(job, timeout=120)
    text = (tmp_path / f"fla-stage1-{job}.out").read_text()
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "2:0", text
    assert "did you mean 'train.lr'" in text and "node 0 of 2" not in text and record["Restarts"] == "0"


def test_preempted_job_saves_requeues_itself_and_resumes(slurm_cluster, assets, tmp_path):
    job = submit_stage1(slurm_cluster, assets, tmp_path, "train.epochs=3", "train.max_steps=18")
    run, log = tmp_path / "run", tmp_path / f"fla-stage1-{job}.out"
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").is_file() and step_records(run)[-1:] >= [2]):
        assert time.monotonic() < deadline and slurm_cluster.in_queue(job), "no step 2 in time" + explain(slurm_cluster, log)
        time.sleep(0.2)
    # What Slurm does 300 s before the time limit (--signal=B:USR1@300), now.
    slurm_cluster.cmd(["scancel", "--batch", "--signal=USR1", job])
    record = slurm_cluster.wait_done(job, timeout=400)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", explain(slurm_cluster, log)
    assert record["Restarts"] == "1", explain(slurm_cluster, log)

    stops = [r["step"] for r in records(run) if r.get("event") == "preempted"]
    assert len(stops) == 1 and 2 <= stops[0] < 18
    stopped = stops[0]
    # The loss curve goes on from the checkpoint: every step once, in order, none missing.
    assert step_records(run) == list(range(1, 19))
    text = log.read_text()  # --open-mode=append: both runs in one log
    assert "restart 0" in text and "restart 1" in text
    assert f"requeueing job {job}" in text
    assert re.search(rf"resumed from \S*step-{stopped} at epoch \d+, step {stopped}", text), text[-3000:]
    assert check_complete(run / "step-18", hashes=True) is None


def test_sigterm_to_the_job_steps_then_a_requeue_on_one_node_finishes_the_curve(slurm_cluster, assets, tmp_path):
    """Preemption as the scheduler does it (SIGTERM to every process of the step: torchrun,
    ranks, loader workers), then the job back on fewer nodes: it resumes from the checkpoint
    on 1 rank (DeepSpeed's universal checkpoint) and finishes every step once."""
    job = submit_stage1(slurm_cluster, assets, tmp_path, "train.epochs=3", "train.max_steps=18")
    run, log = tmp_path / "run", tmp_path / f"fla-stage1-{job}.out"
    deadline = time.monotonic() + 240
    while not ((run / "metrics.jsonl").is_file() and step_records(run)[-1:] >= [2]):
        assert time.monotonic() < deadline and slurm_cluster.in_queue(job), "no step 2 in time" + explain(slurm_cluster, log)
        time.sleep(0.2)
    slurm_cluster.cmd(["scancel", "--signal=TERM", job])
    record = slurm_cluster.wait_done(job, timeout=300)
    assert record["ExitCode"] == "0:0", explain(slurm_cluster, log)
    stops = [r["step"] for r in records(run) if r.get("event") == "preempted"]
    assert len(stops) == 1 and stops[0] < 18, explain(slurm_cluster, log)
    assert "training stopped at a checkpoint before its end" in log.read_text()

    slurm_cluster.cmd(["scontrol", "requeuehold", job])
    slurm_cluster.cmd(["scontrol", "update", f"JobId={job}", "NumNodes=1", "NumTasks=1", "NumCPUs=1"])
    slurm_cluster.cmd(["scontrol", "release", job])
    record = slurm_cluster.wait_done(job, timeout=400)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", explain(slurm_cluster, log)
    assert "1 nodes x 1 processes" in text and "written by 2 ranks" in text, text[-3000:]
    assert step_records(run) == list(range(1, 19))
    assert check_complete(run / "step-18", hashes=True) is None


def test_a_stop_request_after_training_ended_does_not_requeue(slurm_cluster, assets, stage1_job):
    """The same command again on a finished run: it resumes, has nothing to do, and ends. A
    SIGUSR1 while it starts (the ranks ignore it until they can save) must not requeue it."""
    workdir = stage1_job["dir"]
    job = submit_stage1(slurm_cluster, assets, workdir, "train.epochs=1", "train.max_steps=4")
    log = workdir / f"fla-stage1-{job}.out"
    deadline = time.monotonic() + 120
    while "node 1 of 2" not in (log.read_text() if log.is_file() else ""):
        assert time.monotonic() < deadline and slurm_cluster.in_queue(job), "the job did not start" + explain(slurm_cluster, log)
        time.sleep(0.2)
    slurm_cluster.cmd(["scancel", "--batch", "--signal=USR1", job])
    record = slurm_cluster.wait_done(job, timeout=240)
    text = log.read_text()
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", explain(slurm_cluster, log)
    assert record["Restarts"] == "0" and "SIGUSR1" in text and "not requeued" in text, text[-3000:]
    assert step_records(stage1_job["run"]) == [1, 2, 3, 4]


def test_shard_array_builds_what_one_machine_builds(slurm_cluster, tmp_path):
    from fla_ds.config import load_config
    from fla_ds.corpus.synthetic import generate

    corpus = tmp_path / "synth"
    generate(load_config(None, [f"synth.out={corpus}", "synth.size=32", "synth.train=20", "synth.dev=2", "synth.test=2", "synth.vocab_size=12"]).synth)
    args = ["--corpus", "synthetic", "--root", str(corpus), "--split", "train", "shards.short_side=32", "shards.samples_per_shard=4"]
    env = job_env(slurm_cluster)
    local = subprocess.run([sys.executable, "-m", "fla_ds", "shards", "build", *args, "--out", str(tmp_path / "local"), "--quiet"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr

    # From a "login node": plans, then submits the array (2 tasks x 3 shards of 5) and the index job.
    env.update(FLA_DS_SHARDS_PER_TASK="3", FLA_DS_SBATCH_ARGS="--cpus-per-task=2 --time=10")
    proc = subprocess.run(["bash", str(SLURM / "shards.sh"), *args, "--out", str(tmp_path / "array")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = re.search(r"submitted array job (\d+) \((\d+) tasks x 3 shards of 5\) and index job (\d+)", proc.stdout)
    assert found, proc.stdout
    array, tasks, index = found.groups()
    slurm_cluster.track(array)
    slurm_cluster.track(index)
    assert tasks == "2"
    slurm_cluster.wait_done(array, timeout=240)
    record = slurm_cluster.wait_done(index, timeout=240)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("fla-shards*.out")))
    assert slurm_cluster.job_states(array) == ["COMPLETED", "COMPLETED"], logs
    assert record["JobState"] == "COMPLETED", logs + explain(slurm_cluster, tmp_path / f"fla-shards-index-{index}.out")
    assert "split train: 3 shards built" in logs and "split train: 2 shards built" in logs and "0 shards built, 5 already complete" in logs

    expected = sorted(p.name for p in (tmp_path / "local").glob("train-*.tar"))
    assert len(expected) == 5
    assert sorted(p.name for p in (tmp_path / "array").glob("train-*.tar")) == expected
    for name in [*expected, "index.json", "rejects.jsonl"]:
        assert (tmp_path / "array" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


def test_features_and_evaluation_jobs_on_two_nodes_equal_one_process(slurm_cluster, stage1_job, assets, tmp_path):
    """slurm/features.sh and slurm/evaluate.sh spread `fla-ds features extract` / `evaluate`
    over the job's nodes: the same clips and features (within float tolerance) and the same
    hypotheses and scores as one process on this machine."""
    import numpy as np

    from fla_ds.hypotheses import read_tsv
    from fla_ds.shards import iter_raw_samples, load_index
    from fla_ds.shards.format import parse_feature_sample

    assert stage1_job["record"]["JobState"] == "COMPLETED"
    run, env = stage1_job["run"], job_env(slurm_cluster)
    common = ["--checkpoint", str(run), "--shards", str(assets["shards"])]
    local = subprocess.run([sys.executable, "-m", "fla_ds", "features", "extract", *common, "--out", str(tmp_path / "local"), "--split", "dev",
                            "--workers", "0"], env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    job = slurm_cluster.sbatch([*SMALL, str(SLURM / "features.sh"), *common, "--out", str(tmp_path / "nodes"), "--split", "dev", "--workers", "0"],
                               cwd=tmp_path, env=env)
    log = tmp_path / f"fla-features-{job}.out"
    record = slurm_cluster.wait_done(job, timeout=300)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", explain(slurm_cluster, log)
    assert "node 0 of 2: n1 " in log.read_text() and "node 1 of 2: n2 " in log.read_text()

    def features(folder: Path) -> dict:
        out = {}
        for shard in load_index(folder, "dev")["shards"]:
            for raw in iter_raw_samples(str(folder / shard["name"]), payload="features"):
                meta, values = parse_feature_sample(str(folder / shard["name"]), raw)
                out[meta["id"]] = values
        return out

    one, two = features(tmp_path / "local"), features(tmp_path / "nodes")
    assert load_index(tmp_path / "nodes", "dev")["world_size"] == 2 and sorted(two) == sorted(one) and len(one) == 8
    for key, values in one.items():
        assert np.allclose(two[key], values, rtol=0, atol=1e-3 * np.abs(values).max()), key

    local = subprocess.run([sys.executable, "-m", "fla_ds", "evaluate", *common, "--split", "dev", "--beam", "2", "--out", str(tmp_path / "eval-local")],
                           env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    job = slurm_cluster.sbatch([*SMALL, str(SLURM / "evaluate.sh"), *common, "--split", "dev", "--beam", "2", "--out", str(tmp_path / "eval-nodes")],
                               cwd=tmp_path, env=env)
    log = tmp_path / f"fla-evaluate-{job}.out"
    record = slurm_cluster.wait_done(job, timeout=300)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", explain(slurm_cluster, log)
    assert "a run folder; using its" in log.read_text()  # which checkpoint the run folder meant, said once
    assert log.read_text().count("a run folder; using its") == 1
    assert read_tsv(tmp_path / "eval-nodes" / "hypotheses.tsv") == read_tsv(tmp_path / "eval-local" / "hypotheses.tsv")
    scores = [json.loads((tmp_path / f"eval-{where}" / "metrics.json").read_text()) for where in ("local", "nodes")]
    assert scores[0] == scores[1] and scores[0]["n"] == 8


def test_stage2_trains_across_two_nodes(slurm_cluster, stage1_job, assets, tmp_path):
    if not (ROOT / "fla_ds" / "stage2.py").is_file():
        pytest.skip("fla_ds/stage2.py does not exist yet")
    assert stage1_job["record"]["JobState"] == "COMPLETED"
    llama = save_tiny_llama(tmp_path / "llama")
    overrides = [f"stream.shards={assets['shards']}", f"stage2.encoder={stage1_job['run']}", f"stage2.model={llama}", "train.out=run2",
                 "train.epochs=1", "train.max_steps=3", "stage2.lora_r=4", "eval.max_new_tokens=4",
                 "stage2.max_target_tokens=16"]
    tiny = [o for o in TINY_STAGE1 if o.startswith(("stream.", "train."))]
    job = slurm_cluster.sbatch([*SMALL, str(SLURM / "stage2.sh"), *overrides], cwd=tmp_path, env=job_env(slurm_cluster, FLA_DS_OVERRIDES=" ".join(tiny)))
    log = tmp_path / f"fla-stage2-{job}.out"
    record = slurm_cluster.wait_done(job, timeout=400)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", explain(slurm_cluster, log)
    text = log.read_text()
    assert "node 0 of 2: n1 " in text and "node 1 of 2: n2 " in text
    assert step_records(tmp_path / "run2") == [1, 2, 3]
    assert check_complete(tmp_path / "run2" / "step-3", hashes=True) is None
