# Settings shared by the data_prep scripts; sourced by them, not run on its own.
#   DATA_ROOT   (required) folder for raw downloads (raw/), intermediate files (work/) and shards (shards/)
#   WORKERS     processes for `vlmtrain shard` (default: all cores)
#   IMAGE_SIZE  shorter image side stored in the shards (default 224, the paper's SigLIP input);
#               set it empty (IMAGE_SIZE=) to keep the original image bytes
#   VLMTRAIN    the vlmtrain command (default: vlmtrain); PYTHON the interpreter for parquet_to_llava.py
: "${DATA_ROOT:?set DATA_ROOT to the folder for raw downloads, intermediate files and shards}"
WORKERS="${WORKERS:-$(nproc)}"
IMAGE_SIZE="${IMAGE_SIZE-224}"
VLMTRAIN="${VLMTRAIN:-vlmtrain}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SHARD_ARGS=(--workers "$WORKERS")
if [[ -n "$IMAGE_SIZE" ]]; then
  SHARD_ARGS+=(--image-size "$IMAGE_SIZE")
fi

# Extract a LLaVA-style parquet release (id, image bytes, conversations) to LLaVA JSONL plus image files,
# unless an earlier run finished (the JSONL is written last, atomically).
parquet_to_llava() {
  local jsonl="$1" images="$2"
  shift 2
  if [[ ! -f "$jsonl" ]]; then
    "${PYTHON:-python}" "$HERE/parquet_to_llava.py" "$jsonl" "$images" "$@"
  fi
}

# Download a URL to a file unless it is already there (wget -c resumes a partial download).
fetch() {
  local url="$1" dest="$2"
  mkdir -p "$(dirname "$dest")"
  if [[ ! -f "$dest.done" ]]; then
    wget -c -O "$dest" "$url"
    touch "$dest.done"
  fi
}
