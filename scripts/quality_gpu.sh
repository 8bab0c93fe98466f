#!/usr/bin/env bash
# The quality runs that need a GPU (docs/quality.md), one stage per device call of <= 10 minutes:
#   bash scripts/quality_gpu.sh recall       # MQAR sweep, T=256, every family (~14 min of training on one H100: run it twice)
#   bash scripts/quality_gpu.sh recall_long  # the same families at T=1024
#   bash scripts/quality_gpu.sh compare      # ~100M llama / mamba2 / hybrid / telescoping on the sample
#                                            # corpus with eval loss, then curves, loss by position, passkey
# Every stage resumes: the recall sweep skips the runs already in its results.jsonl and the trainer
# continues from a run's newest checkpoint, so a stage cut short is finished by running it again.
# Environment: PYTHON (default python3), OUT (default runs/quality); for compare, VARIANTS (space-separated
# registry names), TRAIN_FLAGS (extra avengers.train flags) and PASSKEY_LENGTHS, e.g. a CPU dry run:
#   PYTHON=.venv/bin/python VARIANTS="llama3_tiny mamba2_tiny" PASSKEY_LENGTHS=128,512 OUT=/tmp/q \
#   TRAIN_FLAGS="--num_steps=4 --warmup_steps=1 --eval_interval=2 --device=cpu" bash scripts/quality_gpu.sh compare
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-runs/quality}
export TOKENIZERS_PARALLELISM=false
stage=${1:?usage: bash scripts/quality_gpu.sh recall|recall_long|compare}

case "$stage" in
  recall) "$PYTHON" -m avengers.recall --preset gpu --out "$OUT/recall_gpu" --time_budget_s 500 ;;
  recall_long) "$PYTHON" -m avengers.recall --preset gpu_long --out "$OUT/recall_gpu_long" --time_budget_s 500 ;;
  compare)
    [ -d data/prepared/sample/dolma-sample ] || PYTHON="$PYTHON" bash scripts/prepare_data.sh sample data/prepared/sample --quiet
    read -r -a VARIANTS <<< "${VARIANTS:-llama3_100m_v4k mamba2_100m_v4k hybrid_100m_v4k tele64_100m_v4k}"
    read -r -a FLAGS <<< "${TRAIN_FLAGS:-}"
    RUNS=()
    for v in "${VARIANTS[@]}"; do
      "$PYTHON" -m avengers.train --config configs/quality_100m_sample.yaml --model_variant="$v" \
        --ckpt_save_path="$OUT/$v" "${FLAGS[@]}"
      RUNS+=("$OUT/$v")
    done
    CSV=$(IFS=,; echo "${RUNS[*]}")
    "$PYTHON" -m avengers.quality.curves --runs "$CSV" --out "$OUT/curves"
    "$PYTHON" -m avengers.quality.position_loss --ckpt "$CSV" --seq_length 512 --num_docs 32 --out "$OUT/position"
    "$PYTHON" -m avengers.quality.passkey --ckpt "$CSV" --lengths "${PASSKEY_LENGTHS:-128,256,512,1024,2048}" \
      --trials 16 --out "$OUT/passkey"
    ;;
  *) echo "unknown stage $stage: expected recall, recall_long or compare" >&2; exit 2 ;;
esac
