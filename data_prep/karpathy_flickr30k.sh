#!/usr/bin/env bash
# Flickr30k, Karpathy split: evaluation (test) or fine-tuning (train); 5 references per image.
# Sources: dataset_flickr30k.json in https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip
#          Images: flickr30k-images.zip from https://huggingface.co/datasets/nlphuji/flickr30k (4.4 GB,
#            unpacks to flickr30k-images/). Check the Flickr30k terms of use before downloading.
# Expected: test 1,000 images; val 1,014; train 29,000.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
SPLIT="${SPLIT:-test}"
RAW="$DATA_ROOT/raw/flickr30k"

# 1. Download (needs internet).
fetch https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip "$RAW/caption_datasets.zip"
[[ -f "$RAW/dataset_flickr30k.json" ]] || unzip -o -d "$RAW" "$RAW/caption_datasets.zip" dataset_flickr30k.json
hf download nlphuji/flickr30k flickr30k-images.zip --repo-type dataset --local-dir "$RAW"
[[ -d "$RAW/flickr30k-images" ]] || unzip -q -d "$RAW" "$RAW/flickr30k-images.zip"

# 2. Shards.
"$VLMTRAIN" shard "$RAW/dataset_flickr30k.json" --format karpathy --split "$SPLIT" \
  --images "$RAW/flickr30k-images" --out "$DATA_ROOT/shards/karpathy_flickr30k_$SPLIT" "${SHARD_ARGS[@]}"
