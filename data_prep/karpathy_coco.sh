#!/usr/bin/env bash
# COCO captions, Karpathy split: evaluation (test), or fine-tuning (train). All 5 reference captions per
# image are kept in "references", in source order, for BLEU/METEOR/ROUGE-L/CIDEr.
# Sources: Karpathy's split file dataset_coco.json, in caption_datasets.zip
#            https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip
#          COCO 2014 images: http://images.cocodataset.org/zips/val2014.zip (val and test splits, and the
#            restval part of train), http://images.cocodataset.org/zips/train2014.zip (train only)
# Expected: test 5,000 images; val 5,000; train 113,287 (82,783 train + 30,504 restval).
set -euo pipefail
source "$(dirname "$0")/_common.sh"
SPLIT="${SPLIT:-test}"
RAW="$DATA_ROOT/raw/coco2014"

# 1. Download (needs internet).
fetch https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip "$RAW/caption_datasets.zip"
[[ -f "$RAW/dataset_coco.json" ]] || unzip -o -d "$RAW" "$RAW/caption_datasets.zip" dataset_coco.json
fetch http://images.cocodataset.org/zips/val2014.zip "$RAW/val2014.zip"
[[ -d "$RAW/val2014" ]] || unzip -q -d "$RAW" "$RAW/val2014.zip"
if [[ "$SPLIT" == train ]]; then
  fetch http://images.cocodataset.org/zips/train2014.zip "$RAW/train2014.zip"
  [[ -d "$RAW/train2014" ]] || unzip -q -d "$RAW" "$RAW/train2014.zip"
fi

# 2. Shards: image path = filepath/filename (e.g. val2014/COCO_val2014_000000391895.jpg) under $RAW.
"$VLMTRAIN" shard "$RAW/dataset_coco.json" --format karpathy --split "$SPLIT" --images "$RAW" \
  --out "$DATA_ROOT/shards/karpathy_coco_$SPLIT" "${SHARD_ARGS[@]}"
