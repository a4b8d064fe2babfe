"""Regression tests for the defects found by driving the runtime as a server does (issue #10):
stale matches, bad input reaching background tasks, a failing copy, write-back evictions that
dropped pages, rollbacks that could fail, and misuse that corrupted the index."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.errors import CapacityError, HiCacheError, IndexStateError, TransferError
from hicache_async.health import DEGRADED_AFTER
from hicache_async.metrics import Transition
from hicache_async.radix import NodeState
from hicache_async.radix import Tier as RadixTier
from hicache_async.testing.faults import FaultyTransferEngine
from hicache_async.transfer import TransferEngine

from .test_cache_e2e import assert_kv, serve, write_kv
from .test_cache_load_wait import assert_settled, gate_loads

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", page_size=4)
PROMPT = torch.arange(500, 500 + 12 * 4)  # 12 pages
HANG_GUARD_S = 60  # a liveness guard (a hang fails the test), not a speed check


def config(**kw: Any) -> HiCacheConfig:
    values: dict[str, Any] = {
        "layout": LAYOUT,
        "device": "cpu",
        "device_pages": 64,
        "host_pages": 64,
        "storage_backend": "none",
        "write_policy": "write_through",
    }
    values.update(kw)
    return HiCacheConfig(**values)


async def host_only(cache: HiCache, tokens: torch.Tensor = PROMPT) -> None:
    """``tokens``' KV on L2 only: served once, backed up, then evicted from L1."""
    await serve(cache, tokens)
    await cache.drain()
    cache.device_tier.evict(cache.l1.allocator.usable)
    assert cache.tree.total_size(RadixTier.DEVICE) == 0


async def settled(cache: HiCache) -> None:
    """Background work done; then nothing locked, no page leaked, the tree consistent."""
    await cache.drain()
    assert_settled(cache)


# -- 1. a stale match is matched again, never waited on ---------------------------------------


async def test_a_match_made_stale_by_another_load_is_rematched() -> None:
    """Two sessions match the same L2-only prefix; A's load brings it to L1 (the nodes become
    BOTH). B's match is stale: it must match again and use A's pages, not wait for a load
    that will never come."""
    async with HiCache.open(config()) as cache:
        await host_only(cache)
        async with cache.session(PROMPT) as a, cache.session(PROMPT) as b:
            assert a.match.host_hit_length == b.match.host_hit_length == PROMPT.numel()
            hit_a = await a.load()
            with anyio.fail_after(HANG_GUARD_S):
                hit_b = await b.load()
            assert hit_a.length == hit_b.length == PROMPT.numel()
            assert torch.equal(hit_a.device_indices, hit_b.device_indices)  # one L1 copy
            assert_kv(cache, PROMPT, hit_b.device_indices)
        await settled(cache)


# -- 2. bad input is refused at the edge; a failing background job is contained --------------


@pytest.mark.parametrize(
    "tokens",
    [[2**31] * 8, [-1] * 8, [1, 2, 3, 2**40]],
    ids=["2**31", "negative", "2**40"],
)
async def test_token_ids_outside_int32_are_refused_at_the_session(tokens: list[int]) -> None:
    async with HiCache.open(config(storage_backend="memory", prefetch_policy="best_effort")) as c:
        with pytest.raises(HiCacheError, match="token ids"):
            c.session(tokens)
        with pytest.raises(HiCacheError, match="token ids"):
            c.key(tokens)
        assert await serve(c, PROMPT) == 0  # the cache goes on
        assert await serve(c, PROMPT) == PROMPT.numel()


async def test_an_extra_key_that_is_not_utf8_is_refused_at_the_session() -> None:
    async with HiCache.open(config(storage_backend="memory", prefetch_policy="best_effort")) as c:
        with pytest.raises(HiCacheError, match="extra_key"):
            c.session(PROMPT, extra_key="\ud800")
        assert await serve(c, PROMPT) == 0


