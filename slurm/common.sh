# shellcheck shell=bash
# Helpers shared by slurm/stage1.sh, stage2.sh, features.sh, evaluate.sh and shards.sh (sourced, not run).
#
# Environment they read (all optional):
#   FLA_DS_PYTHON      the python that has fla_ds installed (default: the repository's .venv,
#                      else python3 on PATH, e.g. an activated conda env)
#   FLA_DS_CONFIG      the config: a YAML file, or the name of one in fla_ds/configs
#   FLA_DS_OVERRIDES   key=value overrides, split on whitespace (values with spaces: pass them
#                      as arguments of the script instead)
#   FLA_DS_GPUS_PER_NODE  training processes per node (default: the GPUs Slurm gave the node, 1 without)
#   FLA_DS_RESIGNAL_S  how often a stop request is repeated until training stops (default 30)

fla_ds_setup() {
    FLA_DS_ROOT=$(cd "$FLA_DS_ROOT" && pwd)  # set by the script that sourced us
    if [ -z "${FLA_DS_PYTHON:-}" ]; then
        if [ -x "$FLA_DS_ROOT/.venv/bin/python" ]; then FLA_DS_PYTHON=$FLA_DS_ROOT/.venv/bin/python; else FLA_DS_PYTHON=python3; fi
    fi
    export FLA_DS_PYTHON PYTHONUNBUFFERED=1  # log lines appear as they are printed
}

fla_ds_header() {
    echo "fla_ds: job ${SLURM_JOB_ID:-none}${SLURM_ARRAY_TASK_ID:+ (array task $SLURM_ARRAY_TASK_ID)} on ${SLURM_JOB_NODELIST:-$(hostname)}," \
         "restart ${SLURM_RESTART_COUNT:-0}, $(date '+%F %T'), python $FLA_DS_PYTHON"
}

fla_ds_gpus_per_node() {
    # "a100:8" -> 8; 0 or unset (a CPU job) -> one process per node.
    local gpus=${FLA_DS_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}
    gpus=${gpus##*:}
    case $gpus in '' | *[!0-9]* | 0) gpus=1 ;; esac
    echo "$gpus"
}

fla_ds_master_addr() {
    scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1
}

fla_ds_master_port() {
    # The same rule as fla_ds/distributed.py: two jobs sharing a node rarely pick the same port.
    echo $((20000 + SLURM_JOB_ID % 20000))
}

fla_ds_overrides_last() {
    # Fills the array FLA_DS_ARGS with "$@", every key=value moved after the flags: argparse
    # (train.py, fla-ds) takes key=value in one run only, so "a=1 --config c b=2" would fail.
    FLA_DS_ARGS=()
    local arg overrides=() value_next=
    for arg in "$@"; do
        if [ -n "$value_next" ]; then
            FLA_DS_ARGS+=("$arg")
            value_next=
        elif [[ $arg == -* ]]; then
            FLA_DS_ARGS+=("$arg")
            [[ $arg == *=* || $arg == --quiet || $arg == -h || $arg == --help ]] || value_next=1
        elif [[ $arg == *=* ]]; then
            overrides+=("$arg")
        else
            FLA_DS_ARGS+=("$arg")
        fi
    done
    FLA_DS_ARGS+=("${overrides[@]}")
}

fla_ds_train_args() {
    # Fills FLA_DS_ARGS: [--config FLA_DS_CONFIG], then the script's arguments, then
    # FLA_DS_OVERRIDES and the script's key=value arguments (the later wins).
    local extra=()
    if [ -n "${FLA_DS_CONFIG:-}" ]; then extra+=(--config "$FLA_DS_CONFIG"); fi
    # shellcheck disable=SC2206  # word splitting is the documented contract of FLA_DS_OVERRIDES
    if [ -n "${FLA_DS_OVERRIDES:-}" ]; then extra+=($FLA_DS_OVERRIDES); fi
    fla_ds_overrides_last "${extra[@]}" "$@"
}

