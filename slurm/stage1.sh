#!/bin/bash
# Stage 1 (visual encoder + Light-T) on a Slurm cluster: one torchrun per node, one rank per GPU.
#
#   sbatch slurm/stage1.sh --config my_stage1.yaml stream.shards=/shared/shards/p14t train.out=/shared/runs/p14t-s1
#   FLA_DS_CONFIG=phoenix14t_stage1 sbatch --partition=gpu slurm/stage1.sh stream.shards=/shared/shards/p14t
#
# Every #SBATCH line below is a default that the same flag on the sbatch command line replaces.
# The default layout is the paper's (global batch 8 on 2 GPUs: fla_ds/configs/*_stage1.yaml,
# micro batch 4); on more GPUs raise train.global_batch (and with SGD train.lr) to match.
# CPUs: 9 per GPU, each rank's own core plus the stage-1 configs' stream.num_workers=8 loader
# workers (the rule in docs/cluster.md, "Workers and CPUs per GPU"): --cpus-per-task = GPUs x 9.
# The log goes to <job name>-<job id>.out in the folder sbatch was called from (always exists:
# Slurm fails a job silently when the --output folder is missing; for logs/ run `mkdir -p logs`
# first and add `-o logs/%x-%j.out`). Relative paths in the arguments are relative to that folder.
# When the time limit is 300 s away (or on `scancel --batch --signal=USR1 JOBID`) the ranks save
# a checkpoint at their next step and the job requeues itself; the requeued job resumes from it.
# See docs/cluster.md.
#SBATCH --job-name=fla-stage1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=2
#SBATCH --cpus-per-task=18
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

# sbatch runs a copy of this file from its spool folder: find the repository through
# FLA_DS_ROOT, the script path Slurm recorded, the submit folder, or this file's folder.
recorded=$(scontrol show job "${SLURM_JOB_ID:-none}" 2>/dev/null | sed -n 's|^ *Command=\(.*\)/slurm/[^/ ]*\.sh.*|\1|p' | head -n 1)
for FLA_DS_ROOT in "${FLA_DS_ROOT:-}" "$recorded" "${SLURM_SUBMIT_DIR:-$PWD}" "$(dirname "$0")/.."; do
    [ -f "$FLA_DS_ROOT/slurm/common.sh" ] && break
done
# shellcheck source=slurm/common.sh
source "$FLA_DS_ROOT/slurm/common.sh" || { echo "slurm/common.sh not found: submit from the repository or set FLA_DS_ROOT" >&2; exit 2; }
fla_ds_setup
fla_ds_header
fla_ds_loader_note
fla_ds_train 1 "$@"
