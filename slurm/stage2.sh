#!/bin/bash
# Stage 2 (frozen stage-1 encoder, projector, language model with QLoRA) on a Slurm cluster:
# one torchrun per node, one rank per GPU.
#
#   sbatch slurm/stage2.sh --config my_stage2.yaml stage2.encoder=/shared/runs/p14t-s1 stage2.model=/shared/models/llama-7b train.out=/shared/runs/p14t-s2
#   FLA_DS_CONFIG=my_stage2.yaml FLA_DS_OVERRIDES="train.lr=2e-4" sbatch --nodes=4 --partition=gpu slurm/stage2.sh
#
# Every #SBATCH line below is a default that the same flag on the sbatch command line replaces.
# The default layout, 2 nodes x 8 GPUs, fits every shipped stage-2 config (fla_ds/configs:
# *_llama7b_qlora global batch 256 = 16 x micro batch 16; *_mbart the paper's batch 16 = 16 x 1).
# The log goes to <job name>-<job id>.out in the folder sbatch was called from (always exists:
# Slurm fails a job silently when the --output folder is missing; for logs/ run `mkdir -p logs`
# first and add `-o logs/%x-%j.out`). Relative paths in the arguments are relative to that folder.
# When the time limit is 300 s away (or on `scancel --batch --signal=USR1 JOBID`) the ranks save
# a checkpoint at their next step and the job requeues itself; the requeued job resumes from it.
# See docs/cluster.md.
#SBATCH --job-name=fla-stage2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
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
fla_ds_train 2 "$@"
