"""Overload: when L3 falls behind, queued L3 writes are shed, never L1 -> L2 backups."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.prometheus import StatsCollector
from hicache_async.radix import NodeState
from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing.faults import StallingStorage

from .test_cache_e2e import serve

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32", page_size=4)
NAMESPACE = HiCacheStorageConfig(
    model_name="test-model", layout_fingerprint=LAYOUT.fingerprint_digest
)
PAGES = 9  # per prompt
PROMPTS = [torch.arange(10_000 * (i + 1), 10_000 * (i + 1) + PAGES * 4) for i in range(24)]


def config(policy: str) -> HiCacheConfig:
    return HiCacheConfig(
        layout=LAYOUT,
        model_name="test-model",
        device="cpu",
        device_pages=32,
        host_pages=96,
        storage_backend="file",
        prefetch_threshold=4,
        write_policy=policy,
    )


def stalled_l3(path: Path) -> StallingStorage:
    """A file L3 whose every call hangs until released: L3 throughput is nil."""
    slow = StallingStorage(create_storage("file", NAMESPACE, path=str(path)), rate=0.0)
    slow.stall_s = 3600.0  # until released (the wait is cancellable)
    slow.paused = True
    return slow


async def burst(cache: HiCache) -> None:
    """Distinct prompts, 24 x 9 pages through 32 L1 and 96 L2 pages; copies L1 -> L2 keep up
    (a drain after each would wait for the stalled L3, so the backups alone are awaited)."""
    for tokens in PROMPTS:
        await serve(cache, tokens)
        while cache._backups_pending.count:
            await cache._backups_pending.wait_progress()


@pytest.mark.parametrize("policy", ["write_through", "write_back"])
async def test_a_stalled_l3_sheds_its_writes_and_never_skips_a_backup(
    tmp_path: Path, policy: str
) -> None:
    slow = stalled_l3(tmp_path)
    async with HiCache.open(config(policy), storage=slow) as cache:
        assert cache.write_back is not None
        cache.backup_pin_limit = cache.l1.allocator.usable  # only L2's room defers backups
        await burst(cache)
        await slow.wait_stalled()  # the writer's first batch hangs in L3
        stats = cache.stats().transitions
        assert stats["backup"].skipped == 0  # every backup L1 -> L2 found room...
        assert stats["write_back"].shed > 0  # ...because queued L3 writes gave theirs up
        assert stats["write_back"].shed == cache.write_back.shed_jobs
        assert stats["backup"].count > 0
        # The newest prompts are cached whole: on L1 (the last three; write_through has
        # copied them to L2 too) or moved to L2 as L1 evicted them, not lost for want of L2.
        for tokens in PROMPTS[-6:]:
            match = cache.match_prefix(cache.key(tokens))
            assert match.device_hit_length + match.host_hit_length == tokens.numel()
        for tokens in PROMPTS[-6:-3]:
            assert cache.match_prefix(cache.key(tokens)).last_host_node.state is NodeState.HOST
        registry = CollectorRegistry()
        registry.register(StatsCollector(cache.stats))
        text = generate_latest(registry).decode()
        shed = stats["write_back"].shed
        assert f'hicache_transition_shed_total{{transition="write_back"}} {shed:.1f}' in text

        slow.paused = False
        slow.release()
        await cache.drain()
        cache.check()  # nothing leaked, no lock left: the shed jobs released their pages
        assert cache.tree.protected_size() == 0
        for tokens in reversed(PROMPTS[-6:]):  # bit-exact (serve checks the KV), whole
            assert await serve(cache, tokens) == tokens.numel()
        for tokens in PROMPTS:  # older ones: partly or not cached, never wrong
            await serve(cache, tokens)
        await cache.drain()
        cache.check()
        assert cache.stats().transitions["backup"].skipped == 0


async def test_jobs_the_writer_took_are_not_shed(tmp_path: Path) -> None:
    """Only queued jobs are shed: a write in flight releases its pages when it returns."""
    slow = stalled_l3(tmp_path)
    async with HiCache.open(config("write_through"), storage=slow) as cache:
        write_back = cache.write_back
        assert write_back is not None
        await serve(cache, PROMPTS[0])
        await slow.wait_stalled()  # its write is in flight
        await anyio.wait_all_tasks_blocked()
        assert write_back.depth == 0
        assert write_back.shed(1_000) == 0
        await serve(cache, PROMPTS[1])
        await anyio.wait_all_tasks_blocked()
        assert write_back.depth == 1
        assert write_back.queued_pages == PAGES
        assert write_back.shed(1) == PAGES  # a whole job, oldest first
        assert write_back.depth == 0
        assert cache.stats().transitions["write_back"].shed == 1
        slow.paused = False
        slow.release()
        await cache.drain()
        cache.check()
        stats = cache.stats().transitions["write_back"]
        assert stats.pages == PAGES  # the first prompt reached L3, the shed one did not
