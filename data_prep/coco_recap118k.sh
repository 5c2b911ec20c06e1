#!/usr/bin/env bash
# COCO-118k-Recap: stages 0 and 1. COCO train2017 images with AI-generated detailed captions (LLaVA-NeXT).
# Source: https://huggingface.co/datasets/lmms-lab/LLaVA-ReCap-118K  (13 parquet files, about 6 GB, under
#   data/; columns id, image = embedded bytes, conversations = LLaVA turns, data_source)
# Expected: about 118,287 samples (one per COCO train2017 image; the dataset card shows "118k rows").
set -euo pipefail
source "$(dirname "$0")/_common.sh"
RAW="$DATA_ROOT/raw/llava-recap-118k"
WORK="$DATA_ROOT/work/coco_recap118k"

# 1. Download (needs internet; re-running skips files already there).
hf download lmms-lab/LLaVA-ReCap-118K --repo-type dataset --include "data/*.parquet" --local-dir "$RAW"

# 2. Parquet -> LLaVA JSONL + image files (the shard writer reads LLaVA JSON/JSONL with image files).
parquet_to_llava "$WORK/recap118k.jsonl" "$WORK/images" "$RAW"/data/train-*.parquet

# 3. Shards: $DATA_ROOT/shards/coco_recap118k/train-*.tar + manifest.json
"$VLMTRAIN" shard "$WORK/recap118k.jsonl" --format llava --images "$WORK/images" \
  --out "$DATA_ROOT/shards/coco_recap118k" --split train "${SHARD_ARGS[@]}"
