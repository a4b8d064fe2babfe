from __future__ import annotations

import anyio
import pytest
import torch

from hicache_async import CacheState, ClosedError, HiCache, HiCacheConfig, HiCacheError, KVLayout

LAYOUT = KVLayout(num_layers=1, num_kv_heads=1, head_dim=4, dtype="float32", page_size=2)


def config(**kw: object) -> HiCacheConfig:
    options: dict[str, object] = {
        "layout": LAYOUT,
        "device": "cpu",
        "device_pages": 8,
        "host_pages": 16,
        "storage_backend": "memory",
    }
    options.update(kw)
    return HiCacheConfig(**options)


async def test_use_after_close_raises_closed_error() -> None:
    async with HiCache.open(config()) as cache:
        assert cache.state is CacheState.OPEN
    assert cache.state is CacheState.CLOSED
    with pytest.raises(ClosedError, match="the cache is closed"):
        cache.session([1, 2, 3, 4])
    with pytest.raises(ClosedError):
        cache.match_prefix(cache.key([1, 2]))
    await cache.aclose()  # idempotent


async def test_a_cache_opens_once() -> None:
    cache = HiCache(config())
    async with cache:
        pass
    with pytest.raises(HiCacheError, match="a cache is opened once"):
        async with cache:
            pass


async def test_close_drains_queued_backups_and_writes() -> None:
    tokens = torch.arange(8)
    async with HiCache.open(config()) as cache:
        async with cache.session(tokens) as s:
            await s.load()
            new = await s.allocate(8)
            await s.commit(new)
        storage = cache.storage
    assert storage is not None
    # The backup and the L3 write queued by the commit finished before the backend closed.
    assert storage.stats.set_written == 4
    assert cache.stats().transitions["backup"].pages == 4


async def test_close_completes_when_the_closer_is_cancelled() -> None:
    cache = HiCache(config())
    with anyio.CancelScope() as scope:
        async with cache:
            scope.cancel()
            await anyio.sleep(1)  # cancelled here; leaving the block still closes
    assert cache.state is CacheState.CLOSED
    assert cache.storage is not None
    with pytest.raises(ClosedError):
        await cache.storage.batch_exists(["k"])


async def test_an_unclosed_cache_warns() -> None:
    cache = HiCache(config())
    async with cache:
        with pytest.warns(ResourceWarning, match="was never closed"):
            cache.__del__()
