#!/usr/bin/env bash
# GPU checks for the L1 <-> L2 transfers, in one call on a machine with a CUDA device:
#   bash benchmarks/gpu_checks.sh
# Runs the CUDA tests (pytest -m cuda tests/transfer), then bench_transfer.py on the GPU.
# Results land in $OUT (default ./out): pytest_cuda.txt, bench_transfer_cuda.json.
# Python: $PYTHON if set, else the first of .venv/bin/python, python3 whose torch sees CUDA
# (a CPU-only .venv would skip every CUDA test). It needs torch with CUDA, anyio, pydantic,
# pydantic-settings, pyyaml, aiofiles, pytest, pytest-asyncio, pytest-timeout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in .venv/bin/python python3 python; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
            PY="$candidate"
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu_checks: no Python with a CUDA-enabled torch found (set PYTHON=...)" >&2
    exit 2
fi
"$PY" -c 'import anyio, pydantic, pydantic_settings, yaml, aiofiles, pytest, pytest_asyncio, pytest_timeout' || {
    echo "gpu_checks: $PY lacks a dependency above (pip install -e '.[test]')" >&2
    exit 2
}
"$PY" -c 'import torch; print("torch", torch.__version__, "on", torch.cuda.get_device_name())' | tee "$OUT/device.txt"

status=0
"$PY" -m pytest -m cuda tests/transfer -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest_cuda.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"$PY" benchmarks/bench_transfer.py --device cuda --json > "$OUT/bench_transfer_cuda.json" || status=1
cat "$OUT/bench_transfer_cuda.json"
exit "$status"
