#!/usr/bin/env bash
# Flickr8k, Karpathy split: evaluation (test) or fine-tuning (train); 5 references per image.
# Sources: dataset_flickr8k.json in https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip
#          Images: the Flickr8k distribution is by request (University of Illinois); a widely used mirror is
#            https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip
#            (unpacks to Flicker8k_Dataset/). Check the Flickr8k terms of use before downloading.
# Expected: test 1,000 images; val 1,000; train 6,000.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
SPLIT="${SPLIT:-test}"
RAW="$DATA_ROOT/raw/flickr8k"

# 1. Download (needs internet).
fetch https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip "$RAW/caption_datasets.zip"
[[ -f "$RAW/dataset_flickr8k.json" ]] || unzip -o -d "$RAW" "$RAW/caption_datasets.zip" dataset_flickr8k.json
fetch https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/Flickr8k_Dataset.zip "$RAW/Flickr8k_Dataset.zip"
[[ -d "$RAW/Flicker8k_Dataset" ]] || unzip -q -d "$RAW" "$RAW/Flickr8k_Dataset.zip"

# 2. Shards: Flickr entries have no filepath, so the image path is the bare file name.
"$VLMTRAIN" shard "$RAW/dataset_flickr8k.json" --format karpathy --split "$SPLIT" \
  --images "$RAW/Flicker8k_Dataset" --out "$DATA_ROOT/shards/karpathy_flickr8k_$SPLIT" "${SHARD_ARGS[@]}"
