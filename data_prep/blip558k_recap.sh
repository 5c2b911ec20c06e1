#!/usr/bin/env bash
# BLIP558k-Recap: stage 2. The LLaVA-1.5 pretraining images (LAION/CC/SBU, 558k) re-captioned in detail.
# Source: https://huggingface.co/datasets/lmms-lab/LLaVA-ReCap-558K  (parquet under data/, about 13 GB;
#   columns id, image = embedded bytes, conversations = LLaVA turns, data_source)
# Expected: 558,128 samples (num_examples in the dataset card).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
RAW="$DATA_ROOT/raw/llava-recap-558k"
WORK="$DATA_ROOT/work/blip558k_recap"

# 1. Download (needs internet; re-running skips files already there).
hf download lmms-lab/LLaVA-ReCap-558K --repo-type dataset --include "data/*.parquet" --local-dir "$RAW"

# 2. Parquet -> LLaVA JSONL + image files.
parquet_to_llava "$WORK/recap558k.jsonl" "$WORK/images" "$RAW"/data/train-*.parquet

# 3. Shards: $DATA_ROOT/shards/blip558k_recap/train-*.tar + manifest.json
"$VLMTRAIN" shard "$WORK/recap558k.jsonl" --format llava --images "$WORK/images" \
  --out "$DATA_ROOT/shards/blip558k_recap" --split train "${SHARD_ARGS[@]}"
