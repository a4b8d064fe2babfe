"""Adversarial tests of the whole request lifecycle (session.py, tiers/room.py): chunked
prefill with repeated commits over shared prefixes, decode through extend(), waiting for L1
room (FIFO, timeout, no-room-ever detection) and the scheduler-level API, driven as a
demanding user would, with cancellation and copy faults injected at random.

Every scenario checks that each request ends (served, or refused with one of our errors, or
cancelled by its caller), that every hit reads back bit-exact (the soak's KV oracle), and that
afterwards the index is consistent, nothing is locked and every allocated page is in the tree.
A defect is a minimal test marked ``xfail(strict=True)`` saying what breaks; the other tests are
guards for the scenarios that held. Hangs are detected by behaviour (a wait still pending once
every task is blocked), ``fail_after`` is only a generous hang guard.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import numpy as np
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.errors import CapacityError, ClosedError, HiCacheError, LayoutError
from hicache_async.radix import Tier as RadixTier
from hicache_async.session import Session
from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing._soak_kv import (
    decode_tokens,
    expected_kv,
    prefix_hashes,
    write_kv,
    wrong_bytes,
)
from hicache_async.testing.faults import FaultyTransferEngine, StallingStorage
from hicache_async.testing.soak import CancelAtSuspension
from hicache_async.transfer import TransferEngine

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", page_size=4)
PS = LAYOUT.page_size
MODEL = "adversarial-lifecycle"
HANG_GUARD_S = 30  # a liveness guard (a hang fails the test), never a speed check


def config(**kw: Any) -> HiCacheConfig:
    options: dict[str, Any] = {
        "layout": LAYOUT,
        "device": "cpu",
        "device_pages": 64,
        "host_pages": 128,
        "storage_backend": "none",
        "prefetch_threshold": 4,
    }
    options.update(kw)
    return HiCacheConfig(**options)


def file_config(path: Path, **kw: Any) -> HiCacheConfig:
    options: dict[str, Any] = {
        "model_name": MODEL,
        "storage_backend": "file",
        "storage_backend_extra_config": f'{{"path": "{path}"}}',
    }
    options.update(kw)
    return config(**options)


def kv_of(tokens: list[int], extra_key: str | None = None) -> torch.Tensor:
    return expected_kv(LAYOUT, prefix_hashes(tokens, extra_key))


async def settled(cache: HiCache) -> None:
    """Background work drained; nothing locked, no page leaked, the index consistent."""
    await cache.drain()
    cache.check()
    tree = cache.tree
    assert tree.protected_size(RadixTier.DEVICE) == 0
    assert tree.protected_size(RadixTier.HOST) == 0
    assert cache.l1.allocator.used == tree.total_size(RadixTier.DEVICE) // PS
    if cache.host_pool is not None:
        assert cache.host_pool.allocator.used == tree.total_size(RadixTier.HOST) // PS
    assert cache.room.waiting == 0


async def holder(cache: HiCache, pages: int, base: int = 100_000) -> Session:
    """An open request holding ``pages`` uncommitted L1 pages."""
    s = cache.session(list(range(base, base + pages * PS))).enter()
    await s.load()
    got = s.allocate_nowait(pages * PS)
    assert got.numel() == pages * PS
    return s


async def fill(cache: HiCache, tokens: list[int], extra_key: str | None = None) -> None:
    """One whole request: load, compute the rest at once, commit (bit-exact hit)."""
    kv = kv_of(tokens, extra_key)
    async with cache.session(tokens, extra_key) as s:
        hit = await s.load()
        assert wrong_bytes(cache.device_pool, hit.device_indices, kv[: hit.length]) == 0
        slots = await s.allocate(len(tokens) - hit.length)
        write_kv(cache.device_pool, slots, kv[hit.length :])
        await s.commit(slots)


# -- the mixed workload: concurrent chunked prefills over shared prefixes ----------------------


class Outcomes:
    def __init__(self) -> None:
        self.served = self.refused = self.cancelled = 0
        self.switched = 0  # tokens another request committed first (page table switches)
        self.hits = 0


async def chat_request(
    cache: HiCache,
    prompt: list[int],
    extra_key: str | None,
    rng: random.Random,
    out: Outcomes,
    *,
    decode_n: int,
    scheduler_api: bool,
) -> None:
    """Prefill ``prompt`` in random chunks (checking the request's page table bit-exact after
    every commit), then decode ``decode_n`` tokens; through ``async with`` or the
    scheduler-level verbs."""
    answer = decode_tokens(prompt, extra_key, decode_n)
    full = prompt + answer
    kv = kv_of(full, extra_key)
    pool = cache.device_pool
    s = cache.session(prompt, extra_key)
    if scheduler_api:
        s.enter()
    else:
        await s.__aenter__()
    try:
        await s.prefetch()
        hit = await s.load()
        assert wrong_bytes(pool, hit.device_indices, kv[: hit.length]) == 0
        out.hits += int(hit.length)
        done = int(hit.length)
        while done < len(prompt):
            n = min(rng.choice([1, 2, PS - 1, PS, PS + 1, 3 * PS + 2]), len(prompt) - done)
            if scheduler_api:
                slots = s.try_allocate(n)
                for _ in range(50):  # no room: the scheduler leaves it for its next steps
                    if slots is not None:
                        break
                    await anyio.lowlevel.checkpoint()
                    slots = s.try_allocate(n)
                if slots is None:  # then retracts it (what an await would wait for)
                    raise CapacityError("retracted by the scheduler")
            else:
                slots = await s.allocate(n)
            await anyio.lowlevel.checkpoint()  # the model's forward pass
            write_kv(pool, slots, kv[done : done + n])
            if scheduler_api:
                out.switched += s.commit_nowait(slots)
            else:
                out.switched += await s.commit(slots)
            done += n
            assert wrong_bytes(pool, s.device_indices, kv[:done]) == 0
        for token in answer:
            s.extend([token])
            slot = s.allocate_nowait(1)  # a running request does not queue behind new ones
            await anyio.lowlevel.checkpoint()
            write_kv(pool, slot, kv[done : done + 1])
            if scheduler_api:
                s.commit_nowait(slot)
            else:
                await s.commit(slot)
            done += 1
        assert wrong_bytes(pool, s.device_indices, kv[:done]) == 0
        out.served += 1
    finally:
        if scheduler_api:
            s.finish()
        else:
            await s.__aexit__(None, None, None)


def prompts_for(rng: random.Random, n: int) -> list[tuple[list[int], str | None]]:
    """Prompts over two system prompts (not page-aligned), few questions so that several
    requests compute the same pages at once, and two tenants."""
    systems = [list(range(100, 100 + 3 * PS + 1)), list(range(300, 300 + 5 * PS + 2))]
    questions = [list(range(2000 + 50 * q, 2000 + 50 * q + 2 * PS + q)) for q in range(3)]
    out = []
    for _ in range(n):
        prompt = rng.choice(systems) + rng.choice(questions)
        if rng.random() < 0.3:
            prompt = prompt + list(range(7000, 7000 + rng.randint(1, 3 * PS)))
        out.append((prompt, rng.choice([None, None, "tenant-b"])))
    return out


async def run_workload(
    cache: HiCache, seed: int, *, n: int = 14, cancel: bool = True
) -> tuple[Outcomes, list[tuple[list[int], str | None]]]:
    rng = random.Random(seed)
    out = Outcomes()
    plans = prompts_for(rng, n)

    async def one(i: int, prompt: list[int], extra_key: str | None) -> None:
        r = random.Random(seed * 1000 + i)
        for _ in range(r.randint(0, 60)):  # arrivals spread over the others' steps
            await anyio.lowlevel.checkpoint()
        at = r.randint(1, 12) if cancel and r.random() < 0.3 else 0
        coro = chat_request(
            cache,
            prompt,
            extra_key,
            r,
            out,
            decode_n=r.choice([0, 1, PS + 1]),
            scheduler_api=r.random() < 0.35,
        )
        try:
            with anyio.CancelScope() as scope:
                await CancelAtSuspension(coro, scope, at)
            if scope.cancelled_caught:
                out.cancelled += 1
        except CapacityError:
            out.refused += 1

    with anyio.fail_after(HANG_GUARD_S):
        async with anyio.create_task_group() as tg:
            for i, (prompt, extra_key) in enumerate(plans):
                tg.start_soon(one, i, prompt, extra_key)
    assert out.served + out.refused + out.cancelled == n, "a request neither ended nor failed"
    await settled(cache)
    return out, plans


async def verify_hits(cache: HiCache, plans: list[tuple[list[int], str | None]]) -> int:
    """Every prompt again, one at a time: whatever hits reads back bit-exact."""
    hits = 0
    for prompt, extra_key in plans:
        kv = kv_of(prompt, extra_key)
        async with cache.session(prompt, extra_key) as s:
            await s.prefetch()
            hit = await s.load()
            assert wrong_bytes(cache.device_pool, hit.device_indices, kv[: hit.length]) == 0
            hits += int(hit.length)
    await settled(cache)
    return hits


@pytest.mark.one_loop
@pytest.mark.parametrize("seed", [1, 2])
async def test_concurrent_chunked_prefills_over_shared_prefixes_stay_bit_exact(seed: int) -> None:
    async with HiCache.open(config(device_pages=48, write_policy="write_through")) as cache:
        out, plans = await run_workload(cache, seed)
        assert out.served > 0
        assert await verify_hits(cache, plans) > 0


@pytest.mark.one_loop
async def test_without_cancellation_same_prompts_switch_page_tables() -> None:
    """Requests that compute the same pages at once: the later commits switch to the tree's
    pages (their own freed), and everything still reads back bit-exact."""
    async with HiCache.open(config(device_pages=96)) as cache:
        out, plans = await run_workload(cache, 3, n=12, cancel=False)
        assert out.served + out.refused == 12
        assert out.switched > 0, "no request found pages another inserted first"
        await verify_hits(cache, plans)


@pytest.mark.one_loop
async def test_write_back_file_l3_with_copy_faults_and_cancellation(tmp_path: Path) -> None:
    """write_back over a file L3, a small L1 (evictions back victims up first), L1 <-> L2
    copies failing and running late at random, requests cancelled at random awaits. Then a
    fresh cache reads the L3 pages back bit-exact."""

    def faulty(inner: TransferEngine) -> TransferEngine:
        return FaultyTransferEngine(inner, fail_rate=0.05, slow_rate=0.3, delay=0.001, seed=7)

    cfg = file_config(
        tmp_path, device_pages=32, host_pages=48, write_policy="write_back"
    ).model_copy(update={"prefetch_policy": "best_effort"})
    async with HiCache.open(cfg, wrap_engine=faulty) as cache:
        out, plans = await run_workload(cache, 4, n=14)
        assert out.served > 0
        await verify_hits(cache, plans)
        await cache.ensure_device_room(cache.l1.allocator.usable)  # push the rest down to L2/L3
        await settled(cache)
    fresh_cfg = cfg.model_copy(update={"prefetch_policy": "wait_complete"})
    async with HiCache.open(fresh_cfg) as cache:
        assert await verify_hits(cache, plans) > 0, "nothing came back from L3"


def test_the_workload_on_trio() -> None:
    async def main() -> None:
        async with HiCache.open(config(device_pages=40, write_policy="write_back")) as cache:
            out, plans = await run_workload(cache, 5, n=12)
            assert out.served > 0
            await verify_hits(cache, plans)

    anyio.run(main, backend="trio")


@pytest.mark.one_loop
@pytest.mark.parametrize("write_policy", ["write_through", "write_back"])
async def test_two_requests_on_one_prompt_cancelled_at_every_await(write_policy: str) -> None:
    """a and b chunk-prefill the same prompt (b's commits switch to a's pages); b is cut at
    each of its suspensions in turn: a is always served bit-exact and nothing leaks."""
    prompt = list(range(500, 500 + 6 * PS + 3))
    kv = kv_of(prompt)

    async def pair(at: int) -> int:
        async with HiCache.open(config(device_pages=24, write_policy=write_policy)) as cache:
            await fill(cache, prompt[: 2 * PS])  # a cached prefix, then evicted to L2
            await cache.drain()
            await cache.ensure_device_room(cache.l1.allocator.usable)
            cache.device_tier.evict(cache.l1.allocator.usable)
            counted = 0

            async def request(chunk: int, cut: int) -> None:
                nonlocal counted
                out = Outcomes()

                async def go() -> None:
                    rng = random.Random(chunk)
                    await chat_request(
                        cache, prompt, None, rng, out, decode_n=2, scheduler_api=False
                    )

                with anyio.CancelScope() as scope:
                    step = CancelAtSuspension(go(), scope, cut)
                    await step
                if not cut:
                    counted = step.suspensions
                    assert out.served == 1

            with anyio.fail_after(HANG_GUARD_S):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(request, 1, 0)
                    tg.start_soon(request, 2, at)
            await settled(cache)
            async with cache.session(prompt) as s:
                hit = await s.load()
                assert hit.length == len(prompt) // PS * PS
                assert wrong_bytes(cache.device_pool, hit.device_indices, kv[: hit.length]) == 0
            await settled(cache)
            return counted

    total = await pair(0)
    assert total >= 4
    for at in range(1, total + 3):
        await pair(at)


# -- commits: wrong, reordered, reused slots -------------------------------------------------


async def test_wrong_reordered_and_reused_slots_are_refused_and_change_nothing() -> None:
    prompt = list(range(40, 40 + 4 * PS))
    kv = kv_of(prompt)
    async with HiCache.open(config()) as cache:
        async with cache.session(list(range(9000, 9000 + 4 * PS))) as other:
            await other.load()
            foreign = await other.allocate(PS)
            async with cache.session(prompt) as s:
                await s.load()
                a = await s.allocate(2 * PS)
                b = await s.allocate(2 * PS)
                used = cache.l1.allocator.used
                bad: list[object] = [
                    a.flip(0),  # reordered
                    b,  # not the next tokens
                    foreign,  # another session's
                    a.to(torch.int32),
                    a.view(2, PS),
                    a.tolist(),
                    torch.empty(2 * PS, dtype=torch.int64, device="meta"),
                    torch.cat([a, b, b]),  # past the request
                    a[1:],  # not from the first one
                ]
                for slots in bad:
                    with pytest.raises(HiCacheError):
                        await s.commit(slots)  # type: ignore[arg-type]
                    with pytest.raises(HiCacheError):
                        s.commit_nowait(slots)  # type: ignore[arg-type]
                assert cache.l1.allocator.used == used
                assert s._done == 0
                write_kv(cache.device_pool, a, kv[: 2 * PS])
                write_kv(cache.device_pool, b, kv[2 * PS :])
                await s.commit(a.clone())  # equal values: accepted
                for slots in (a, a.clone(), torch.cat([a, b])):  # reused
                    with pytest.raises(HiCacheError):
                        await s.commit(slots)
                assert s.commit_nowait(b[:0]) == 0  # an empty commit is a no-op
                s.commit_nowait(b)
                assert wrong_bytes(cache.device_pool, s.device_indices, kv) == 0
                with pytest.raises(HiCacheError):
                    s.commit_nowait(b)
        await settled(cache)
        assert cache.tree.total_size(RadixTier.DEVICE) == len(prompt)


async def test_slots_handed_before_a_page_table_switch_commit_after_it() -> None:
    """b allocates its whole prompt, a commits the first half first: b's commit of that half
    frees its pages and switches to a's; b's later slots (handed before) still commit."""
    prompt = list(range(600, 600 + 6 * PS + 2))
    kv = kv_of(prompt)
    async with HiCache.open(config()) as cache:
        async with cache.session(prompt) as a, cache.session(prompt) as b:
            await a.load()
            await b.load()
            sb = await b.allocate(len(prompt))
            write_kv(cache.device_pool, sb, kv)
            sa = await a.allocate(3 * PS + 1)
            write_kv(cache.device_pool, sa, kv[: 3 * PS + 1])
            await a.commit(sa)
            assert await b.commit(sb[: 3 * PS + 3]) == 3 * PS
            assert torch.equal(b.device_indices[: 3 * PS], a.device_indices[: 3 * PS])
            assert await b.commit(sb[3 * PS + 3 :]) == 0
            assert wrong_bytes(cache.device_pool, b.device_indices, kv) == 0
            rest = await a.allocate(len(prompt) - 3 * PS - 1)  # a goes on: b was first now
            write_kv(cache.device_pool, rest, kv[3 * PS + 1 :])
            assert await a.commit(rest) == 3 * PS
            assert wrong_bytes(cache.device_pool, a.device_indices, kv) == 0
        await settled(cache)
        assert cache.tree.total_size(RadixTier.DEVICE) == len(prompt) // PS * PS


async def test_commit_into_a_prefix_that_went_to_l2_meanwhile() -> None:
    """b computes a prefix that a inserted and that was evicted to L2 while b computed: b's
    commit gives the host-only nodes its device pages back (bit-exact, nothing leaked)."""
    prompt = list(range(800, 800 + 5 * PS))
    kv = kv_of(prompt)
    async with HiCache.open(config(device_pages=32)) as cache:
        async with cache.session(prompt) as b:
            await b.load()
            slots = await b.allocate(len(prompt))
            write_kv(cache.device_pool, slots, kv)
            await fill(cache, prompt[: 3 * PS])
            await cache.drain()
            cache.device_tier.evict(cache.l1.allocator.usable)
            assert cache.tree.match_prefix(cache.key(prompt)).host_hit_length == 3 * PS
            await b.commit(slots)
            assert wrong_bytes(cache.device_pool, b.device_indices, kv) == 0
        await settled(cache)
        async with cache.session(prompt) as s:
            hit = await s.load()
            assert hit.length == len(prompt)
            assert wrong_bytes(cache.device_pool, hit.device_indices, kv) == 0
        await settled(cache)


# -- extend: after the end, bad tokens ---------------------------------------------------------


async def test_extend_refuses_bad_tokens_and_ended_sessions() -> None:
    async with HiCache.open(config()) as cache:
        async with cache.session(list(range(8))) as s:
            for bad in (
                [-1],
                [2**31],
                [1.5],
                torch.tensor([True, False]),
                torch.tensor([1.0]),
                torch.tensor([-3]),
                torch.tensor(5),
                torch.zeros(2, 2, dtype=torch.int64),
                torch.empty(2, dtype=torch.int64, device="meta"),
                np.array([2**63], dtype=np.uint64),
                np.array([True]),
                b"abc",
                None,
                [*list(range(100)), -1],
            ):
                with pytest.raises(HiCacheError):
                    s.extend(bad)  # type: ignore[arg-type]
            assert len(s.key) == 8
            s.extend([])
            assert len(s.key) == 8
        for ended in (s, cache.session([1, 2])):  # finished; never entered
            with pytest.raises(HiCacheError):
                ended.extend([1])
        aborted = cache.session(list(range(8))).enter()
        await aborted.load()
        aborted.abort()
        with pytest.raises(HiCacheError):
            aborted.extend([1])
        with pytest.raises(HiCacheError):
            aborted.try_allocate(1)
        await settled(cache)


async def test_extend_refuses_unordered_token_containers() -> None:
    """A set's or a dict's order is arbitrary: refused. (A bool inside a list is taken as 0
    or 1, as Python's ints do: checking each element's type would double the cost of every
    list prompt; a bool tensor or numpy array is refused.)"""
    async with HiCache.open(config()) as cache, cache.session(list(range(8))) as s:
        for bad in ({1, 2}, {1: 2}, frozenset([3])):
            with pytest.raises(HiCacheError):
                s.extend(bad)  # type: ignore[arg-type]
        with pytest.raises(HiCacheError):
            cache.session({1, 2, 3})  # type: ignore[arg-type]
        assert len(s.key) == 8


# -- allocate: counts, sizes and timeouts ------------------------------------------------------


async def test_allocate_zero_and_huge() -> None:
    async with HiCache.open(config(device_pages=16)) as cache:
        async with cache.session(list(range(64 * PS))) as s:
            await s.load()
            assert (await s.allocate(0)).numel() == 0
            assert s.allocate_nowait(0).numel() == 0
            assert cache.l1.allocator.used == 0
            for bad in (-1, 1.0, True, None, "1", torch.tensor(3)):
                with pytest.raises(LayoutError):
                    await s.allocate(bad)  # type: ignore[arg-type]
            with pytest.raises(LayoutError, match="extend"):
                await s.allocate(64 * PS + 1)  # past the key
            with pytest.raises(CapacityError):
                await s.allocate(17 * PS)  # more than L1 has: at once, no timeout
            with pytest.raises(CapacityError):
                s.allocate_nowait(17 * PS)
            with pytest.raises(CapacityError):
                s.try_allocate(17 * PS)  # can never fit: not "no room now"
            assert cache.l1.allocator.used == 0
            got = await s.allocate(16 * PS)  # all of L1
            assert got.numel() == 16 * PS
            with pytest.raises(CapacityError):
                s.try_allocate(1)  # it holds all of L1: never, not "not now"
        await settled(cache)


# Was broken: an allocation of more pages than L1 has reserves before it checks: the
# reservation evicts every evictable L1 page (lost without L2) and only then is refused",
async def test_an_allocation_larger_than_l1_evicts_nothing() -> None:
    async with HiCache.open(config(device_pages=16, host_pages=0)) as cache:
        prefix = list(range(10, 10 + 8 * PS))
        await fill(cache, prefix)
        async with cache.session(list(range(5000, 5000 + 40 * PS))) as s:
            await s.load()
            with pytest.raises(CapacityError):
                await s.allocate(17 * PS)
            with pytest.raises(CapacityError):
                s.allocate_nowait(17 * PS)
            with pytest.raises(CapacityError):
                s.try_allocate(17 * PS)
        await settled(cache)
        assert cache.tree.total_size(RadixTier.DEVICE) == len(prefix), "the cache was emptied"


async def test_a_hit_cut_by_limit_then_recomputed_switches_to_the_trees_page() -> None:
    """SGLang's pattern: load(limit=len - 1) so the model computes the last token; the
    recomputed last page is already in the tree, so the commit frees it and uses the tree's."""
    prompt = list(range(70, 70 + 4 * PS))
    kv = kv_of(prompt)
    async with HiCache.open(config()) as cache:
        await fill(cache, prompt)
        used = cache.l1.allocator.used
        async with cache.session(prompt) as s:
            hit = await s.load(limit=len(prompt) - 1)
            assert hit.length == 3 * PS
            slots = await s.allocate(PS)
            write_kv(cache.device_pool, slots, kv[3 * PS :])
            assert await s.commit(slots) == PS
            assert cache.l1.allocator.used == used
            assert wrong_bytes(cache.device_pool, s.device_indices, kv) == 0
            s.extend([9, 10])  # and decodes on from there
            more = await s.allocate(2)
            write_kv(cache.device_pool, more, kv_of([*prompt, 9, 10])[-2:])
            await s.commit(more)
        await settled(cache)
        assert cache.l1.allocator.used == used