fla_ds_check_config() {
    # fla_ds_check_config RANKS [train.py arguments...]: runs train.py's checks for a launch of
    # RANKS ranks (config, DeepSpeed JSON, batch split, shards, inputs, run folder, disk; see
    # fla_ds/preflight.py), then prints the run folder (train.out). A mistake fails here in
    # seconds (one error line, exit 2), not after every node loaded its model.
    "$FLA_DS_PYTHON" "$FLA_DS_ROOT/fla_ds/train.py" --check --world-size "$1" "${@:2}" >&2 || return 2
    "$FLA_DS_PYTHON" - "${@:2}" <<'EOF'
import sys

from fla_ds.config import load_config
from fla_ds.train import parse_args

args = parse_args(sys.argv[1:])
print(load_config(args.config, args.overrides).train.out)
EOF
}

fla_ds_was_preempted() {
    # fla_ds_was_preempted RUN [LINES]: the run's last record (the closing summary, or the
    # preempted event of a run killed before its summary) says it stopped on a signal after
    # saving (there is more to do), and was written after the log's first LINES lines (by this
    # job's step, not an earlier one).
    local log="$1/metrics.jsonl"
    [ -f "$log" ] && [ "$(wc -l < "$log")" -gt "${2:-0}" ] \
        && tail -n 1 "$log" | grep -Eq '"event": *"preempted"|"event": *"summary", *"outcome": *"preempted"'
}

fla_ds_log_lines() {
    if [ -f "$1/metrics.jsonl" ]; then wc -l < "$1/metrics.jsonl"; else echo 0; fi
}

# ---------------------------------------------------------------- workers and CPUs per GPU
#
# The rule (docs/cluster.md, "Workers and CPUs per GPU"): loader workers per GPU =
# ceil(clips/s the GPU takes / clips/s one worker decodes per core), and each rank needs one CPU
# for itself and one per worker: with one task per node, --cpus-per-task = GPUs per node x
# (stream.num_workers + 1). Fewer CPUs than that and the workers share cores (the GPU waits).

fla_ds_loader_note() {
    # One log line: the CPUs each of the node's ranks has, and the workers they allow.
    local ranks cpus per_rank
    ranks=$(fla_ds_gpus_per_node)
    cpus=${SLURM_CPUS_PER_TASK:-1}
    per_rank=$((cpus / ranks))
    echo "fla_ds: $cpus CPUs for $ranks ranks per node: $per_rank per rank, so up to $((per_rank > 1 ? per_rank - 1 : 0))" \
         "loader workers each without sharing a core (stream.num_workers; docs/cluster.md, Workers and CPUs per GPU)"
}

# ---------------------------------------------------------------- signals
#
# A batch script receives signals (--signal=B:USR1@N, scancel --batch) only while it `wait`s,
# so the training step runs in the background. SIGUSR1 means "save and come back": the job
# requeues itself once the ranks saved. SIGTERM (scancel, preemption by the scheduler) means
# "save and stop": the same request, no requeue.
#
# The request reaches every process of the step (`scancel --signal` signals them all). torchrun
# must survive SIGUSR1 (its default action is to die, orphaning the ranks), so each node
# launcher ignores it before exec'ing torchrun, and the ranks install their own handler
# (fla_ds/trainer.py StopFlag). The request is always SIGUSR1, never SIGTERM: torchrun answers
# SIGTERM by SIGKILLing its ranks 30 s later, which a large checkpoint may not survive.

fla_ds_on_signal() {
    # The batch script's trap: remember what was asked, and start asking the step.
    echo "fla_ds: SIG$1 at $(date '+%F %T'): asking the training processes to save a checkpoint and stop"
    if [ "$1" = USR1 ]; then FLA_DS_GOT_USR1=1; else FLA_DS_GOT_TERM=1; fi
    fla_ds_start_asking
}