async def test_a_failing_backup_copy_is_counted_and_the_cache_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A TransferError in the backup worker (D2H copy) used to end the cache's task group and
    with it every request; now the backup is rolled back, counted, and the cache serves on."""
    async with HiCache.open(config()) as cache:
        assert cache.backup is not None
        engine = cache.backup.engine
        real = engine.backup_pages
        failing = True

        async def flaky(device_pages: torch.Tensor, host_pages: torch.Tensor) -> None:
            if failing:
                raise TransferError("injected: the D2H copy failed")
            await real(device_pages, host_pages)

        monkeypatch.setattr(engine, "backup_pages", flaky)
        await serve(cache, PROMPT)
        await cache.drain()
        stats = cache.stats()
        assert stats.transitions[Transition.BACKUP].failures >= 1
        assert stats.background_failures.get("backup", 0) >= 1
        assert cache.tree.total_size(RadixTier.HOST) == 0  # rolled back: nothing half-done
        failing = False
        other = torch.arange(9000, 9000 + 8 * 4)
        assert await serve(cache, other) == 0
        await cache.drain()
        assert cache.tree.total_size(RadixTier.HOST) >= other.numel()  # backups work again
        assert await serve(cache, PROMPT) == PROMPT.numel()
        await settled(cache)


# -- 4. under write_back, freeing L1 backs the victims up first --------------------------------


def _tokens_cached(cache: HiCache, tokens: torch.Tensor) -> int:
    match = cache.tree.match_prefix(cache.key(tokens))
    return match.device_hit_length + match.host_hit_length


async def test_write_back_load_backs_up_what_it_evicts() -> None:
    """A load-back needing L1 room must back its victims up, not drop them from both tiers."""
    ps = LAYOUT.page_size
    async with HiCache.open(config(device_pages=17, write_policy="write_back")) as cache:
        usable = cache.l1.allocator.usable
        y = torch.arange(100, 100 + 8 * ps)
        x = torch.arange(5000, 5000 + (usable - 4) * ps)
        await serve(cache, y)
        assert await cache.ensure_device_room(usable)  # Y: backed up, then evicted
        assert _tokens_cached(cache, y) == y.numel()
        await serve(cache, x)  # device only (write_back backs up on eviction only)
        assert cache.tree.total_size(RadixTier.HOST) == y.numel()
        async with cache.session(y) as s:
            hit = await s.load()  # needs 8 pages of L1: X must go (to L2)
            assert hit.length == y.numel()
            assert_kv(cache, y, hit.device_indices)
        assert _tokens_cached(cache, x) == x.numel()  # nothing lost
        await settled(cache)


async def test_write_back_allocate_never_drops_an_unbacked_page() -> None:
    ps = LAYOUT.page_size
    async with HiCache.open(config(device_pages=17, write_policy="write_back")) as cache:
        usable = cache.l1.allocator.usable
        x = torch.arange(5000, 5000 + (usable - 2) * ps)
        await serve(cache, x)
        z = torch.arange(20_000, 20_000 + 6 * ps)
        async with cache.session(z) as s:
            # Straight to allocate (no load(), which would make room with backups first):
            # the sync reservation may refuse, but never by dropping X's unbacked pages.
            with contextlib.suppress(CapacityError):
                slots = await s.allocate(z.numel())
                write_kv(cache, z, slots)
                await s.commit(slots)
        assert _tokens_cached(cache, x) == x.numel()
        await settled(cache)


# -- 5. a load's rollback cannot fail -----------------------------------------------------------


async def test_cancelled_load_rolls_back_after_an_insert_below_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A low-level ``tree.insert`` of a longer key while a load moves its prefix used to adopt
    host nodes below the LOADING span; the cancelled load's rollback then raised
    IndexStateError and leaked device pages and a host lock."""
    async with HiCache.open(config()) as cache:
        await host_only(cache)
        gate = gate_loads(cache, monkeypatch)
        ps = cache.page_size
        head = PROMPT[: 8 * ps]
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def load_head() -> None:
                    async with cache.session(head) as s:
                        await s.load()

                tg.start_soon(load_head)
                await anyio.wait_all_tasks_blocked()
                assert cache.tree.match_prefix(cache.key(head)).last_host_node.state is (
                    NodeState.LOADING
                )
                # The scheduler-level path: the whole prompt recomputed and inserted.
                slots = cache.device_tier.reserve(PROMPT.numel() // ps)
                assert slots is not None
                write_kv(cache, PROMPT, slots)
                cached = cache.tree.insert(cache.key(PROMPT), slots)
                cache.device_tier.free(slots[: cached // ps * ps])
                scope.cancel()
        await settled(cache)
        gate.set()
        assert await serve(cache, PROMPT) == PROMPT.numel()  # from L2, nothing lost


# -- 6. misuse is refused and leaves the index intact -------------------------------------------


async def test_committing_another_sessions_slots_is_refused() -> None:
    async with HiCache.open(config()) as cache:
        a_tokens = torch.arange(0, 8 * 4)
        b_tokens = torch.arange(1000, 1000 + 8 * 4)
        async with cache.session(a_tokens) as a, cache.session(b_tokens) as b:
            await a.load()
            await b.load()
            a_slots = await a.allocate(a_tokens.numel())
            await b.allocate(b_tokens.numel())
            write_kv(cache, b_tokens, a_slots)
            with pytest.raises(HiCacheError, match="allocate"):
                await b.commit(a_slots)
            cache.tree.check()
            write_kv(cache, a_tokens, a_slots)
            await a.commit(a_slots)
        await settled(cache)
        await cache.clear()
        assert cache.l1.allocator.used == 0


async def test_load_after_the_session_ended_is_refused() -> None:
    async with HiCache.open(config()) as cache:
        await serve(cache, PROMPT)
        async with cache.session(PROMPT) as s:
            hit = await s.load()
            assert hit.length == PROMPT.numel()
        with pytest.raises(HiCacheError, match="closed"):
            await s.load()
        with pytest.raises(HiCacheError, match="closed"):
            await s.allocate(4)
        await settled(cache)


# -- the invariant check users and the soak share -----------------------------------------------


async def test_check_names_a_leaked_page_and_a_held_lock() -> None:
    async with HiCache.open(config()) as cache:
        await serve(cache, PROMPT)
        await cache.drain()
        cache.check()  # idle: consistent
        leaked = cache.l1.allocator.alloc(1)
        assert leaked is not None
        with pytest.raises(IndexStateError, match="device allocator"):
            cache.check()
        cache.l1.allocator.free(leaked)
        node = cache.tree.match_prefix(cache.key(PROMPT)).last_device_node
        cache.tree.lock(node)
        with pytest.raises(IndexStateError, match="locked"):
            cache.check()
        cache.tree.unlock(node)
        cache.check()


async def test_a_wrapped_engine_carries_every_copy() -> None:
    """``HiCache(config, wrap_engine=...)`` builds the tiers on the wrapped engine."""
    wrapped: list[FaultyTransferEngine] = []

    def wrap(inner: TransferEngine) -> TransferEngine:
        wrapped.append(FaultyTransferEngine(inner, fail_rate=1.0, slow_rate=0.0))
        return wrapped[-1]

    async with HiCache.open(config(), wrap_engine=wrap) as cache:
        assert cache.loader is not None
        assert cache.backup is not None
        assert cache.loader.engine is cache.backup.engine is wrapped[0]
        await serve(cache, PROMPT)
        await cache.drain()
        assert wrapped[0].failed >= 1  # the backup went through it, and failed
        assert cache.stats().background_failures["backup"] >= 1
        cache.check()


async def test_a_tier_whose_jobs_keep_failing_is_degraded_until_one_succeeds() -> None:
    engine: list[FaultyTransferEngine] = []

    def wrap(inner: TransferEngine) -> TransferEngine:
        engine.append(FaultyTransferEngine(inner, fail_rate=1.0, slow_rate=0.0))
        return engine[0]

    async with HiCache.open(config(), wrap_engine=wrap) as cache:
        for i in range(DEGRADED_AFTER):
            await serve(cache, torch.arange(i * 1000, i * 1000 + 8))
            await cache.drain()  # one backup batch per request: one failure each
            assert cache.stats().degraded == ([] if i < DEGRADED_AFTER - 1 else ["host"])
        engine[0].fail_rate = 0.0
        await serve(cache, torch.arange(50_000, 50_008))
        await cache.drain()
        stats = cache.stats()
        assert stats.degraded == []
        assert stats.background_failures == {"backup": DEGRADED_AFTER}
