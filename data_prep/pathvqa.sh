#!/usr/bin/env bash
# PathVQA: pathology visual question answering (the paper's domain-adaptation experiment).
# Source: https://huggingface.co/datasets/flaviagiammarino/path-vqa  (parquet under data/ named
#   {train,validation,test}-*.parquet; columns image = embedded bytes, question, answer)
# Expected rows: train 19,654; validation 6,259; test 6,719 (the dataset viewer shows 19.7k / 6.26k /
#   6.72k). Answers "yes"/"no" are tagged answer_type "yes/no", all others "open".
set -euo pipefail
source "$(dirname "$0")/_common.sh"
SPLIT="${SPLIT:-test}"   # train, validation or test (the Hugging Face split names)
RAW="$DATA_ROOT/raw/path-vqa"

# 1. Download (needs internet; re-running skips files already there).
hf download flaviagiammarino/path-vqa --repo-type dataset --include "data/*.parquet" --local-dir "$RAW"

# 2. Shards straight from the parquet files (images are embedded, so no --images).
"$VLMTRAIN" shard "$RAW/data" --format pathvqa --split "$SPLIT" \
  --out "$DATA_ROOT/shards/pathvqa_$SPLIT" "${SHARD_ARGS[@]}"