@pytest.mark.parametrize("wait_s", [0, 0.0, -1.0, -math.inf])
async def test_an_expired_timeout_refuses_at_once_and_leaves_the_queue(wait_s: float) -> None:
    async with HiCache.open(config(device_pages=16)) as cache:
        h = await holder(cache, 16)
        idle = cache.session([1, 2, 3]).enter()  # open, not waiting: no deadlock to report
        async with cache.session(list(range(500, 540))) as s:
            await s.load()
            with pytest.raises(CapacityError, match="waited"):
                await s.allocate(8, timeout=wait_s)
            assert cache.room.waiting == 0
            h.close()
            assert (await s.allocate(8, timeout=wait_s)).numel() == 8  # room now: served
        idle.close()
        await settled(cache)


async def test_an_infinite_timeout_waits_until_room_comes() -> None:
    async with HiCache.open(config(device_pages=16)) as cache:
        h = await holder(cache, 16)
        got: list[torch.Tensor] = []

        async def waiter() -> None:
            async with cache.session(list(range(500, 540))) as s:
                await s.load()
                got.append(await s.allocate(8, timeout=math.inf))

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                assert not got
                assert cache.room.waiting == 1
                h.close()
        assert got[0].numel() == 8
        await settled(cache)


# Was broken: allocate(timeout=nan/'1') is not checked at the edge: it is accepted while L1 has
# room, and raises a builtin ValueError/TypeError from anyio once the request must wait",
@pytest.mark.parametrize("wait_s", [math.nan, "1"])
async def test_a_bad_timeout_is_our_error_whether_or_not_l1_has_room(wait_s: Any) -> None:
    async with HiCache.open(config(device_pages=16)) as cache, cache.session(list(range(40))) as s:
        await s.load()
        with pytest.raises(HiCacheError):
            await s.allocate(8, timeout=wait_s)  # room now: still a bad argument


