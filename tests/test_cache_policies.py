"""Each write policy and prefetch policy, shown by what it does differently."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.radix import NodeState
from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing.faults import SlowStorage
from hicache_async.tiers.prefetch import PrefetchOutcome

from .test_cache_e2e import assert_kv, serve

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float32", page_size=4)
# What a cache of this model builds, so that a backend made by hand reads the cache's pages.
SAME_NAMESPACE = HiCacheStorageConfig(
    model_name="test-model", layout_fingerprint=LAYOUT.fingerprint_digest
)
PROMPT = torch.arange(40, 40 + 24 * 4)  # 24 pages


def config(**kw: object) -> HiCacheConfig:
    options: dict[str, object] = {
        "layout": LAYOUT,
        "model_name": "test-model",
        "device": "cpu",
        "device_pages": 32,
        "host_pages": 96,
        "storage_backend": "none",
        "prefetch_threshold": 4,
    }
    options.update(kw)
    return HiCacheConfig(**options)


def state_of(cache: HiCache, tokens: torch.Tensor) -> NodeState:
    return cache.match_prefix(cache.key(tokens)).last_host_node.state


async def push_out_of_l1(cache: HiCache) -> None:
    for i in range(4):  # 4 x 9 pages through a 32-page L1
        await serve(cache, torch.arange(10_000 * (i + 1), 10_000 * (i + 1) + 36))
    await cache.drain()


async def test_write_through_backs_up_on_insert() -> None:
    async with HiCache.open(config(write_policy="write_through")) as cache:
        await serve(cache, PROMPT)
        await cache.drain()
        assert state_of(cache, PROMPT) is NodeState.BOTH
        await push_out_of_l1(cache)
        assert await serve(cache, PROMPT) == PROMPT.numel()  # from L2


async def test_write_through_selective_waits_for_the_second_hit() -> None:
    async with HiCache.open(config(write_policy="write_through_selective")) as cache:
        await serve(cache, PROMPT)
        await cache.drain()
        assert state_of(cache, PROMPT) is NodeState.DEVICE  # one use: not worth L2 yet
        await serve(cache, PROMPT)
        await serve(cache, PROMPT)
        await cache.drain()
        assert state_of(cache, PROMPT) is NodeState.BOTH  # hit twice: backed up


@pytest.mark.parametrize("events", [False, True], ids=["quiet", "with_events"])
async def test_write_through_selective_counts_hits_not_inserts(events: bool) -> None:
    """Announcing an insert (KV events) must not count as a hit of what was inserted."""
    cfg = config(write_policy="write_through_selective")
    async with HiCache.open(cfg) as cache, cache.events() if events else contextlib.nullcontext():
        await serve(cache, PROMPT)  # inserted
        await serve(cache, PROMPT)  # hit once
        await cache.drain()
        assert state_of(cache, PROMPT) is NodeState.DEVICE
        await serve(cache, PROMPT)  # hit twice
        await cache.drain()
        assert state_of(cache, PROMPT) is NodeState.BOTH


async def test_write_through_selective_loses_a_cold_prefix_under_pressure() -> None:
    async with HiCache.open(config(write_policy="write_through_selective")) as cache:
        await serve(cache, PROMPT)
        await push_out_of_l1(cache)
        assert await serve(cache, PROMPT) == 0


async def test_write_back_copies_only_when_l1_evicts() -> None:
    async with HiCache.open(config(write_policy="write_back")) as cache:
        await serve(cache, PROMPT)
        await cache.drain()
        assert state_of(cache, PROMPT) is NodeState.DEVICE  # nothing copied on insert
        assert cache.stats().transitions["backup"].pages == 0
        await push_out_of_l1(cache)
        assert state_of(cache, PROMPT) is NodeState.HOST  # copied on its way out of L1
        assert await serve(cache, PROMPT) == PROMPT.numel()


@pytest.fixture
def l3_dir(tmp_path: Path) -> Path:
    async def write() -> None:
        cfg = config(
            storage_backend="file", storage_backend_extra_config=f'{{"path": "{tmp_path}"}}'
        )
        async with HiCache.open(cfg) as cache:
            await serve(cache, PROMPT)

    anyio.run(write)
    return tmp_path


async def open_slow(l3_dir: Path, **kw: object) -> tuple[HiCacheConfig, SlowStorage]:
    inner = create_storage("file", SAME_NAMESPACE, path=str(l3_dir))
    return config(storage_backend="file", **kw), SlowStorage(inner, delay=0.0, per_page=0.01)


async def request_with_prefetch(cache: HiCache) -> tuple[PrefetchOutcome, int]:
    assert cache.prefetcher is not None
    cache.prefetcher.batch_pages = 4
    async with cache.session(PROMPT) as s:
        result = await s.prefetch()
        hit = await s.load()
        assert_kv(cache, PROMPT[: hit.length], hit.device_indices)
        return result.outcome, hit.length


async def test_wait_complete_gets_every_page(l3_dir: Path) -> None:
    cfg, slow = await open_slow(l3_dir, prefetch_policy="wait_complete")
    async with HiCache.open(cfg, storage=slow) as cache:
        outcome, hit = await request_with_prefetch(cache)
    assert (outcome, hit) == (PrefetchOutcome.COMPLETED, PROMPT.numel())


class FirstBatchOnly(SlowStorage):
    """Reads the first batch of pages, then never answers again (until cancelled)."""

    reads = 0

    async def _read_pages(self, keys: list[str], buffers: list[Any]) -> list[bool]:
        self.reads += 1
        if self.reads > 1:
            await anyio.sleep_forever()
        return await super()._read_pages(keys, buffers)


async def test_timeout_stops_at_the_linear_deadline_and_keeps_the_prefix(l3_dir: Path) -> None:
    """The second batch never arrives: the prefetch gives up at its deadline and the request
    keeps the first batch. (Outcomes only: a stalled machine may make the deadline cut the
    first batch too, and then the hit is what arrived, none.)"""
    inner = create_storage("file", SAME_NAMESPACE, path=str(l3_dir))
    storage = FirstBatchOnly(inner, delay=0.0)
    cfg = config(
        storage_backend="file",
        prefetch_policy="timeout",
        prefetch_timeout_base=0.5,
        prefetch_timeout_per_ki_token=0.0,
    )
    async with HiCache.open(cfg, storage=storage) as cache:
        outcome, hit = await request_with_prefetch(cache)
    assert outcome is PrefetchOutcome.TIMED_OUT
    assert hit == storage.stats.get_hits * LAYOUT.page_size  # what arrived, kept
    assert hit in (0, 16)  # whole batches of 4 pages; the cut one was dropped
    assert storage.reads == 2  # it waited on the second, not on more


async def test_best_effort_returns_at_once_and_load_takes_what_arrived(l3_dir: Path) -> None:
    cfg, slow = await open_slow(l3_dir, prefetch_policy="best_effort")
    async with HiCache.open(cfg, storage=slow) as cache:
        assert cache.prefetcher is not None
        cache.prefetcher.batch_pages = 4
        async with cache.session(PROMPT) as s:
            result = await s.prefetch()
            assert result.outcome is PrefetchOutcome.STARTED
            assert slow.stats.get_hits == 0  # it returned before any page arrived
            await anyio.sleep(0.09)  # the request does other work meanwhile
            hit = await s.load()
            assert_kv(cache, PROMPT[: hit.length], hit.device_indices)
        assert 0 < hit.length < PROMPT.numel()
        await cache.drain()
        assert cache.stats().prefetch.partial == 1


async def test_a_backup_skipped_while_l2_is_pinned_is_retried() -> None:
    """write_through: a prefix whose backup found L2 full of locked pages is backed up once
    L2 has room again (at a later request), not left out of L2 and L3 for good."""
    other = torch.arange(5000, 5000 + 32 * LAYOUT.page_size)  # fills L2 (as big as L1)
    async with HiCache.open(config(host_pages=32)) as cache:
        cache.backup_pin_limit = cache.l1.allocator.usable  # only L2's room defers backups here
        await serve(cache, other)
        await cache.drain()
        cache.device_tier.evict(cache.l1.allocator.usable)  # ``other`` lives on L2 only
        assert state_of(cache, other) is NodeState.HOST
        async with cache.session(other):  # a request holds it there (host-locked)
            await serve(cache, PROMPT)
            await cache.drain()
            assert state_of(cache, PROMPT) is NodeState.DEVICE  # no room: skipped
        await serve(cache, torch.arange(9000, 9000 + LAYOUT.page_size))  # a later request
        await cache.drain()
        assert state_of(cache, PROMPT) is NodeState.BOTH  # retried once L2 could make room
        backup = cache.stats().transitions["backup"]
        assert (backup.skipped, backup.retried, backup.dropped) == (1, 1, 0)


async def test_a_backup_skipped_behind_l3_writes_is_retried_when_they_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """L2 full of pages that L3 writes still read: the skipped backup is retried as soon as a
    write releases its pages, with no later request needed."""
    other = torch.arange(5000, 5000 + 32 * LAYOUT.page_size)  # fills L2 (as big as L1)
    cfg = config(
        host_pages=32,
        storage_backend="file",
        storage_backend_extra_config=f'{{"path": "{tmp_path}"}}',
    )
    async with HiCache.open(cfg) as cache:
        assert cache.storage is not None
        store = cache.storage.batch_set_v1
        gate = anyio.Event()

        async def held(*args: Any, **kw: Any) -> Any:
            await gate.wait()  # the write is in flight until the test lets it finish
            return await store(*args, **kw)

        monkeypatch.setattr(cache.storage, "batch_set_v1", held)
        await serve(cache, other)  # backed up, its L3 write held: L2 pinned
        await anyio.wait_all_tasks_blocked()
        cache.device_tier.evict(cache.l1.allocator.usable)  # ``other`` lives on L2 only
        await serve(cache, PROMPT)
        await anyio.wait_all_tasks_blocked()
        assert state_of(cache, PROMPT) is NodeState.DEVICE  # no room: skipped
        gate.set()  # the write lands and releases ``other``'s pages...
        await cache.drain()
        assert state_of(cache, PROMPT) is NodeState.BOTH  # ...and the backup is retried
        assert cache.stats().transitions["backup"].retried == 1


@pytest.mark.parametrize("headroom", [0.0, 0.25])
async def test_eviction_frees_the_headroom_beyond_the_shortfall(headroom: float) -> None:
    """A request that finds L1 full evicts what it lacks plus ``eviction_headroom`` of L1, so
    the next requests find room without evicting; with no headroom, exactly what it lacks.
    L2 reservations do the same."""
    cfg = config(device_pages=32, host_pages=32, eviction_headroom=headroom)
    async with HiCache.open(cfg) as cache:
        l1, l2 = cache.l1.allocator, cache.host_pool.allocator  # type: ignore[union-attr]
        for i in range(3):  # 3 x 9 pages: L1 and L2 nearly full (write_through)
            await serve(cache, torch.arange(10_000 * (i + 1), 10_000 * (i + 1) + 36))
        await cache.drain()
        assert l1.available == 32 - 27
        assert l2.available == 32 - 27
        await serve(cache, torch.arange(90_000, 90_000 + 36))  # 9 more pages: 4 short
        await cache.drain()
        room = int(32 * headroom)
        assert cache.device_tier.evicted_pages == 4 + room
        assert l1.available == room
        assert cache.host_tier.evicted_pages == 4 + room  # type: ignore[union-attr]
        assert l2.available == room
        cache.tree.check()
        evicted = cache.device_tier.evicted_pages
        await serve(cache, torch.arange(95_000, 95_000 + 4 * room))  # fits in the headroom
        assert cache.device_tier.evicted_pages == evicted


def test_eviction_headroom_is_checked() -> None:
    with pytest.raises(ValueError, match="eviction_headroom"):
        config(eviction_headroom=0.9)


async def test_backups_that_fall_behind_pin_at_most_the_limit() -> None:
    """When copies fall behind the inserts, queued backups pin at most ``backup_pin_limit`` L1
    pages; later ones wait in the retry list, so requests keep finding room. Once the copies
    land, the deferred backups are made: every prefix reaches L2."""
    cfg = config(device_pages=64, host_pages=128, write_policy="write_through")
    async with HiCache.open(cfg) as cache:
        gate = anyio.Event()
        engine = cache.l1.engine
        copy = engine._backup

        async def gated(device: torch.Tensor, host: torch.Tensor) -> None:
            await gate.wait()  # the copy engine is stuck until the test lets it go
            await copy(device, host)

        engine._backup = gated  # type: ignore[method-assign]
        assert cache.backup_pin_limit == 16
        prompts = [torch.arange(1000 * (i + 1), 1000 * (i + 1) + 16) for i in range(12)]
        for tokens in prompts:  # 4 pages each: 48 pages, 16 of them pinned at most
            await serve(cache, tokens)
            assert cache.tree.protected_size() // LAYOUT.page_size <= 16
        assert cache.stats().transitions["backup"].skipped >= 8
        gate.set()
        await cache.drain()
        for tokens in prompts:
            assert state_of(cache, tokens) is NodeState.BOTH
        assert cache.tree.protected_size() == 0
        cache.tree.check()