fla_ds_start_asking() {
    # SIGUSR1 to every step of the job, repeated every FLA_DS_RESIGNAL_S seconds until the
    # step is gone: a request that lands while the ranks are still starting (before they have a
    # handler, SIGUSR1 is ignored) must not be lost.
    if [ -n "${FLA_DS_ASKER:-}" ] || [ -z "${FLA_DS_STEP_PID:-}" ]; then return; fi
    (
        n=0
        while kill -0 "$FLA_DS_STEP_PID" 2>/dev/null; do
            if [ $((n % ${FLA_DS_RESIGNAL_S:-30})) -eq 0 ]; then scancel --signal=USR1 "$SLURM_JOB_ID"; fi
            sleep 1
            n=$((n + 1))
        done
    ) &
    FLA_DS_ASKER=$!
}

fla_ds_run_step() {
    # Runs "$@" (an srun) in the background and waits for it; returns its exit status. The
    # traps are set by the caller, before anything that takes time.
    "$@" &
    FLA_DS_STEP_PID=$!
    if [ -n "${FLA_DS_GOT_USR1:-}${FLA_DS_GOT_TERM:-}" ]; then fla_ds_start_asking; fi  # asked before the step existed
    local rc
    wait "$FLA_DS_STEP_PID"
    rc=$?
    while kill -0 "$FLA_DS_STEP_PID" 2>/dev/null; do  # woken by a trapped signal: keep waiting
        wait "$FLA_DS_STEP_PID"
        rc=$?
    done
    FLA_DS_STEP_PID=
    if [ -n "${FLA_DS_ASKER:-}" ]; then wait "$FLA_DS_ASKER"; fi  # it ends within a second of the step
    FLA_DS_ASKER=
    return "$rc"
}

# ---------------------------------------------------------------- launching

fla_ds_placement() {
    # Sets and exports FLA_DS_NPROC (processes per node), FLA_DS_MASTER_ADDR and _PORT.
    FLA_DS_NPROC=$(fla_ds_gpus_per_node)
    FLA_DS_MASTER_ADDR=$(fla_ds_master_addr)
    FLA_DS_MASTER_PORT=$(fla_ds_master_port)
    export FLA_DS_NPROC FLA_DS_MASTER_ADDR FLA_DS_MASTER_PORT
}

fla_ds_srun_torchrun() {
    # fla_ds_srun_torchrun SCRIPT_OR_-m_MODULE [ARGS...]: one Slurm task per node, each a
    # torchrun that starts the node's FLA_DS_NPROC ranks (fla_ds_placement first). srun needs
    # --ntasks/--ntasks-per-node here (the batch's --ntasks-per-node is not enough when the job
    # asked for more), and --cpus-per-task explicitly (Slurm 22.05 steps no longer inherit it);
    # --kill-on-bad-exit: a node that fails stops the others instead of leaving them waiting in
    # a collective. bash -c so that SLURM_NODEID is read on each node, not in this script; the
    # node launcher ignores SIGUSR1 (a stop request is for the ranks, see below). Only ever run as
    # `fla_ds_run_step fla_ds_srun_torchrun ...`: in that background subshell it execs srun, so
    # the step's PID is srun's own and a signal to the job cannot end the subshell before srun.
    # shellcheck disable=SC2016
    exec srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
        --kill-on-bad-exit=1 bash -c '
            trap "" USR1
            echo "fla_ds: node $SLURM_NODEID of $SLURM_NNODES: $SLURMD_NODENAME ($(hostname)), $FLA_DS_NPROC processes"
            exec "$FLA_DS_PYTHON" -m torch.distributed.run --nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" \
                --nproc_per_node "$FLA_DS_NPROC" --master_addr "$FLA_DS_MASTER_ADDR" --master_port "$FLA_DS_MASTER_PORT" "$@"' \
        fla-ds-node "$@"
}