# -- waiting for room: FIFO, cancellation, close ------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
async def test_waiters_cancelled_at_random_never_stall_the_queue(seed: int) -> None:
    """Eight requests wait for room behind eight holders of two pages each; some are
    cancelled at random moments, some sessions closed from outside; the holders end one at a
    time. Every other request is served, in arrival order."""
    rng = random.Random(seed)
    async with HiCache.open(config(device_pages=16)) as cache:
        holders = [await holder(cache, 2, base=100_000 + 1000 * j) for j in range(8)]
        served: list[int] = []
        ended: list[int] = []
        sessions: dict[int, Session] = {}
        scopes: dict[int, anyio.CancelScope] = {}

        async def waiter(i: int, pages: int) -> None:
            with anyio.CancelScope() as scope:
                scopes[i] = scope
                async with cache.session(list(range(1000 * (i + 1), 1000 * (i + 1) + 40))) as s:
                    sessions[i] = s
                    await s.load()
                    try:
                        slots = await s.allocate(pages * PS)
                    except HiCacheError:
                        assert s.state.value == "closed"
                        ended.append(i)
                        return
                    served.append(i)
                    await anyio.lowlevel.checkpoint()
                    await s.commit(slots)
            ended.append(i)

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(waiter, i, rng.choice([1, 2, 4]))
                    await anyio.wait_all_tasks_blocked()
                assert cache.room.waiting == 8
                gone: set[int] = set()
                for i in rng.sample(range(8), 4):
                    (scopes[i].cancel if rng.random() < 0.5 else sessions[i].close)()
                    gone.add(i)
                    await anyio.wait_all_tasks_blocked()
                for h in holders:
                    h.close()
                    await anyio.wait_all_tasks_blocked()
        assert sorted(ended) == list(range(8))
        assert served == sorted(set(range(8)) - gone), "not first come, first served"
        await settled(cache)


