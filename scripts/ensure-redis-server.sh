#!/usr/bin/env bash
# The storage tests start real redis-server processes: find redis-server, or install it.
set -euo pipefail
if command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
fi
if command -v apt-get >/dev/null 2>&1; then
    echo "redis-server not found: installing it with apt-get" >&2
    if $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq redis-server >/dev/null; then
        # The package's own service is not needed: the tests start their own servers.
        command -v redis-server >/dev/null 2>&1 && exit 0
    fi
fi
echo "ERROR: redis-server (and redis-cli) are needed by the storage tests and could not be" >&2
echo "installed here. Install them (Debian/Ubuntu: apt-get install redis-server) and retry." >&2
exit 1
