"""A real Mooncake Store on loopback for tests: a ``mooncake_master`` and one store node
(``mooncake_client``, lending its memory to the store) on free ports, in a temporary directory.

Pages put by a client live in the store node's memory, so they outlive the client's process
(two servers in turn see each other's pages, as behind a real deployment). Needs Mooncake's
store client (``pip install mooncake-transfer-engine-non-cuda``) and ``libibverbs1``.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from hicache_async.testing.redis_server import free_port

__all__ = ["MooncakeStore", "mooncake_missing"]


def mooncake_missing() -> str | None:
    """Why Mooncake cannot run here, or ``None`` when it can."""
    try:
        import mooncake.store  # noqa: F401
    except ImportError as exc:
        return f"Mooncake's store client is not installed ({exc}); see docs/backends.md"
    return None


def _binary(name: str) -> str:
    spec = importlib.util.find_spec("mooncake")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the mooncake package is not installed")
    path = os.path.join(next(iter(spec.submodule_search_locations)), name)
    if not os.access(path, os.X_OK):
        raise RuntimeError(f"{name} is missing from the mooncake package: {path}")
    return path


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class MooncakeStore:
    """A master and a store node lending ``segment_bytes``; everything on 127.0.0.1."""

    def __init__(self, workdir: Path, segment_bytes: int = 256 << 20) -> None:
        self.workdir = workdir
        self.segment_bytes = segment_bytes
        self.rpc_port = free_port()
        self._procs: list[subprocess.Popen[bytes]] = []

    @property
    def master_address(self) -> str:
        """``host:port`` of the master's RPC service."""
        return f"127.0.0.1:{self.rpc_port}"

    def options(self, **extra: Any) -> dict[str, Any]:
        """The backend options (``storage_backend_extra_config``) of a client of this store."""
        return {"master_server_address": self.master_address, **extra}

    def start(self, timeout: float = 30.0) -> None:
        """Start the master, then the store node, and wait until the node serves."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        master = [
            _binary("mooncake_master"),
            f"--rpc_port={self.rpc_port}",
            "--rpc_address=127.0.0.1",
            f"--metrics_port={free_port()}",
            "--metrics_host=127.0.0.1",
        ]
        self._spawn(master, "master.log")
        deadline = time.monotonic() + timeout
        self._wait(lambda: _listening(self.rpc_port), "master.log", deadline)
        node = [
            _binary("mooncake_client"),
            "--host=127.0.0.1",
            f"--port={free_port()}",
            f"--global_segment_size={self.segment_bytes}",
            f"--master_server_address={self.master_address}",
            "--metadata_server=P2PHANDSHAKE",
            "--protocol=tcp",
        ]
        self._spawn(node, "node.log")
        log = self.workdir / "node.log"
        serving = b"Starting real client service"
        self._wait(lambda: serving in log.read_bytes(), "node.log", deadline)

    def _spawn(self, args: list[str], log: str) -> None:
        with open(self.workdir / log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir)
        self._procs.append(proc)

    def _wait(self, ready: Any, log: str, deadline: float) -> None:
        while not ready():
            dead = any(p.poll() is not None for p in self._procs)
            if dead or time.monotonic() > deadline:
                text = (self.workdir / log).read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"the Mooncake store did not start ({log}):\n{text}")
            time.sleep(0.02)

    def kill_node(self) -> None:
        """SIGKILL the store node (its pages are lost; the master stays up)."""
        if len(self._procs) > 1:
            self._procs[1].kill()
            self._procs[1].wait()

    def stop(self) -> None:
        """Stop the node and the master (SIGTERM, then SIGKILL after 5 s)."""
        for proc in reversed(self._procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
