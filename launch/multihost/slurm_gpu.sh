#!/bin/bash
# Generate with the 119B release on a GPU cluster: one process per host, 8 GPUs each.
#
#   sbatch --nodes=2 launch/multihost/slurm_gpu.sh /data/small4-bf16 "1,1784,3"
#
# jax.distributed auto-detects SLURM (coordinator, process count and index come from the
# SLURM_* variables), so every task runs the same command. The mesh puts `data` across
# hosts and `expert` within a host (NVLink), so the per-layer all-gather/reduce-scatter
# of the expert-parallel MoE never crosses the slower inter-host network.
#SBATCH --job-name=smallfour-generate
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=01:00:00
set -euo pipefail

CKPT=${1:?usage: sbatch --nodes=N slurm_gpu.sh CKPT PROMPT_IDS [more generate.py flags]}
PROMPT_IDS=${2:?prompt token ids, comma separated}
shift 2
NODES=${SLURM_JOB_NUM_NODES:-1}

cd "${SLURM_SUBMIT_DIR:-.}"
srun --ntasks-per-node=1 python launch/generate.py \
  --ckpt="$CKPT" \
  --prompt_ids="$PROMPT_IDS" \
  --mesh="data:${NODES},expert:8,tensor:1" \
  "$@"