async def test_closing_the_head_or_a_middle_waiter_wakes_the_next() -> None:
    async with HiCache.open(config(device_pages=16)) as cache:
        h = await holder(cache, 12)
        sessions: list[Session] = []
        outcome: dict[int, str] = {}

        async def waiter(i: int, pages: int) -> None:
            s = cache.session(list(range(1000 * (i + 1), 1000 * (i + 1) + 40))).enter()
            sessions.append(s)
            await s.load()
            try:
                await s.allocate(pages * PS)
                outcome[i] = "served"
            except CapacityError:
                outcome[i] = "refused"
            except HiCacheError:
                outcome[i] = "closed"
            finally:
                s.close()

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                for i, pages in enumerate([8, 6, 2]):  # none fits in the 4 free pages
                    tg.start_soon(waiter, i, pages)
                    await anyio.wait_all_tasks_blocked()
                sessions[0].close()  # the head: 1 becomes the head, still short
                await anyio.wait_all_tasks_blocked()
                assert outcome == {0: "closed"}
                sessions[1].close()  # now 2 is the head, and its 2 pages fit
                await anyio.wait_all_tasks_blocked()
                assert outcome == {0: "closed", 1: "closed", 2: "served"}
        h.close()
        await settled(cache)


async def _two_waiters_then_leave(cache: HiCache, leaver: Session, prefix: list[int]) -> None:
    """Two requests that hold the rest of L1 wait for more (each would fit beside its own
    pages) while ``leaver`` is the only other open request; it leaves: now no room can ever
    come, and both are told at once instead of waiting for ever."""
    sessions = []
    for base, hold in ((50_000, 4), (60_000, 16 - len(prefix) // PS - 4)):
        s = cache.session([*prefix, *range(base, base + (hold + 3) * PS)]).enter()
        await s.load()
        s.allocate_nowait(hold * PS)
        sessions.append(s)
    assert cache.l1.allocator.available == 0
    outcome: list[str] = []

    async def ask(s: Session, pages: int) -> None:
        try:
            await s.allocate(pages * PS)
            outcome.append("served")
        except CapacityError:
            outcome.append("refused")

    with anyio.fail_after(HANG_GUARD_S):
        async with anyio.create_task_group() as tg:
            for s, pages in zip(sessions, (3, 1), strict=True):
                tg.start_soon(ask, s, pages)
                await anyio.wait_all_tasks_blocked()
            assert cache.room.waiting == 2
            assert not outcome
            leaver.close()
            await anyio.wait_all_tasks_blocked()
            pending = not outcome
            if pending:
                tg.cancel_scope.cancel()  # the test's own cleanup of a hung waiter
            else:  # the head was refused and holds its pages: the other waits for them
                assert outcome == ["refused"]
                sessions[0].close()
    for s in sessions:
        s.close()
    assert not pending, "the head still waits though no room can ever come"
    assert outcome == ["refused", "served"]


async def test_an_idle_request_leaving_lets_the_deadlock_be_seen() -> None:
    """The only other open request holds nothing and leaves."""
    async with HiCache.open(config(device_pages=16)) as cache:
        idle = cache.session(list(range(9000, 9010))).enter()
        await _two_waiters_then_leave(cache, idle, [])
        await settled(cache)


async def test_try_allocate_racing_waiters_takes_room_but_the_waiters_are_served() -> None:
    """try_allocate does not queue: a scheduler's running request takes freed pages before
    the waiting new one; the waiter is served once that request ends."""
    async with HiCache.open(config(device_pages=16)) as cache:
        h = await holder(cache, 16)
        runner = cache.session(list(range(7000, 7000 + 16 * PS))).enter()
        await runner.load()
        got: list[torch.Tensor] = []

        async def waiter() -> None:
            async with cache.session(list(range(500, 540))) as s:
                await s.load()
                got.append(await s.allocate(4 * PS))

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                h.close()  # 16 pages back: the runner grabs 14 in the same step
                taken = runner.try_allocate(14 * PS)
                assert taken is not None
                await anyio.wait_all_tasks_blocked()
                assert not got
                assert cache.room.waiting == 1
                runner.finish()
        assert got[0].numel() == 4 * PS
        await settled(cache)


def slow_copies(inner: TransferEngine) -> TransferEngine:
    return FaultyTransferEngine(inner, fail_rate=0.0, slow_rate=1.0, delay=0.02, seed=1)


async def test_every_request_waiting_while_a_backup_is_in_flight_is_no_deadlock() -> None:
    """write_through: the only open request holds 12 pages and waits for more while the
    other 4 are pinned by a backup in flight: not refused, served once the copy lands."""
    async with HiCache.open(config(device_pages=16), wrap_engine=slow_copies) as cache:
        prompt = list(range(40, 40 + 4 * PS))
        await fill(cache, prompt)  # its backup is queued: the copy runs late
        assert cache._backups_pending.count == 4
        outcome: list[str] = []

        async def greedy() -> None:
            async with cache.session(list(range(500, 500 + 14 * PS))) as s:
                await s.load()
                s.allocate_nowait(12 * PS)
                try:
                    await s.allocate(2 * PS)
                    outcome.append("served")
                except CapacityError:
                    outcome.append("refused")

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(greedy)
        assert outcome == ["served"]
        await settled(cache)
        async with cache.session(prompt) as s:  # evicted from L1 after its backup: on L2
            hit = await s.load()
            assert hit.length == len(prompt)
            assert wrong_bytes(cache.device_pool, hit.device_indices, kv_of(prompt)) == 0
        await settled(cache)


async def allocate_behind_slow_victim_backups(wait_s: float) -> Outcomes:
    """write_back: L1 full of one-page requests with no host copy, copies slow; a decode-like
    allocate(timeout=) after extend() must back victims up first, and is cut wherever the
    deadline lands (before, inside or after the copy): served or refused, nothing leaked or
    lost."""
    prompts = [list(range(1000 * i, 1000 * i + PS)) for i in range(1, 17)]
    cfg = config(device_pages=16, host_pages=32, write_policy="write_back")
    out = Outcomes()
    async with HiCache.open(cfg, wrap_engine=slow_copies) as cache:
        for prompt in prompts:
            await fill(cache, prompt)
        idle = cache.session([1, 2, 3]).enter()  # a wait is no deadlock: the timeout ends it
        async with cache.session([5000]) as s:
            await s.load()  # makes room for its one page only
            s.extend(list(range(5001, 5001 + 4 * PS)))
            with anyio.fail_after(HANG_GUARD_S):
                try:
                    slots = await s.allocate(4 * PS, timeout=wait_s)
                except CapacityError as exc:
                    refusal = str(exc)
                    out.refused += 1
                else:
                    refusal = ""
                    out.served += 1
                    assert slots.numel() == 4 * PS
            assert not refusal or "waited" in refusal  # the timeout's, not a deadlock's
        idle.close()
        await settled(cache)
        for prompt in prompts:  # each still reads back bit-exact, from L1 or L2
            async with cache.session(prompt) as s:
                hit = await s.load()
                assert hit.length == PS, "a page with no host copy was lost"
                assert wrong_bytes(cache.device_pool, hit.device_indices, kv_of(prompt)) == 0
        await settled(cache)
    return out


@pytest.mark.parametrize("wait_s", [0.0, 0.001, 0.005, 0.03, 0.2])
async def test_a_timeout_landing_inside_a_victims_backup_rolls_back(wait_s: float) -> None:
    out = await allocate_behind_slow_victim_backups(wait_s)
    assert out.served + out.refused == 1


async def test_commit_nowait_needs_the_load_and_the_scheduler_verbs_balance() -> None:
    prompt = list(range(50, 50 + 3 * PS + 1))
    kv = kv_of(prompt)
    async with HiCache.open(config()) as cache:
        s = cache.session(prompt).enter()
        with pytest.raises(HiCacheError, match="load"):
            s.commit_nowait(torch.empty(0, dtype=torch.int64))
        with pytest.raises(HiCacheError):
            s.enter()  # entered once
        early = s.try_allocate(PS)  # before the load: counted from 0, moved past the hit
        assert early is not None
        with pytest.raises(HiCacheError, match="load"):
            s.commit_nowait(early)
        await s.load()
        write_kv(cache.device_pool, early, kv[:PS])
        s.commit_nowait(early)
        rest = s.try_allocate(len(prompt) - PS)
        assert rest is not None
        write_kv(cache.device_pool, rest, kv[PS:])
        s.commit_nowait(rest)
        assert wrong_bytes(cache.device_pool, s.device_indices, kv) == 0
        s.finish()
        s.abort()  # idempotent
        s.finish()
        assert cache._sessions_open == 0
        await settled(cache)


async def test_sessions_used_after_the_cache_closed() -> None:
    cache = HiCache(config())
    async with cache:
        s = cache.session(list(range(8 * PS))).enter()
        await s.load()
        slots = await s.allocate(2 * PS)
        t = cache.session(list(range(900, 900 + 2 * PS))).enter()
    with pytest.raises(ClosedError):
        await s.allocate(1)
    with pytest.raises(ClosedError):
        s.try_allocate(1)
    with pytest.raises(ClosedError):
        s.allocate_nowait(1)
    with pytest.raises(ClosedError):
        await s.commit(slots)
    with pytest.raises(ClosedError):
        s.commit_nowait(slots)
    with pytest.raises(ClosedError):
        s.extend([1])
    with pytest.raises(ClosedError):
        await t.load()
    with pytest.raises(ClosedError):
        cache.session([1])
    s.finish()  # releasing never raises
    t.abort()
    assert cache._sessions_open == 0


# -- defects -----------------------------------------------------------------------------------


# Was broken: allocate(n) that needs no new page (it fits the session's partial last page)
# still queues behind waiters; with every open request then waiting, the head is refused  as a
# deadlock although it would be served once the decoding request ends",
async def test_a_decode_step_that_fits_the_last_page_does_not_queue() -> None:
    async with HiCache.open(config(device_pages=16)) as cache:
        decoding = cache.session(list(range(100))).enter()
        await decoding.load()
        await decoding.allocate(16 * PS - 2)  # all of L1, the last page half full
        outcome: list[str] = []

        async def newcomer() -> None:
            async with cache.session(list(range(500, 540))) as s:
                await s.load()
                try:
                    await s.allocate(8)
                    outcome.append("served")
                except CapacityError:
                    outcome.append("refused")

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(newcomer)
                await anyio.wait_all_tasks_blocked()
                assert cache.room.waiting == 1
                slot = await decoding.allocate(1)  # no page needed
                assert slot.numel() == 1
                await anyio.wait_all_tasks_blocked()
                assert outcome == [], "the newcomer was refused though room will come"
                decoding.finish()
        assert outcome == ["served"]
        await settled(cache)


# Was broken: a request waiting in allocate() for room is never woken when the cache closes:  it
# waits for ever instead of raising ClosedError",
async def test_a_wait_for_room_ends_when_the_cache_closes() -> None:
    outcome: list[str] = []
    async with anyio.create_task_group() as tg:
        cache = HiCache(config(device_pages=16))
        await cache.__aenter__()
        h = await holder(cache, 16)
        idle = cache.session([1, 2, 3]).enter()

        async def waiter() -> None:
            s = cache.session(list(range(500, 540))).enter()
            await s.load()
            try:
                await s.allocate(8)
                outcome.append("served")
            except ClosedError:
                outcome.append("closed")
            finally:
                s.close()

        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert cache.room.waiting == 1
        await cache.aclose()
        await anyio.wait_all_tasks_blocked()
        pending = not outcome
        tg.cancel_scope.cancel()  # the test's own cleanup of a hung waiter
    h.close()
    idle.close()
    assert not pending, "the waiter still waits after the cache closed"
    assert outcome == ["closed"]


# Was broken: the no-room-ever check compares the request with all of L1 only: a request that
# holds 10 of 16 pages and asks 10 more can never be served, but waits as long as any  other
# request is open (its own pages cannot come back while it waits)",
async def test_an_allocation_that_cannot_fit_beside_its_own_pages_fails_at_once() -> None:
    async with HiCache.open(config(device_pages=16)) as cache:
        idle = cache.session([1, 2, 3]).enter()  # open for as long as it likes
        outcome: list[str] = []

        async def request() -> None:
            async with cache.session(list(range(500, 500 + 30 * PS))) as s:
                await s.load()
                await s.allocate(10 * PS)
                try:
                    await s.allocate(10 * PS)
                    outcome.append("served")
                except CapacityError:
                    outcome.append("refused")

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(request)
                await anyio.wait_all_tasks_blocked()
                pending = not outcome
                idle.close()
        assert not pending, "it waited for room that can never come"
        await settled(cache)


async def test_a_request_sharing_a_prefix_leaving_lets_the_deadlock_be_seen() -> None:
    """Was broken: the leaving request holds no pages of its own and its locked prefix is
    locked by a waiter too, so its leaving neither frees nor unlocks anything, and nothing
    woke the head to see that every open request now waits (it waited for ever)."""
    async with HiCache.open(config(device_pages=16)) as cache:
        shared = list(range(10, 10 + 2 * PS))
        await fill(cache, shared)
        reader = cache.session([*shared, 1, 2, 3]).enter()  # locks the shared prefix only
        await _two_waiters_then_leave(cache, reader, shared)  # the waiters lock it too
        await settled(cache)


# Was broken: write_back: try_allocate/allocate_nowait evict synchronously and L1 never evicts
# a page without a host copy, and nothing backs victims up outside an await; a scheduler  loop's
# decode step finds no room for good while L1 is full of pages L2 has room for",
async def test_write_back_a_scheduler_step_finds_room_in_pages_l2_can_take() -> None:
    async with HiCache.open(
        config(device_pages=16, host_pages=32, write_policy="write_back")
    ) as cache:
        await fill(cache, list(range(1000, 1000 + 8 * PS)))  # finished requests: evictable
        await fill(cache, list(range(2000, 2000 + 6 * PS)))  # once backed up to L2
        prompt = list(range(3000, 3000 + 2 * PS))
        s = cache.session(prompt).enter()
        await s.load()  # makes room for the prompt (backing victims up)
        slots = s.try_allocate(len(prompt))
        assert slots is not None
        s.commit_nowait(slots)
        s.extend([5])
        got = s.try_allocate(1)  # a new page: none free
        for _ in range(3):  # the scheduler's next steps, the cache idle between them
            if got is not None:
                break
            await cache.drain()
            await anyio.wait_all_tasks_blocked()
            got = s.try_allocate(1)
        evictable = cache.tree.evictable_size(RadixTier.DEVICE) // PS
        s.finish()
        await settled(cache)
        assert evictable >= 1
        assert got is not None, "no room for good though L2 could take some"


# Was broken: room.waiting counts a waiter whose session was closed until its task resumes,
# while _sessions_open dropped it at close(): when another close woke the head first, the  head
# sees 'every open request waits' and is refused though a holder will free room",
async def test_closing_a_waiter_does_not_make_the_head_see_a_deadlock() -> None:
    async with HiCache.open(config(device_pages=16)) as cache:
        h = await holder(cache, 16)  # ends later and frees everything
        idle = cache.session(list(range(7000, 7004))).enter()
        outcome: dict[str, str] = {}
        sessions: dict[str, Session] = {}

        async def waiter(name: str, base: int) -> None:
            s = sessions[name] = cache.session(list(range(base, base + 40))).enter()
            await s.load()
            try:
                await s.allocate(8)
                outcome[name] = "served"
            except CapacityError:
                outcome[name] = "refused"
            except HiCacheError:
                outcome[name] = "closed"
            finally:
                s.close()

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter, "head", 500)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(waiter, "second", 600)
                await anyio.wait_all_tasks_blocked()
                idle.close()  # wakes the head (an unlock) ...
                sessions["second"].close()  # ... then a disconnect of the second waiter
                await anyio.wait_all_tasks_blocked()
                h.close()
        assert outcome == {"head": "served", "second": "closed"}
        await settled(cache)


# Was broken: allocate() counts its pages before it waits: when the same session takes slots
# meanwhile (try_allocate filling the partial page), it is handed fewer slots than asked  and
# its slot count runs past its pages",
async def test_allocate_hands_what_was_asked_after_the_session_allocated_meanwhile() -> None:
    async with HiCache.open(config(device_pages=16)) as cache:
        s = cache.session(list(range(500, 500 + 8 * PS))).enter()
        await s.load()
        await s.allocate(2)  # one page, half used
        h = await holder(cache, 15)
        idle = cache.session([1, 2, 3]).enter()
        got: list[torch.Tensor] = []

        async def waiting() -> None:
            got.append(await s.allocate(6))

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiting)
                await anyio.wait_all_tasks_blocked()
                with pytest.raises(HiCacheError, match="one allocation at a time"):
                    s.try_allocate(2)  # refused: the pending allocate() counted its pages
                h.close()
        s.close()
        idle.close()
        await settled(cache)
        assert got[0].numel() == 6


