#!/usr/bin/env bash
# LLaVA-NeXT-790k: stage 3 instruction tuning (multi-turn chat, VQA, OCR, text-only ShareGPT turns).
# Source: https://huggingface.co/datasets/lmms-lab/LLaVA-NeXT-Data  (parquet under data/, about 92 GB;
#   columns id, conversations = LLaVA turns, data_source, image = embedded bytes or null for text-only)
#   The repo also has llava_next_raw_format/ (a LLaVA JSON plus image archives): after unpacking it you can
#   skip step 2 and run step 3 on that JSON with --images pointing at the unpacked image folder.
# Expected: 779,289 records (num_examples in the dataset card; released as "790k"). Text-only records are
#   kept (no image member); records whose turns do not alternate human/gpt are skipped and counted.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
RAW="$DATA_ROOT/raw/llava-next-data"
WORK="$DATA_ROOT/work/llava_next_790k"

# 1. Download (needs internet; re-running skips files already there).
hf download lmms-lab/LLaVA-NeXT-Data --repo-type dataset --include "data/*.parquet" --local-dir "$RAW"

# 2. Parquet -> LLaVA JSONL + image files (text-only rows get no "image" key).
parquet_to_llava "$WORK/llava_next.jsonl" "$WORK/images" "$RAW"/data/train-*.parquet

# 3. Shards: $DATA_ROOT/shards/llava_next_790k/train-*.tar + manifest.json
"$VLMTRAIN" shard "$WORK/llava_next.jsonl" --format llava --images "$WORK/images" \
  --out "$DATA_ROOT/shards/llava_next_790k" --split train "${SHARD_ARGS[@]}"
