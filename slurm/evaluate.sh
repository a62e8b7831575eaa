#!/bin/bash
# Score a checkpoint on a split (fla-ds evaluate) on a Slurm cluster: the clips decoded on every
# GPU of the job (one torchrun per node), gathered, scored once, written beside the checkpoint.
#
#   sbatch slurm/evaluate.sh --checkpoint /shared/runs/p14t-s2 --shards /shared/shards/p14t --split test
#   sbatch slurm/evaluate.sh --checkpoint /shared/runs/p14t-s2/step-4200 --shards ... --split dev --beam 1
#
# Arguments are those of `fla-ds evaluate` (see `fla-ds evaluate --help`); a run folder means its
# best checkpoint (the log says which, and by what score). The scores do not depend on the number
# of GPUs: every clip is decoded once, on one rank. hypotheses.tsv and metrics.json go to
# CHECKPOINT/eval-SPLIT (or --out), written atomically. Every #SBATCH line below is a
# default that the same flag on the sbatch command line replaces; the log goes to
# fla-evaluate-<job id>.out in the submit folder. See docs/cluster.md.
#SBATCH --job-name=fla-evaluate
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=2:00:00
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
fla_ds_command evaluate "$@"
