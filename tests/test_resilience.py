"""What a shared cluster does to a run, for real (tiny stage 1, DeepSpeed over gloo, torchrun):
signals to the launcher's process tree during training and during evaluation, kill -9 during
a save, a full disk, a rank that dies, a requeue on another number of ranks (ZeRO-2 and
ZeRO-3), a stale lock of DeepSpeed's op build, and every kind of bad launch, which must fail
in one line before anything is written."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TRAIN, env, losses, run, synthetic_shards, train_cmd, train_tiny_tokenizer

from fla_ds.checkpoint import check_complete, step_dirs


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("resilience")
    return {"shards": synthetic_shards(root), "tokenizer": train_tiny_tokenizer(root / "tokenizer")}


@pytest.fixture(scope="module")
def one_step_run(assets, tmp_path_factory) -> Path:
    """A finished 1-rank run of one step, trained once for the tests that launch again into a
    run folder (each copies it)."""
    out = tmp_path_factory.mktemp("one-step") / "run"
    run(train_cmd(assets, out, 1, "train.epochs=1", "train.max_steps=1", "eval.limit=2"))
    return out


def events(run_dir: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("event") == kind]


def start(cmd: list[str]) -> subprocess.Popen:
    # Its own session, like a job step: the test signals the launcher or its whole tree.
    return subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_until(condition, proc: subprocess.Popen, timeout: float = 300, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stdout.read()[-3000:]}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the run did not stop in time after the signal") from None
    return output


def rank_pids(launcher: subprocess.Popen) -> list[int]:
    return [int(p) for p in Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()]


def kill_tree(launcher: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """``sig`` to the launcher and to every rank's process group (torchrun starts each rank in
    its own session, with its loader workers), at once: what a node failure or Slurm's
    SIGKILL does."""
    for pid in rank_pids(launcher):
        os.killpg(pid, sig)
    os.killpg(launcher.pid, sig)


def steps_logged(run_dir: Path) -> int:
    return max(losses(run_dir), default=0) if (run_dir / "metrics.jsonl").is_file() else 0


# ------------------------------------------------------------------ signals


def test_sigterm_to_torchrun_mid_epoch_saves_at_a_step_boundary_and_resumes_exactly(assets, tmp_path):
    """torchrun (like Slurm) forwards SIGTERM to each rank's whole process group, loader
    workers included: the workers must not die of it before their rank saves."""
    settings = ["train.deterministic=true", "train.epochs=3", "train.max_steps=12", "stream.num_workers=2"]
    reference = tmp_path / "reference"
    run(train_cmd(assets, reference, 2, *settings))

    out = tmp_path / "run"
    proc = start(train_cmd(assets, out, 2, *settings))
    wait_until(lambda: steps_logged(out) >= 2, proc, what="step 2")
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # to torchrun itself
    output = finish(proc)
    took = time.monotonic() - sent
    assert "killed by signal" not in output, output[-3000:]
    preempted = events(out, "preempted")
    assert len(preempted) == 1, output[-3000:]
    stopped = preempted[0]["step"]
    assert stopped < 12 and check_complete(out / f"step-{stopped}", hashes=True) is None
    assert took < 30, f"{took:.0f} s from the signal to the end: torchrun SIGKILLs its ranks after 30 s"

    run(train_cmd(assets, out, 2, *settings))
    a, b = losses(reference), losses(out)
    assert sorted(b) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), f"step {step}"


def test_a_signal_during_evaluation_stops_at_the_next_batch_and_the_evaluation_runs_on_resume(assets, tmp_path):
    # Evaluation long enough to be signalled in: every dev clip, beam 5, 16 tokens.
    settings = ["train.epochs=2", "train.max_steps=4", "eval.limit=0", "eval.beam_size=5", "eval.max_new_tokens=16",
                "stream.num_workers=1"]
    out = tmp_path / "run"
    proc = start(train_cmd(assets, out, 2, *settings))
    wait_until(lambda: (out / "metrics.jsonl").is_file() and events(out, "evaluating"), proc, what="the evaluation after the epoch")  # said as it starts
    kill_tree(proc, signal.SIGTERM)  # the whole tree: launcher, ranks, loader workers
    output = finish(proc)
    preempted = events(out, "preempted")
    assert [p.get("during") for p in preempted] == ["evaluation"], output[-3000:]
    assert not events(out, "eval"), "the evaluation should have been cut short"
    state = json.loads((out / "step-4" / "trainer.json").read_text())
    assert state["eval_due"] is True and state["step"] == 4

    proc = run(train_cmd(assets, out, 2, *settings))
    evals = events(out, "eval")
    assert [e["step"] for e in evals] == [4] and evals[0]["n"] == 8  # all 8 dev clips, once
    assert "already saved complete" in proc.stderr  # the step was not written twice


def test_save_every_step_never_rewrites_a_complete_checkpoint(assets, tmp_path):
    out = tmp_path / "run"
    run(train_cmd(assets, out, 1, "train.epochs=2", "train.max_steps=4", "train.save_every=1", "train.keep_last=10"))
    saved = [e["step"] for e in events(out, "checkpoint")]
    assert saved == [1, 2, 3, 4], "each step is saved exactly once"
    assert [p.name for p in step_dirs(out)] == ["step-4", "step-3", "step-2", "step-1"]
    assert all(check_complete(p, hashes=True) is None for p in step_dirs(out))
    assert not list(out.glob(".step-*"))


def test_kill_9_during_a_save_loses_only_the_step_being_saved(assets, tmp_path):
    out = tmp_path / "run"
    settings = ["train.epochs=3", "train.max_steps=6", "train.save_every=2"]
    proc = start(train_cmd(assets, out, 2, *settings))
    wait_until(lambda: (out / "step-2" / "COMPLETE").is_file() and (out / ".step-4.partial").is_dir(), proc, what="the save of step 4")
    kill_tree(proc)
    proc.wait(timeout=30)
    assert (out / "latest").read_text().strip() == "step-2"
    assert check_complete(out / "step-2", hashes=True) is None and not (out / "step-4").exists()

    result = run(train_cmd(assets, out, 2, *settings))
    assert "resumed from" in result.stderr and "step-2" in result.stderr.split("resumed from")[1].splitlines()[0]
    assert not list(out.glob(".step-*.partial"))
    assert (out / "latest").read_text().strip() == "step-6" and check_complete(out / "step-6", hashes=True) is None


# ------------------------------------------------------------------ a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a given size (root only); unmounted afterwards."""
    mounted = []

    def make(megabytes: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
@pytest.mark.parametrize("megabytes, saved", [(150, []), (350, [2])], ids=["first-save-fails-mid-write", "room-for-one"])
def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stays_latest(assets, small_disk, megabytes, saved):
    """A tiny stage-1 checkpoint is about 260 MB: with 150 MB the first save runs out of space
    while writing; with 350 MB the first fits and the second is refused before writing."""
    out = small_disk(megabytes) / "run"
    proc = subprocess.run(train_cmd(assets, out, 2, "train.epochs=3", "train.max_steps=6", "train.save_every=2"),
                          env=env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1 and "no space left on device" in lines[0] and str(out) in lines[0], proc.stderr[-3000:]
    assert "basic_ios" not in lines[0] and "enforce fail" not in lines[0]
    assert [int(p.name[5:]) for p in step_dirs(out) if (p / "COMPLETE").is_file()] == saved
    if saved:
        assert (out / "latest").read_text().strip() == "step-2" and check_complete(out / "step-2", hashes=True) is None


# ------------------------------------------------------------------ other world sizes


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_run_resumes_on_fewer_then_more_ranks_with_its_optimizer_state(assets, tmp_path, zero):
    """2 ranks -> 1 -> 2, as a requeue on another number of nodes does: DeepSpeed's universal
    checkpoint conversion, automatically; the loss continues where it was."""
    out = tmp_path / "run"
    settings = [f"train.ds_config=ds_configs/{zero}.json", "train.epochs=6", "train.lr=1e-2"]
    run(train_cmd(assets, out, 2, *settings, "train.max_steps=6"))
    first = losses(out)
    proc = run(train_cmd(assets, out, 1, *settings, "train.max_steps=9"))
    assert "written by 2 ranks" in proc.stderr and "resumed from" in proc.stderr
    proc = run(train_cmd(assets, out, 2, *settings, "train.max_steps=12"))
    assert "written by 1 ranks" in proc.stderr
    curve = losses(out)
    assert sorted(curve) == list(range(1, 13))
    start = sum(first[s] for s in (1, 2)) / 2
    # After each resume the loss stays at the level training had reached, far below the start.
    for step in (7, 10):
        assert curve[step] < 0.9 * start, (step, curve)
    assert not list(out.glob(".universal-*")), "the converted copy is removed once loaded"
    assert check_complete(out / "step-12", hashes=True) is None


# ------------------------------------------------------------------ bad launches fail first, in one line


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("train.py: error:")]


@pytest.mark.parametrize("case", ["ds-json", "batch", "shards", "tokenizer", "resume-none"])
def test_a_bad_launch_is_one_line_before_anything_is_written(assets, one_step_run, tmp_path, case):
    out = tmp_path / "run"
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{ zero_optimization: {stage: 2} ")
    extra, message = {
        "ds-json": ([f"train.ds_config={bad_json}"], "not valid JSON"),
        "batch": (["train.global_batch=6"], "train.global_batch=6 is not a multiple of train.micro_batch x ranks = 2 x 2"),
        "shards": ([f"stream.shards={tmp_path / 'nowhere'}"], "index.json does not exist"),
        "tokenizer": ([f"train.tokenizer={tmp_path}"], "is not a Hugging Face tokenizer folder"),
        "resume-none": (["train.resume=none"], "already holds checkpoints"),
    }[case]
    if case == "resume-none":
        shutil.copytree(one_step_run, out, symlinks=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = subprocess.run(train_cmd(assets, out, 2, *extra), env=env(), capture_output=True, text=True, timeout=200)
    assert proc.returncode != 0
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and message in lines[0], proc.stderr[-3000:]
    assert 'fla_ds/' not in "".join(line for line in proc.stderr.splitlines() if line.strip().startswith("File ")), \
        "no traceback from our code (torchrun prints its own summary)"
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before, "nothing may be written"


def test_a_rerun_with_another_model_size_is_refused_and_the_run_config_kept(assets, one_step_run, tmp_path):
    out = Path(shutil.copytree(one_step_run, tmp_path / "run", symlinks=True))
    config = (out / "config.yaml").read_text()
    proc = subprocess.run(train_cmd(assets, out, 1, "light_t.d_model=64"), env=env(), capture_output=True, text=True, timeout=200)
    assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1
    assert "light_t.d_model is 32 there, 64 here" in proc.stderr
    assert (out / "config.yaml").read_text() == config


def test_check_only_checks_for_the_launch_world_size(assets, tmp_path):
    cmd = [sys.executable, TRAIN, "--check", "--stage", "1", f"stream.shards={assets['shards']}", f"train.tokenizer={assets['tokenizer']}",
           f"train.out={tmp_path / 'run'}", "train.global_batch=8", "train.micro_batch=2"]
    ok = subprocess.run([*cmd, "--world-size", "4"], env=env(), capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "ok: deepspeed:" in ok.stdout and "4 ranks x micro batch 2 x 1 accumulation = global batch 8" in ok.stdout
    bad = subprocess.run([*cmd, "--world-size", "16"], env=env(), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "train.global_batch=8 is not a multiple of train.micro_batch x ranks = 2 x 16" in bad.stderr
    assert not (tmp_path / "run").exists()


def test_a_stale_lock_of_deepspeeds_op_build_is_named_not_waited_on_forever(assets, tmp_path):
    ext = tmp_path / "extensions"
    lock = ext / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("")
    old = time.time() - 600
    os.utime(lock, (old, old))
    started = time.monotonic()
    proc = subprocess.run(train_cmd(assets, tmp_path / "run", 1), env={**env(), "TORCH_EXTENSIONS_DIR": str(ext)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and time.monotonic() - started < 60
    (line,) = error_lines(proc.stderr)
    assert f"remove {lock.parent}" in line


# ------------------------------------------------------------------ a rank that dies


def test_a_killed_rank_ends_the_job_in_seconds_and_the_rerun_resumes(assets, tmp_path):
    out = tmp_path / "run"
    settings = ["train.epochs=3", "train.max_steps=6", "train.save_every=2"]
    proc = start(train_cmd(assets, out, 2, *settings))
    wait_until(lambda: (out / "step-2" / "COMPLETE").is_file() and steps_logged(out) >= 3, proc, what="step 3")
    os.kill(rank_pids(proc)[-1], signal.SIGKILL)
    killed = time.monotonic()
    finish(proc, timeout=90)
    assert proc.returncode != 0 and time.monotonic() - killed < 60
    result = run(train_cmd(assets, out, 2, *settings))
    assert "resumed from" in result.stderr
    assert sorted(losses(out))[-1] == 6 and check_complete(out / "step-6", hashes=True) is None
