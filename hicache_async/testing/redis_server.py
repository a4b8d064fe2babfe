"""Real ``redis-server`` processes for tests: one node, or a 3-node cluster, on free loopback
ports in a temporary directory. Used by the project's tests; third-party backends may reuse it.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["RedisClusterProcesses", "RedisProcess", "free_port", "require_redis_server"]

_INSTALL_HINT = (
    "redis-server is not installed; `make test` installs it (scripts/ensure-redis-server.sh), "
    "or run: apt-get install -y redis-server"
)


def require_redis_server() -> str:
    """The path of ``redis-server``; a ``RuntimeError`` with the fix when it is missing."""
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(_INSTALL_HINT)
    return path


def free_port(*, with_bus: bool = False) -> int:
    """A loopback port free right now (and port + 10000 too, for a cluster bus)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not with_bus:
            return port
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free loopback port")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisProcess:
    """One ``redis-server`` on ``127.0.0.1:port`` with its files in ``workdir``."""

    def __init__(self, workdir: Path, port: int | None = None, *, cluster: bool = False) -> None:
        self.binary = require_redis_server()
        self.workdir = workdir
        self.cluster = cluster
        self.port = port if port is not None else free_port(with_bus=cluster)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.workdir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not _ping(self.port):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{log}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the server (a crash), and reap it."""
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc = None

    def flushall(self) -> None:
        """Empty every database (on this node)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"FLUSHALL\r\n")
            if not s.recv(16).startswith(b"+OK"):
                raise RuntimeError("FLUSHALL failed")


class RedisClusterProcesses:
    """Three master nodes (no replicas) joined with ``redis-cli --cluster create``."""

    def __init__(self, workdir: Path, nodes: int = 3) -> None:
        self.nodes = [RedisProcess(workdir / f"node{i}", cluster=True) for i in range(nodes)]

    @property
    def addresses(self) -> list[str]:
        """``host:port`` of every node."""
        return [f"127.0.0.1:{n.port}" for n in self.nodes]

    def start(self, timeout: float = 20.0) -> None:
        """Start the nodes, create the cluster, wait for ``cluster_state:ok`` on every node."""
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError(_INSTALL_HINT + " (redis-cli is needed for the cluster)")
        for node in self.nodes:
            node.start()
        subprocess.run(
            [cli, "--cluster", "create", *self.addresses, "--cluster-replicas", "0",
             "--cluster-yes"],
            check=True, capture_output=True, timeout=timeout,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while True:
                info = subprocess.run(
                    [cli, "-p", str(node.port), "cluster", "info"],
                    capture_output=True, text=True, timeout=5,
                ).stdout  # fmt: skip
                if "cluster_state:ok" in info:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the redis cluster did not become ready: {info}")
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def flushall(self) -> None:
        """Empty every node."""
        for node in self.nodes:
            node.flushall()
