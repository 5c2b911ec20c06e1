#!/usr/bin/env bash
# The GPU figures in one command: the real-size step benchmark per stage with each optimisation toggled
# (benchmarks/bench_gpu_step.py -> benchmarks/results/gpu_<device>.json), then the CUDA-only tests.
# Without CUDA the benchmark runs a reduced size and says so, and the CUDA tests are skipped.
#   bash benchmarks/gpu.sh [bench_gpu_step.py options, e.g. --stages 2,3]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
"$PY" benchmarks/bench_gpu_step.py "$@"
DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}" "$PY" -m pytest -q -rs -m gpu tests
