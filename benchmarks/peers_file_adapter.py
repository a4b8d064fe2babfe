"""Adapter that plugs hicache-async's file backend into the peers' file benchmark
(``../shared/peers/bench_file_backend.py --backends raw,plugin:peers_file_adapter:make``).

The harness hands whole-page tensors; they go through the backend's tensor API
(``batch_set`` / ``batch_get`` into the given tensors, no copies), in batches of ``ctx.batch``
pages, on one event loop kept for the adapter's life.
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from hicache_async.storage import HiCacheStorageConfig
from hicache_file import FileOptions, FileStorage


class HiCacheAsyncFile:
    def __init__(self, ctx: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.batch = max(1, int(getattr(ctx, "batch", 0) or 64))
        # Built directly, not through create_storage: the peers' venv imports the project from
        # PYTHONPATH, without its installed entry points.
        config = HiCacheStorageConfig(model_name="peers")
        self.storage = FileStorage(config, FileOptions(path=ctx.dir))

    def write(self, keys: list[str], pages: list[torch.Tensor]) -> None:
        async def go() -> None:
            for lo in range(0, len(keys), self.batch):
                flat = [p.reshape(-1).view(torch.uint8) for p in pages[lo : lo + self.batch]]
                if not await self.storage.batch_set(keys[lo : lo + self.batch], flat):
                    raise RuntimeError("hicache-async file backend: a page was not stored")

        self.loop.run_until_complete(go())

    def flush(self) -> None:
        pass

    def read(self, keys: list[str], outs: list[torch.Tensor]) -> None:
        async def go() -> None:
            for lo in range(0, len(keys), self.batch):
                flat = [o.reshape(-1).view(torch.uint8) for o in outs[lo : lo + self.batch]]
                got = await self.storage.batch_get(keys[lo : lo + self.batch], flat)
                if any(g is None for g in got):
                    raise RuntimeError("hicache-async file backend: a page was missing")

        self.loop.run_until_complete(go())

    def close(self) -> None:
        self.loop.run_until_complete(self.storage.aclose())
        self.loop.close()


def make(ctx: Any) -> HiCacheAsyncFile:
    """The harness's factory."""
    return HiCacheAsyncFile(ctx)
