#!/usr/bin/env bash
# The GPU figures in one command: the trainer itself (`vlmtrain train`, one rank) at real size, each stage's
# preset and each variant toggled once (benchmarks/bench_trainer.py -> benchmarks/results/trainer_<device>.json),
# then the CUDA-only tests (`pytest -m gpu`) whatever the benchmark's outcome. The benchmark stops itself
# within its own time budget (--budget-s, default 360 s, setup included; the CUDA tests after it: ~1-2 min), so the tests always get their turn.
# Where every test behind `auto` passed on CUDA, the tests' report records this torch in
# vlmtrain/models/cuda_validated.json (commit it): `attn_backend: auto` then picks flex and `train.compile: auto`
# compiles on CUDA with this torch (vlmtrain/models/cuda_validation.py).
# Without CUDA the benchmark runs a reduced size and says so, and the CUDA tests are skipped.
#   bash benchmarks/gpu.sh [bench_trainer.py options, e.g. --budget-s 300 --stages 3 --variants attn,compile]
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" benchmarks/bench_trainer.py "$@"
bench=$?
report="$(mktemp --suffix=.xml)"
DS_ACCELERATOR="${DS_ACCELERATOR:-cuda}" "$PY" -m pytest -q -rs -m gpu tests --junitxml="$report"
tests=$?
if "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  "$PY" -m vlmtrain.models.cuda_validation record "$report" || echo "gpu.sh: torch not recorded as CUDA-validated"
fi
echo "gpu.sh: benchmark exit code $bench, CUDA tests exit code $tests"
[ "$bench" -eq 0 ] && [ "$tests" -eq 0 ]
