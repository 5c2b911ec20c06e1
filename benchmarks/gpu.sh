#!/usr/bin/env bash
# The GPU figures in one command: the real-size step benchmark per stage with each optimisation toggled
# (benchmarks/bench_gpu_step.py -> benchmarks/results/gpu_<device>.json), then the CUDA-only tests, which
# record the torch version they passed on.
# Without CUDA the benchmark runs a reduced size and says so, and the CUDA tests are skipped.
#   bash benchmarks/gpu.sh [bench_gpu_step.py options, e.g. --stages 2,3]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
"$PY" benchmarks/bench_gpu_step.py "$@"
# The CUDA tests; where every test behind `auto` passed on CUDA, record this torch in
# vlmtrain/models/cuda_validated.json (commit it): `attn_backend: auto` then picks flex and `train.compile: auto`
# compiles on CUDA with this torch (vlmtrain/models/cuda_validation.py).
report="$(mktemp --suffix=.xml)"
status=0
DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}" "$PY" -m pytest -q -rs -m gpu tests --junitxml="$report" || status=$?
if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  "$PY" -m vlmtrain.models.cuda_validation record "$report" || true
fi
exit "$status"
