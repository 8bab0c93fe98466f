#!/usr/bin/env bash
# make demo: prepare the bundled sample corpus, train llama3_tiny (all GPUs if any, else 1 CPU
# process), stop half-way with a checkpoint, resume from it, and generate a sample.
# Environment: PYTHON (default .venv/bin/python or python), RUN (runs/demo), STEPS (200).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
RUN=${RUN:-runs/demo}
STEPS=${STEPS:-200}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false

echo "== 1/4 prepare the bundled sample corpus -> data/prepared/sample"
"$PYTHON" -m avengers.data.prepare --source local --input data/sample/fineweb-edu-sample.parquet \
  --tokenizer data/sample/tokenizer --output data/prepared/sample --dataset fineweb-edu-sample

GPUS=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
if [ "$GPUS" -gt 0 ]; then
  TRAIN=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$GPUS" -m avengers.train)
else
  TRAIN=("$PYTHON" -m avengers.train)
fi
rm -rf "$RUN"
FLAGS=(--config configs/demo.yaml --ckpt_save_path="$RUN" --num_steps="$STEPS")

echo "== 2/4 train llama3_tiny, stopping at step $((STEPS / 2)) with a checkpoint ($([ "$GPUS" -gt 0 ] && echo "$GPUS GPU(s)" || echo CPU))"
"${TRAIN[@]}" "${FLAGS[@]}" --stop_at_step=$((STEPS / 2))

echo "== 3/4 the same command again: it resumes from the newest checkpoint in $RUN"
"${TRAIN[@]}" "${FLAGS[@]}"

echo "== 4/4 generate from the trained checkpoint"
"$PYTHON" -m avengers.generate --ckpt "$RUN" --prompt "The history of" --max_new_tokens 40

"$PYTHON" - "$RUN" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
print(f"loss: {rows[0]['loss']:.3f} at step {rows[0]['step']} -> {rows[-1]['loss']:.3f} at step {rows[-1]['step']}"
      f"  (metrics: {sys.argv[1]}/metrics.jsonl, checkpoints: {sys.argv[1]}/checkpoints)")
PY
