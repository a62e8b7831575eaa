#!/bin/bash
# The stage-2 feature cache (fla-ds features extract) on a Slurm cluster: the frozen stage-1
# encoder over the video shards, spread over every GPU of the job (one torchrun per node).
#
#   sbatch slurm/features.sh --checkpoint /shared/runs/p14t-s1 --shards /shared/shards/p14t --out /shared/features/p14t
#   sbatch --nodes=2 slurm/features.sh --checkpoint ... --shards ... --out ... --split train dev --views 3
#
# Arguments are those of `fla-ds features extract` (see `fla-ds features extract --help`). The
# cache does not depend on the number of nodes or GPUs used to make it: its index records the
# encoder, the shards and the input settings, and stage 2 checks them. A failed or cancelled job
# leaves no index for the split: submit the same command again. Every #SBATCH line below is a
# default that the same flag on the sbatch command line replaces; the log goes to
# fla-features-<job id>.out in the submit folder. See docs/cluster.md.
#SBATCH --job-name=fla-features
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=4:00:00
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
fla_ds_command features extract "$@"