NAMESPACE = HiCacheStorageConfig(model_name=MODEL, layout_fingerprint=LAYOUT.fingerprint_digest)


async def _l2_pinned_by_stalled_l3_writes(
    tmp_path: Path,
) -> tuple[StallingStorage, HiCacheConfig]:
    stall = StallingStorage(create_storage("file", NAMESPACE, path=str(tmp_path)), rate=0.0)
    cfg = file_config(tmp_path, device_pages=16, host_pages=16, write_policy="write_back")
    return stall, cfg


async def _fill_l1_with_l2_pinned(cache: HiCache, stall: StallingStorage) -> None:
    """L1 full of unbacked pages, L2 full of pages whose L3 writes are stalled."""
    stall.paused = True
    for i in range(1, 5):  # each evicts the oldest: it moves to L2, its L3 write stalls
        await fill(cache, list(range(1000 * i, 1000 * i + 8 * PS)))
        await anyio.wait_all_tasks_blocked()
    assert cache.l1.allocator.available == 0
    assert cache.host_pool is not None
    assert cache.host_pool.allocator.available == 0
    assert stall.stalled
    assert cache.write_back is not None
    assert cache.write_back.pending.count


# Was broken: write_back: L2 full of pages whose L3 writes are in flight, so L1's victims
# cannot be backed up yet; _no_room_ever ignores write_back.pending and refuses at once  with
# 'every open request is waiting', though the writes landing make the room",
async def test_write_back_an_l3_write_in_flight_is_not_a_deadlock(tmp_path: Path) -> None:
    stall, cfg = await _l2_pinned_by_stalled_l3_writes(tmp_path)
    async with HiCache.open(cfg, storage=stall) as cache:
        await _fill_l1_with_l2_pinned(cache, stall)
        outcome: list[str] = []

        async def request() -> None:
            async with cache.session(list(range(5000, 5000 + 2 * PS))) as s:
                await s.load()
                try:
                    await s.allocate(2 * PS)
                    outcome.append("served")
                except CapacityError:
                    outcome.append("refused")

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(request)
                await anyio.wait_all_tasks_blocked()
                stall.paused = False
                stall.release()
        assert outcome == ["served"]
        await settled(cache)


