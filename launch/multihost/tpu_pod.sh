#!/bin/bash
# Generate with the 119B release on a Cloud TPU pod slice (e.g. v5p-16: 2 hosts x 4 chips).
#
#   launch/multihost/tpu_pod.sh my-tpu us-east5-a /data/small4-bf16 "1,1784,3"
#
# Runs the same command on every worker (--worker=all); jax.distributed auto-detects the
# pod. The checkpoint directory must be readable from every worker (GCS via gcsfuse, or a
# shared filesystem); each process reads only the shards its chips hold. All chips of the
# slice form one `expert` axis here (v5p's ICI connects every chip of a slice).
set -euo pipefail

TPU=${1:?usage: tpu_pod.sh TPU_NAME ZONE CKPT PROMPT_IDS [more generate.py flags]}
ZONE=${2:?zone}
CKPT=${3:?converted checkpoint directory, the same path on every worker}
PROMPT_IDS=${4:?prompt token ids, comma separated}
shift 4
CHIPS=${CHIPS:-8}  # chips in the slice: v5p-16 has 8
REPO=${REPO:-~/smallfour}

gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="
  cd $REPO && python launch/generate.py --ckpt=$CKPT --prompt_ids=$PROMPT_IDS \
    --mesh=data:1,expert:$CHIPS,tensor:1 $*"
