#!/usr/bin/env bash
# Trains tdpo_jax on a multi-node GPU cluster with SLURM: one process per node, each driving all
# of its node's GPUs; process 0 (the first node of the allocation) hosts the jax.distributed
# coordinator.
#
# Usage (from the repository root, on a shared filesystem, after `pip install -e .` and a CUDA
# build of jax, `pip install 'jax[cuda12]==<the pinned version>'`):
#   WORKDIR=/shared/runs/tdpo sbatch launch/gpu_slurm.sh [MAIN_FLAGS...]
#   e.g. WORKDIR=/shared/runs/tdpo sbatch --nodes=2 launch/gpu_slurm.sh --config.num_epochs=10
# Environment:
#   WORKDIR           shared directory for metrics, images and checkpoints (required)
#   CONFIG            config file and presets (default: configs/sd15.py)
#   COORDINATOR_PORT  port of the coordinator on the first node (default: 12345)
#   DRY_RUN=1         print the srun command instead of running it
#
#SBATCH --job-name=tdpo_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=tdpo_jax_%j.log
set -euo pipefail

: "${SLURM_JOB_NODELIST:?run this script with sbatch (or inside salloc)}"
: "${WORKDIR:?set WORKDIR to a directory every node can read and write}"
config="${CONFIG:-configs/sd15.py}"
port="${COORDINATOR_PORT:-12345}"

# The coordinator lives on the first node of the allocation.
head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
num_processes="${SLURM_NNODES:?SLURM_NNODES is unset}"
export COORDINATOR_ADDRESS="${head_node}:${port}"
export TDPO_CONFIG="$config" TDPO_WORKDIR="$WORKDIR" TDPO_NUM_PROCESSES="$num_processes"
# The host feeds the GPUs; keep XLA from grabbing 90% of each GPU up front for the reward models.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"

echo "coordinator ${COORDINATOR_ADDRESS}, ${num_processes} processes, workdir ${WORKDIR}" >&2

# SLURM_PROCID differs per task, so it is expanded inside each task (single quotes).
# shellcheck disable=SC2016
task='exec python -m tdpo_jax.main --distributed \
  --coordinator_address="$COORDINATOR_ADDRESS" --num_processes="$TDPO_NUM_PROCESSES" \
  --process_id="$SLURM_PROCID" --config="$TDPO_CONFIG" --workdir="$TDPO_WORKDIR" "$@"'
command=(srun --nodes="$num_processes" --ntasks="$num_processes" --ntasks-per-node=1
         --kill-on-bad-exit=1 bash -c "$task" tdpo_task "$@")

if [[ "${DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${command[@]}"
  printf '\n'
else
  "${command[@]}"
fi