# Was broken: write_back: a waiter is not woken when L3 writes land and unpin L2 (the room
# queue hears only L1 frees and unlocks), so it waits although its room could be made now",
async def test_write_back_a_waiter_is_woken_when_l3_writes_unpin_l2(tmp_path: Path) -> None:
    stall, cfg = await _l2_pinned_by_stalled_l3_writes(tmp_path)
    async with HiCache.open(cfg, storage=stall) as cache:
        await _fill_l1_with_l2_pinned(cache, stall)
        idle = cache.session([1, 2, 3]).enter()  # so that the wait is not a deadlock
        outcome: list[str] = []

        async def request() -> None:
            async with cache.session(list(range(5000, 5000 + 2 * PS))) as s:
                await s.load()
                await s.allocate(2 * PS)
                outcome.append("served")

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(request)
                await anyio.wait_all_tasks_blocked()
                assert cache.room.waiting == 1
                stall.paused = False
                stall.release()
                await cache.drain()
                await anyio.wait_all_tasks_blocked()
                pending = not outcome
                idle.close()  # wakes it either way (an unlock)
        assert not pending, "room could be made, but the waiter was not woken"
        await settled(cache)


async def test_write_back_a_waiter_is_served_once_l3_writes_land_and_a_request_ends(
    tmp_path: Path,
) -> None:
    """The guard beside the two defects above: with the writes landed, an L1 event wakes
    the waiter, its victims are backed up to L2 and it is served; nothing leaks."""
    stall, cfg = await _l2_pinned_by_stalled_l3_writes(tmp_path)
    async with HiCache.open(cfg, storage=stall) as cache:
        await _fill_l1_with_l2_pinned(cache, stall)
        idle = cache.session([1, 2, 3]).enter()
        outcome: list[str] = []

        async def request() -> None:
            tokens = list(range(5000, 5000 + 2 * PS))
            async with cache.session(tokens) as s:
                await s.load()
                slots = await s.allocate(2 * PS)
                write_kv(cache.device_pool, slots, kv_of(tokens))
                await s.commit(slots)
                outcome.append("served")

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(request)
                await anyio.wait_all_tasks_blocked()
                stall.paused = False
                stall.release()
                await cache.drain()
                idle.close()
        assert outcome == ["served"]
        await settled(cache)
        for i in range(1, 5):  # every request's pages still read back, from some tier
            tokens = list(range(1000 * i, 1000 * i + 8 * PS))
            async with cache.session(tokens) as s:
                await s.prefetch()
                hit = await s.load()
                assert wrong_bytes(cache.device_pool, hit.device_indices, kv_of(tokens)) == 0
        await settled(cache)
