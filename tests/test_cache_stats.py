"""``cache.stats()`` adds up the runtime's own L3 faults and the backend's."""

from __future__ import annotations

import logging

import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing.faults import SlowStorage

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=4, dtype="float16", page_size=4)


async def test_storage_errors_count_write_back_deadline_misses_and_backend_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = HiCacheConfig(
        layout=LAYOUT,
        device="cpu",
        device_pages=16,
        host_pages=32,
        storage_backend="memory",
        write_policy="write_through",
    )
    storage = SlowStorage(create_storage("memory", HiCacheStorageConfig()), delay=0.2)
    caplog.set_level(logging.CRITICAL)  # the deadline miss and the backend error log once
    async with HiCache.open(config, storage=storage) as cache:
        assert cache.write_back is not None
        cache.write_back.deadline_s = 0.01  # every L3 write misses it
        tokens = torch.arange(8)
        async with cache.session(tokens) as s:
            hit = await s.load()
            await s.commit(await s.allocate(tokens.numel() - hit.length))
        await cache.drain()
        storage.stats.record_error("io", "injected")  # one error the backend counted itself
        assert cache.counters.storage_errors >= 1
        stats = cache.stats()
        assert stats.storage.errors == cache.counters.storage_errors + 1
