"""The soak's surroundings: where its L3 lives (a temporary directory, a memory store, a
redis-server of its own) and the process's resources (RSS, threads) it keeps bounded."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from hicache_async.testing.soak import SoakOptions

__all__ = ["Resources", "l3_place"]

_STORES = itertools.count()  # memory L3: one named store per run


@contextmanager
def l3_place(options: SoakOptions) -> Iterator[dict[str, Any]]:
    """The backend options of the run's L3 (a temporary directory or redis-server if needed)."""
    if options.l3 == "memory":
        # A store of this run's own (named stores live as long as the process: kept small).
        store = f"soak-{os.getpid()}-{next(_STORES)}"
        yield {"store": store, "capacity_bytes": 8 << 20}
        return
    if options.l3 == "redis":
        if options.redis_url is not None:
            yield {"url": options.redis_url}
            return
        from hicache_async.testing.redis_server import RedisProcess

        with tempfile.TemporaryDirectory(prefix="hicache-soak-redis-") as workdir:
            server = RedisProcess(Path(workdir))
            server.start()
            try:
                yield {"port": server.port}
            finally:
                server.stop()
        return
    if options.l3_path is not None:
        yield {"path": str(options.l3_path), "capacity_bytes": 64 << 20}
        return
    workdir = tempfile.mkdtemp(prefix="hicache-soak-")
    try:
        yield {"path": workdir, "capacity_bytes": 64 << 20}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _rss_mb() -> float:
    """This process's resident memory now (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_WORKER_IDLE_S = 11.0  # anyio expires worker threads idle for 10 s
_SETTLED_THREADS = 16  # threads a settled run may keep (a backend's own, a stuck one)


@dataclass
class Resources:
    rss_mb_start: float = field(default_factory=_rss_mb)
    threads_start: int = field(default_factory=threading.active_count)
    rss_mb_max: float = 0.0
    threads_max: int = 0
    threads_settled: int | None = None  # after idle workers expired (long runs only)

    def sample(self) -> None:
        self.rss_mb_max = max(self.rss_mb_max, _rss_mb())
        self.threads_max = max(self.threads_max, threading.active_count())

    async def settle(self) -> None:
        """Let anyio's idle worker threads expire (it drops those idle for 10 s when a call
        takes a worker), then count the threads: what is still there is alive, not a pool."""
        await anyio.sleep(_WORKER_IDLE_S)
        await anyio.to_thread.run_sync(lambda: None)
        self.threads_settled = threading.active_count()

    def as_dict(self) -> dict[str, Any]:
        self.sample()
        end_rss, end_threads = _rss_mb(), threading.active_count()
        # Bounds: blocking calls run on anyio's worker threads, one per call in flight (each
        # backend and engine caps its own), idle ones leaving after 10 s: tens, up to ~100
        # seen in a 90 s run; the pools and the L3 index of a run are a few MB. A leak of
        # either grows with the run instead.
        # A long run's peak reflects how many calls ran at once (220 in a 10-minute run, all
        # idle workers by the end): there the settled count is the bound.
        if self.threads_settled is None:
            threads_ok = self.threads_max <= self.threads_start + 160
        else:
            threads_ok = self.threads_settled <= self.threads_start + _SETTLED_THREADS
        bounded = threads_ok and end_rss - self.rss_mb_start <= 512
        return {
            "rss_mb_start": round(self.rss_mb_start, 1),
            "rss_mb_max": round(self.rss_mb_max, 1),
            "rss_mb_end": round(end_rss, 1),
            "threads_start": self.threads_start,
            "threads_max": self.threads_max,
            "threads_end": end_threads,
            "threads_settled": self.threads_settled,
            "bounded": bounded,
        }
