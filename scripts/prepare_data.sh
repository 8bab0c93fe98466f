#!/usr/bin/env bash
# Token shards for training (fms-fsdp layout). Thin wrapper over `python -m avengers.data.prepare`;
# extra flags pass straight through (e.g. --tokenizer, --workers, --max_docs, --docs_per_shard).
#
#   scripts/prepare_data.sh sample [OUT]            bundled corpus -> OUT (default data/prepared/sample):
#                                                   datasets fineweb-edu-sample and dolma-sample
#   scripts/prepare_data.sh fineweb-edu OUT [flags] HF streaming, --config sample-10BT by default
#   scripts/prepare_data.sh dolma OUT [flags]       Dolma v1_7: one dataset folder per subset
#                                                   (OUT/dolma/<subset>), so the 19-way mix weights apply
#   scripts/prepare_data.sh local OUT --input FILES --dataset NAME [flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
WHAT=${1:?usage: scripts/prepare_data.sh sample|fineweb-edu|dolma|local OUT [flags]}
shift
PREP=("$PYTHON" -m avengers.data.prepare)
case "$WHAT" in
  sample)
    OUT=${1:-data/prepared/sample}
    [ $# -gt 0 ] && shift
    "${PREP[@]}" --source local --input data/sample/fineweb-edu-sample.parquet --tokenizer data/sample/tokenizer \
      --output "$OUT" --dataset fineweb-edu-sample "$@"
    "${PREP[@]}" --source local --input data/sample/dolma-sample.json.gz --tokenizer data/sample/tokenizer \
      --output "$OUT" --dataset dolma-sample "$@"
    ;;
  fineweb-edu)
    OUT=${1:?output folder}; shift
    "${PREP[@]}" --source fineweb-edu --output "$OUT" --dataset fineweb-edu "$@"
    ;;
  dolma)
    OUT=${1:?output folder}; shift
    SUBSETS=${DOLMA_SUBSETS:-cc_en_head,cc_en_middle,cc_en_tail,falcon,starcoder,c4,reddit,pes2o,arxiv,wiki,stackexchange,tulu_flan,cc_news_head,cc_news_middle,cc_news_tail,open-web-math,algebraic,books,megawika}
    for s in ${SUBSETS//,/ }; do
      "${PREP[@]}" --source dolma --dolma_sources "$s" --output "$OUT" --dataset "dolma/$s" "$@"
    done
    ;;
  local)
    OUT=${1:?output folder}; shift
    "${PREP[@]}" --source local --output "$OUT" "$@"
    ;;
  *)
    echo "unknown source '$WHAT': expected sample, fineweb-edu, dolma or local" >&2
    exit 2
    ;;
esac