fla_ds_command() {
    # fla_ds_command SUBCOMMAND [ARGS...]: `fla-ds SUBCOMMAND ARGS` (features extract, evaluate)
    # spread over every GPU of the job, one torchrun per node; returns its exit status. Key=value
    # arguments go after the flags, FLA_DS_OVERRIDES last (as for training).
    if [ -z "${SLURM_JOB_ID:-}" ]; then echo "fla_ds: not in a Slurm job: submit this script with sbatch" >&2; exit 2; fi
    local overrides=()
    # shellcheck disable=SC2206  # word splitting is the documented contract of FLA_DS_OVERRIDES
    if [ -n "${FLA_DS_OVERRIDES:-}" ]; then overrides=($FLA_DS_OVERRIDES); fi
    fla_ds_overrides_last "$@" "${overrides[@]}"
    fla_ds_placement
    echo "fla_ds: fla-ds ${FLA_DS_ARGS[*]:0:2}, $SLURM_NNODES nodes x $FLA_DS_NPROC processes, master $FLA_DS_MASTER_ADDR:$FLA_DS_MASTER_PORT"
    local rc
    fla_ds_run_step fla_ds_srun_torchrun -m fla_ds "${FLA_DS_ARGS[@]}"
    rc=$?
    echo "fla_ds: fla-ds ${FLA_DS_ARGS[*]:0:2} ended with exit code $rc at $(date '+%F %T')"
    return "$rc"
}

# ---------------------------------------------------------------- training

fla_ds_train() {
    # fla_ds_train STAGE [train.py arguments...]: one torchrun per node; requeue when SIGUSR1
    # stopped training before its end.
    local stage=$1 run_dir rc
    shift
    if [ -z "${SLURM_JOB_ID:-}" ]; then echo "fla_ds: not in a Slurm job: submit this script with sbatch" >&2; exit 2; fi
    FLA_DS_GOT_USR1='' FLA_DS_GOT_TERM=''
    trap 'fla_ds_on_signal USR1' USR1
    trap 'fla_ds_on_signal TERM' TERM
    fla_ds_train_args "$@"
    fla_ds_placement
    run_dir=$(fla_ds_check_config $((SLURM_NNODES * FLA_DS_NPROC)) --stage "$stage" "${FLA_DS_ARGS[@]}") || exit 2
    local lines_before
    lines_before=$(fla_ds_log_lines "$run_dir")
    echo "fla_ds: stage $stage, $SLURM_NNODES nodes x $FLA_DS_NPROC processes, master $FLA_DS_MASTER_ADDR:$FLA_DS_MASTER_PORT, run $run_dir"
    fla_ds_run_step fla_ds_srun_torchrun "$FLA_DS_ROOT/fla_ds/train.py" --stage "$stage" "${FLA_DS_ARGS[@]}"
    rc=$?
    echo "fla_ds: training step ended with exit code $rc at $(date '+%F %T')"
    if [ -z "$FLA_DS_GOT_USR1" ] && fla_ds_was_preempted "$run_dir" "$lines_before"; then
        # The training processes were signalled directly (scancel --signal=TERM, preemption):
        # every rank saved at a step boundary and exited 0; torchrun itself dies of SIGTERM
        # (exit 1, its traceback above), which is not a failure of training.
        rc=0
        echo "fla_ds: training stopped at a checkpoint before its end; to continue: scontrol requeue $SLURM_JOB_ID," \
             "or submit the same command again (any number of nodes)"
    fi
    if [ "$rc" -ne 0 ] || [ -z "$FLA_DS_GOT_USR1" ] || [ -n "$FLA_DS_GOT_TERM" ]; then
        return "$rc"
    fi
    if ! fla_ds_was_preempted "$run_dir" "$lines_before"; then
        echo "fla_ds: training had finished before the stop request: not requeued"
        return 0
    fi
    echo "fla_ds: checkpoint saved; requeueing job $SLURM_JOB_ID (it resumes from $run_dir)"
    trap - TERM  # the requeue SIGTERMs this script
    scontrol requeue "$SLURM_JOB_ID" || { echo "fla_ds: requeue refused: submit the same command again to resume"; return 1; }
    return 0
}
