"""Cancelling a request anywhere leaves no leaked page, no stale lock, no wrong byte."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.radix import Tier as RadixTier
from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing.faults import CorruptingStorage, FlakyStorage, SlowStorage
from hicache_async.testing.soak import CancelAtSuspension

from .test_cache_e2e import assert_kv, serve

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", page_size=4)
# What a cache of this model builds, so that a backend made by hand reads the cache's pages.
SAME_NAMESPACE = HiCacheStorageConfig(
    model_name="test-model", layout_fingerprint=LAYOUT.fingerprint_digest
)
PROMPT = torch.arange(300, 300 + 24 * 4)  # 24 pages


def config(tmp_path: Path, **kw: object) -> HiCacheConfig:
    options: dict[str, object] = {
        "layout": LAYOUT,
        "model_name": "test-model",
        "device": "cpu",
        "device_pages": 64,
        "host_pages": 128,
        "storage_backend": "file",
        "storage_backend_extra_config": f'{{"path": "{tmp_path}"}}',
        "prefetch_threshold": 4,
        "prefetch_policy": "wait_complete",
    }
    options.update(kw)
    return HiCacheConfig(**options)


def assert_nothing_leaked(cache: HiCache) -> None:
    tree, ps = cache.tree, cache.page_size
    assert tree.protected_size(RadixTier.DEVICE) == 0, "a device lock survived"
    assert tree.protected_size(RadixTier.HOST) == 0, "a host lock survived"
    assert cache.l1.allocator.used == tree.total_size(RadixTier.DEVICE) // ps, "device pages leaked"
    assert cache.host_pool is not None
    assert cache.host_pool.allocator.used == tree.total_size(RadixTier.HOST) // ps, "host leaked"
    assert cache.prefetcher is not None
    assert cache.prefetcher.inflight_pages == 0
    tree.check()


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    """An L3 directory that holds PROMPT, written by an earlier cache."""

    async def write() -> None:
        async with HiCache.open(config(tmp_path)) as cache:
            await serve(cache, PROMPT)

    anyio.run(write)
    return tmp_path


def slow_file_storage(path: Path) -> SlowStorage:
    inner = create_storage("file", SAME_NAMESPACE, path=str(path))
    return SlowStorage(inner, delay=0.004, per_page=0.002)


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.003, 0.006, 0.01, 0.015, 0.02, 0.03, 0.05, 0.08])
async def test_cancel_anywhere_in_a_request(stored: Path, delay: float) -> None:
    cfg = config(stored)
    async with HiCache.open(cfg, storage=slow_file_storage(stored)) as cache:
        cache.prefetcher.batch_pages = 4  # type: ignore[union-attr]  # more await points
        with anyio.move_on_after(delay):
            await serve(cache, PROMPT)
        await cache.drain()
        assert_nothing_leaked(cache)
        # The cache still serves the request correctly afterwards.
        hit = await serve(cache, PROMPT)
        assert hit == PROMPT.numel()
        assert_nothing_leaked(cache)


@pytest.mark.parametrize("policy", ["best_effort", "timeout"])
async def test_cancel_with_background_and_timed_prefetch(stored: Path, policy: str) -> None:
    cfg = config(stored, prefetch_policy=policy)
    async with HiCache.open(cfg, storage=slow_file_storage(stored)) as cache:
        for delay in (0.0, 0.005, 0.02, 0.05):
            with anyio.move_on_after(delay):
                await serve(cache, PROMPT)
            await cache.drain()
            assert_nothing_leaked(cache)


async def test_flaky_storage_gives_misses_never_wrong_bytes(stored: Path) -> None:
    inner = create_storage("file", SAME_NAMESPACE, path=str(stored))
    flaky = FlakyStorage(inner, fail_rate=0.5, seed=3)
    async with HiCache.open(config(stored), storage=flaky) as cache:
        hits = []
        for _i in range(8):
            async with cache.session(PROMPT) as s:
                await s.prefetch()
                hit = await s.load()
                assert_kv(cache, PROMPT[: hit.length], hit.device_indices)
                hits.append(hit.length)
            # Drop what the cache holds so the next request asks L3 again.
            cache.device_tier.evict(cache.l1.allocator.usable)
            cache.host_tier.evict(cache.host_pool.allocator.usable)  # type: ignore[union-attr]
            assert_nothing_leaked(cache)
        assert flaky.injected > 0
        assert any(h < PROMPT.numel() for h in hits)  # some requests missed...
        assert cache.stats().storage.errors > 0  # ...and the errors were counted


async def test_corrupting_storage_gives_misses_never_wrong_bytes(stored: Path) -> None:
    inner = create_storage("file", SAME_NAMESPACE, path=str(stored))
    bad = CorruptingStorage(inner, rate=0.3, seed=5)
    async with HiCache.open(config(stored), storage=bad) as cache:
        for _ in range(4):
            async with cache.session(PROMPT) as s:
                await s.prefetch()
                hit = await s.load()
                assert_kv(cache, PROMPT[: hit.length], hit.device_indices)  # never wrong data
            cache.device_tier.evict(cache.l1.allocator.usable)
            cache.host_tier.evict(cache.host_pool.allocator.usable)  # type: ignore[union-attr]
            assert_nothing_leaked(cache)
        assert bad.corrupted > 0
        assert cache.stats().storage.corrupt_pages > 0


async def _serve_cancelled_at(path: Path, at: int) -> tuple[int, bool]:
    """Serve PROMPT from a fresh cache over ``path``, cancelled at suspension ``at``; check
    that nothing leaked and that the cache still serves it bit-exact. Returns how many times
    the request suspended, and whether the cancellation cut it (a cancellation that lands in
    a shielded part, e.g. waiting for a copy to land, lets the request finish if no
    checkpoint follows)."""
    async with HiCache.open(config(path), storage=slow_file_storage(path)) as cache:
        cache.prefetcher.batch_pages = 4  # type: ignore[union-attr]  # more await points
        with anyio.CancelScope() as scope:
            step = CancelAtSuspension(serve(cache, PROMPT), scope, at)
            await step
        if at == 0:
            assert not scope.cancel_called
        await cache.drain()
        assert_nothing_leaked(cache)
        assert await serve(cache, PROMPT) == PROMPT.numel()
        assert_nothing_leaked(cache)
        return step.suspensions, scope.cancelled_caught


async def test_cancel_at_every_await_point(stored: Path) -> None:
    """A request from L3 (prefetch in batches, load to L1, commit, backup) cancelled at each
    of the points where it suspends, one fresh cache per point."""
    total, _ = await _serve_cancelled_at(stored, 0)
    assert total >= 8, f"the request suspended only {total} times: not the path meant"
    cut = [(await _serve_cancelled_at(stored, at))[1] for at in range(1, total + 1)]
    assert sum(cut) >= total * 3 // 4, f"only {sum(cut)} of {total} cancellations cut it"
