#!/usr/bin/env bash
# Thin launcher: torchrun + python -m avengers.train with the original train_tele.sh flags
# (configs/tele128_llama3_1.8b_fineweb.yaml). Every argument is passed through and overrides the YAML, e.g.
#   bash train_tele.sh --data_path=/data --ckpt_save_path=/runs/x --ckpt_load_path=/runs/x
# Environment: NPROC_PER_NODE (default: visible GPUs, else 1), NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), PYTHON (python).
set -euo pipefail
PYTHON=${PYTHON:-python}
NPROC_PER_NODE=${NPROC_PER_NODE:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
exec "$PYTHON" -m torch.distributed.run \
  --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$NPROC_PER_NODE" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" \
  -m avengers.train --config "$(dirname "$0")/configs/tele128_llama3_1.8b_fineweb.yaml" "$@"
