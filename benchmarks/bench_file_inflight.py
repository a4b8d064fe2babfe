"""The ``file`` backend in the peers' harness with two batch calls in flight (issue 20).

``../shared/peers/bench_file_backend.py --backends raw,plugin:peers_file_adapter:make,
plugin:bench_file_inflight:make2`` (PYTHONPATH=.:backends:benchmarks). ``make`` there awaits one
batch call at a time, so every batch pays the round trip to a worker thread and back (~0.2 ms
on a loaded 2-vCPU VM, a fifth of a 32-page batch of 256 KiB pages) with the disk idle; a
cache has several calls in flight (prefetches and write-backs of concurrent requests), which
``make2`` imitates: the same batches, two awaited at once, in order.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from peers_file_adapter import HiCacheAsyncFile


class InFlight(HiCacheAsyncFile):
    """The adapter with ``depth`` batch calls in flight."""

    def __init__(self, ctx: Any, depth: int) -> None:
        super().__init__(ctx)
        self.depth = depth

    async def _each(self, keys: list[str], calls: Any) -> None:
        gate = asyncio.Semaphore(self.depth)

        async def one(lo: int) -> None:
            async with gate:
                await calls(lo)

        await asyncio.gather(*(one(lo) for lo in range(0, len(keys), self.batch)))

    def write(self, keys: list[str], pages: list[torch.Tensor]) -> None:
        async def call(lo: int) -> None:
            flat = [p.reshape(-1).view(torch.uint8) for p in pages[lo : lo + self.batch]]
            if not await self.storage.batch_set(keys[lo : lo + self.batch], flat):
                raise RuntimeError("hicache-async file backend: a page was not stored")

        self.loop.run_until_complete(self._each(keys, call))

    def read(self, keys: list[str], outs: list[torch.Tensor]) -> None:
        async def call(lo: int) -> None:
            flat = [o.reshape(-1).view(torch.uint8) for o in outs[lo : lo + self.batch]]
            got = await self.storage.batch_get(keys[lo : lo + self.batch], flat)
            if any(g is None for g in got):
                raise RuntimeError("hicache-async file backend: a page was missing")

        self.loop.run_until_complete(self._each(keys, call))


def make2(ctx: Any) -> InFlight:
    """Two batch calls in flight."""
    return InFlight(ctx, 2)
