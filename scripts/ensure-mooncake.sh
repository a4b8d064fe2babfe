#!/usr/bin/env bash
# The Mooncake Store tests need Mooncake's store client in the venv and libibverbs1 (its TCP
# transport links against it). Install both when missing; if that fails, those tests skip.
set -uo pipefail
PY="${1:-.venv/bin/python}"
SUDO=""
if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
if ! ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1'; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "libibverbs1 not found: installing it with apt-get" >&2
        $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq libibverbs1 >/dev/null
    fi
fi
if ! "$PY" -c 'import mooncake.store' >/dev/null 2>&1; then
    # The CUDA-free build: the tests run on CPU machines (GPU users install mooncake-transfer-engine).
    "$PY" -m pip install -q mooncake-transfer-engine-non-cuda >/dev/null 2>&1
fi
if "$PY" -c 'import mooncake.store' >/dev/null 2>&1; then
    exit 0
fi
echo "WARNING: Mooncake's store client could not be installed here: the mooncake backend's" >&2
echo "tests will be skipped (pip install mooncake-transfer-engine-non-cuda; apt-get install" >&2
echo "libibverbs1)." >&2
exit 0
