"""Defects the chaos soak found, each as a minimal deterministic reproduction.

Each test states the promise the runtime must keep. Each failed on the code the soak found it
in; a new finding goes in as ``xfail(strict=True)`` until its fix lands (the strict mark then
turns red and is removed, with the fault kind's exclusion in ``test_soak.py``).
"""

from __future__ import annotations

import anyio
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.errors import HiCacheError
from hicache_async.radix import Tier as RadixTier
from hicache_async.testing._soak_kv import expected_kv, prefix_hashes, write_kv, wrong_bytes
from hicache_async.testing.faults import FaultyTransferEngine
from hicache_async.testing.soak import install_faulty_engine
from hicache_async.transfer import TransferEngine

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", page_size=4)
PROMPT = list(range(1000, 1064))  # 16 pages


def config(**kw: object) -> HiCacheConfig:
    options: dict[str, object] = {
        "layout": LAYOUT,
        "device": "cpu",
        "device_pages": 64,
        "host_pages": 128,
        "storage_backend": "none",
        "prefetch_threshold": 4,
    }
    options.update(kw)
    return HiCacheConfig(**options)


async def serve(cache: HiCache, tokens: list[int]) -> int:
    """One request through a session, KV from the soak's oracle; the hit length (checked)."""
    kv = expected_kv(cache.layout, prefix_hashes(tokens, None))
    async with cache.session(tokens) as s:
        await s.prefetch()
        hit = await s.load()
        assert wrong_bytes(cache.device_pool, hit.device_indices, kv[: hit.length]) == 0
        slots = await s.allocate(len(tokens) - hit.length)
        write_kv(cache.device_pool, slots, kv[hit.length :])
        await s.commit(slots)
    return int(hit.length)


def assert_index_intact(cache: HiCache) -> None:
    tree, ps = cache.tree, cache.page_size
    tree.check()
    assert tree.protected_size(RadixTier.DEVICE) == 0
    assert cache.l1.allocator.used == tree.total_size(RadixTier.DEVICE) // ps


async def test_failed_backup_copy_is_counted_and_the_cache_goes_on() -> None:
    async with HiCache.open(config()) as cache:
        assert cache.l1.engine is not None
        engine = FaultyTransferEngine(cache.l1.engine, fail_rate=1.0, slow_rate=0.0)
        install_faulty_engine(cache, engine)
        await serve(cache, PROMPT)  # write_through: its backup is queued, and fails
        await cache.drain()
        assert engine.failed >= 1
        assert await serve(cache, PROMPT) == len(PROMPT)  # L1 still serves it
        assert_index_intact(cache)


async def test_commit_of_another_sessions_slots_is_refused() -> None:
    other = [*PROMPT[:-4], 7, 7, 7, 7]
    kv = expected_kv(LAYOUT, prefix_hashes(PROMPT, None))
    async with HiCache.open(config()) as cache:
        async with cache.session(PROMPT) as a:
            await a.load()
            slots = await a.allocate(len(PROMPT))
            write_kv(cache.device_pool, slots, kv)
            async with cache.session(other) as b:
                await b.load()
                with pytest.raises(HiCacheError):
                    await b.commit(slots)
            await a.commit(slots)
        await cache.drain()  # write_through: A's backup holds its pages until copied
        assert_index_intact(cache)
        assert await serve(cache, PROMPT) == len(PROMPT)


async def test_load_after_exit_is_refused() -> None:
    async with HiCache.open(config()) as cache:
        await serve(cache, PROMPT)
        async with cache.session(PROMPT) as s:
            assert (await s.load()).length == len(PROMPT)
        with pytest.raises(HiCacheError):
            await s.load()


class GatedEngine(FaultyTransferEngine):
    """Backups wait at a gate (no faults): a backup in flight, held open by the test."""

    def __init__(self, inner: TransferEngine) -> None:
        super().__init__(inner, fail_rate=0.0, slow_rate=0.0)
        self.entered = anyio.Event()
        self.gate = anyio.Event()

    async def backup_pages(self, device_pages: torch.Tensor, host_pages: torch.Tensor) -> None:
        self.entered.set()
        await self.gate.wait()
        await super().backup_pages(device_pages, host_pages)


async def test_write_back_room_never_evicts_a_page_it_did_not_back_up() -> None:
    prompt_a, prompt_b, prompt_c = PROMPT[:16], PROMPT[16:48], list(range(5000, 5032))
    async with HiCache.open(
        config(device_pages=16, host_pages=32, write_policy="write_back")
    ) as cache:
        await serve(cache, prompt_a)  # L1: 4 pages, on device only (write_back)
        holder = cache.session(prompt_a)
        await holder.__aenter__()  # a request holds A (its last use: now)
        await serve(cache, prompt_b)  # L1: 12 of 16 pages
        assert cache.l1.engine is not None
        engine = GatedEngine(cache.l1.engine)
        install_faulty_engine(cache, engine)
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve, cache, prompt_c)  # needs 8 pages: backs up B, then evicts
            await engine.entered.wait()
            await holder.__aexit__(None, None, None)  # A's request ends mid-backup
            engine.gate.set()
        await cache.drain()
        match = cache.match_prefix(cache.key(prompt_a))
        assert match.device_hit_length + match.host_hit_length == len(prompt_a), "A was lost"


async def test_commit_after_the_cache_closed_is_a_closed_error() -> None:
    kv = expected_kv(LAYOUT, prefix_hashes(PROMPT, None))
    cache = HiCache(config())
    await cache.__aenter__()
    session = cache.session(PROMPT)
    await session.__aenter__()
    await session.load()
    slots = await session.allocate(len(PROMPT))
    write_kv(cache.device_pool, slots, kv)
    await cache.aclose()  # the server shuts down while the request is in flight
    try:
        with pytest.raises(HiCacheError):
            await session.commit(slots)
    finally:
        session.close()
