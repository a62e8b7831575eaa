#!/bin/bash
# Build a large corpus into shards as a Slurm job array, then index it in a dependent job.
#
# Run it with bash (not sbatch) from a login node, with the arguments of `fla-ds shards build`:
#
#   FLA_DS_SHARDS_PER_TASK=32 bash slurm/shards.sh --corpus how2sign --root /data/how2sign \
#       --split train --out /shared/shards/how2sign corpus.how2sign_raw_videos=train_raw_videos
#
# It plans the build (reads the annotations only, refuses a folder holding another build),
# then submits two jobs, both this script:
#   1. an array of ceil(shards / FLA_DS_SHARDS_PER_TASK) tasks; task i builds shards
#      [i*K, (i+1)*K) with shards.first_shard/shards.num_shards;
#   2. the index job (--dependency=afterok on the whole array): the same build without a
#      range, which finds every shard complete, builds any that is not, and writes index.json,
#      rejects.jsonl and config.<split>.yaml.
# The result is byte-identical to a one-machine build. When a task fails, Slurm cancels the
# index job (--kill-on-invalid-dep); rerun the same command: complete shards are skipped.
#
# Environment: FLA_DS_SHARDS_PER_TASK (default 16), FLA_DS_SBATCH_ARGS (extra sbatch flags for
# both jobs, e.g. "--partition=cpu --account=me"), FLA_DS_PYTHON (see slurm/common.sh).
# Each task encodes with --workers = its --cpus-per-task unless --workers is given.
# The same two steps by hand: sbatch --array=0-N slurm/shards.sh ARGS; then
# sbatch --dependency=afterok:ARRAY_ID slurm/shards.sh ARGS (a job outside an array indexes).
#SBATCH --job-name=fla-shards
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out

# sbatch runs a copy of this file from its spool folder: find the repository through
# FLA_DS_ROOT, the script path Slurm recorded, the submit folder, or this file's folder.
recorded=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's|^ *Command=\(.*\)/slurm/[^/ ]*\.sh.*|\1|p' | head -n 1)
for FLA_DS_ROOT in "${FLA_DS_ROOT:-}" "$recorded" "${SLURM_SUBMIT_DIR:-$PWD}" "$(dirname "$0")/.."; do
    [ -f "$FLA_DS_ROOT/slurm/common.sh" ] && break
done
# shellcheck source=slurm/common.sh
source "$FLA_DS_ROOT/slurm/common.sh" || { echo "slurm/common.sh not found: submit from the repository or set FLA_DS_ROOT" >&2; exit 2; }
fla_ds_setup

build() {
    fla_ds_overrides_last --workers "${SLURM_CPUS_PER_TASK:-1}" "$@"  # a --workers given in "$@" wins
    "$FLA_DS_PYTHON" -m fla_ds shards build --quiet "${FLA_DS_ARGS[@]}"
}

if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then  # one range of the array
    fla_ds_header
    per_task=${FLA_DS_SHARDS_PER_TASK:-16}
    build "$@" shards.first_shard=$((SLURM_ARRAY_TASK_ID * per_task)) shards.num_shards="$per_task"
elif [ -n "${SLURM_JOB_ID:-}" ]; then  # the final job: whatever is missing, then the index
    fla_ds_header
    build "$@"
else  # on a login node: plan, then submit the array and the index job
    per_task=${FLA_DS_SHARDS_PER_TASK:-16}
    # A range past the end builds nothing: this only plans, checks the folder and counts shards.
    plan=$(build "$@" shards.first_shard=2000000000 shards.num_shards=1) || exit $?
    echo "$plan" | head -n 1
    total=$(echo "$plan" | sed -n '1s/.* of \([0-9][0-9]*\)$/\1/p')
    if [ -z "$total" ] || [ "$total" -eq 0 ]; then echo "fla_ds: nothing to build" >&2; exit 1; fi
    tasks=$(((total + per_task - 1) / per_task))
    # shellcheck disable=SC2086  # FLA_DS_SBATCH_ARGS is a list of flags
    array=$(sbatch --parsable ${FLA_DS_SBATCH_ARGS:-} --array=0-$((tasks - 1)) "$0" "$@") || exit 1
    array=${array%%;*}
    # shellcheck disable=SC2086
    index=$(sbatch --parsable ${FLA_DS_SBATCH_ARGS:-} --job-name=fla-shards-index --output=%x-%j.out \
        --dependency=afterok:"$array" --kill-on-invalid-dep=yes "$0" "$@") || exit 1
    echo "submitted array job ${array} ($tasks tasks x $per_task shards of $total) and index job ${index%%;*} (after the array succeeds)"
fi
