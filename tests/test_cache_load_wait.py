"""A request whose host prefix another request is loading waits for that load and uses it,
instead of recomputing pages that are on their way (and allocating a second copy of them)."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.metrics import Transition
from hicache_async.radix import Tier as RadixTier

from .test_cache_e2e import assert_kv, serve

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", page_size=4)
PROMPT = torch.arange(500, 500 + 12 * 4)  # 12 pages


def config() -> HiCacheConfig:
    return HiCacheConfig(
        layout=LAYOUT,
        device="cpu",
        device_pages=64,
        host_pages=64,
        storage_backend="none",
        write_policy="write_through",
    )


async def host_only(cache: HiCache) -> None:
    """PROMPT's KV on L2 only: served once, backed up, then evicted from L1."""
    await serve(cache, PROMPT)
    await cache.drain()
    cache.device_tier.evict(cache.l1.allocator.usable)
    assert cache.tree.total_size(RadixTier.DEVICE) == 0
    assert cache.tree.total_size(RadixTier.HOST) == PROMPT.numel()


def gate_loads(cache: HiCache, monkeypatch: pytest.MonkeyPatch) -> anyio.Event:
    """Hold every L2 -> L1 copy until the returned event is set (timing only: the copy runs)."""
    assert cache.loader is not None
    engine = cache.loader.engine
    copy = engine.load
    gate = anyio.Event()

    async def held(host_slots: torch.Tensor, device_slots: torch.Tensor) -> Any:
        await gate.wait()
        return await copy(host_slots, device_slots)

    monkeypatch.setattr(engine, "load", held)
    return gate


def assert_settled(cache: HiCache) -> None:
    tree = cache.tree
    assert tree.protected_size(RadixTier.DEVICE) == 0
    assert tree.protected_size(RadixTier.HOST) == 0
    assert cache.l1.allocator.used == tree.total_size(RadixTier.DEVICE) // cache.page_size
    tree.check()


async def test_second_request_waits_for_the_load_in_flight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with HiCache.open(config()) as cache:
        await host_only(cache)
        gate = gate_loads(cache, monkeypatch)
        hits: dict[str, torch.Tensor] = {}

        async def request(name: str) -> None:
            async with cache.session(PROMPT) as s:
                hit = await s.load()
                assert_kv(cache, PROMPT[: hit.length], hit.device_indices)
                hits[name] = hit.device_indices

        async with anyio.create_task_group() as tg:
            tg.start_soon(request, "first")
            await anyio.wait_all_tasks_blocked()  # the first one's copy is in flight
            tg.start_soon(request, "second")
            await anyio.wait_all_tasks_blocked()
            assert "second" not in hits  # it waits instead of recomputing
            gate.set()

        assert cache.loader is not None
        assert cache.loader.waited == 1
        assert torch.equal(hits["first"], hits["second"])  # one copy on L1, used twice
        assert hits["second"].numel() == PROMPT.numel()
        load = cache.stats().transitions[Transition.LOAD]
        assert load.pages == PROMPT.numel() // 4
        assert load.waited == 1
        assert_settled(cache)


async def test_waiter_loads_itself_when_the_first_load_is_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with HiCache.open(config()) as cache:
        await host_only(cache)
        gate = gate_loads(cache, monkeypatch)
        second: list[int] = []

        async def first() -> None:
            async with cache.session(PROMPT) as s:
                await s.load()

        async def waiter() -> None:
            async with cache.session(PROMPT) as s:
                hit = await s.load()
                assert_kv(cache, PROMPT[: hit.length], hit.device_indices)
                second.append(hit.length)

        scope = anyio.CancelScope()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_in_scope, scope, first)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(waiter)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()  # the first load rolls back; the waiter must not hang
            await anyio.wait_all_tasks_blocked()
            gate.set()

        assert second == [PROMPT.numel()]
        assert_settled(cache)


async def test_cancelling_the_waiter_leaks_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    async with HiCache.open(config()) as cache:
        await host_only(cache)
        gate = gate_loads(cache, monkeypatch)

        async def request() -> None:
            async with cache.session(PROMPT) as s:
                await s.load()

        async with anyio.create_task_group() as tg:
            tg.start_soon(request)
            await anyio.wait_all_tasks_blocked()
            with anyio.move_on_after(0.01):  # cancelled while it waits for the first load
                await request()
            gate.set()
        assert_settled(cache)
        assert await serve(cache, PROMPT) == PROMPT.numel()  # all on L1 now


async def _in_scope(scope: anyio.CancelScope, fn: Any) -> None:
    with scope:
        await fn()
