#!/usr/bin/env bash
# GPU checks for the L1 <-> L2 transfers, in one call on a machine with a CUDA device:
#   bash benchmarks/gpu_checks.sh
# Runs the CUDA tests, then bench_transfer.py on the GPU; results land in $OUT (default ./out).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name())'
status=0
"$PY" -m pytest -m cuda tests/transfer -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest_cuda.txt" || status=$?
"$PY" benchmarks/bench_transfer.py --device cuda --json > "$OUT/bench_transfer_cuda.json" || status=$?
"$PY" benchmarks/bench_transfer.py --device cpu --quick --json > "$OUT/bench_transfer_cpu_quick.json" || true
cat "$OUT/bench_transfer_cuda.json"
exit "$status"
