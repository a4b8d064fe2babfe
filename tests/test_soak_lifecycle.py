"""The soak's request driver over the whole lifecycle, one request at a time.

Chunked prefill, decode, waiting for room and the scheduler-level API as the chaos soak drives
them (``hicache_async.testing._soak_requests``), on a small cache without faults: what each
request commits is bit-exact, the next turn hits the answer it decoded, waits and their
timeouts are counted, and the index is back at baseline after each. A defect the soak finds in
this lifecycle goes in here as ``xfail(strict=True)`` until its fix lands.
"""

from __future__ import annotations

import anyio
import pytest

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.errors import CapacityError
from hicache_async.radix import Tier as RadixTier
from hicache_async.testing._soak_kv import decode_tokens, expected_kv, prefix_hashes, write_kv
from hicache_async.testing._soak_requests import Ctx, Tally, _chunks, serve
from hicache_async.testing._soak_watch import InFlight
from hicache_async.testing._soak_workload import Prompts, RequestPlan, Workload

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", page_size=4)
PROMPT = [*range(1000, 1064), 7, 8, 9]  # 16 whole pages and 3 tokens
TENANT = "tenant-a"
APIS = ["session", "scheduler"]


def config(**kw: object) -> HiCacheConfig:
    options: dict[str, object] = {
        "layout": LAYOUT,
        "device": "cpu",
        "device_pages": 64,
        "host_pages": 128,
        "storage_backend": "none",
    }
    options.update(kw)
    return HiCacheConfig(**options)


def context(cache: HiCache) -> Ctx:
    return Ctx(cache, Tally(), InFlight(0, 0, "test", "", 0.0))


def assert_index_intact(cache: HiCache) -> None:
    tree, ps = cache.tree, cache.page_size
    tree.check()
    assert tree.protected_size(RadixTier.DEVICE) == 0
    assert tree.protected_size(RadixTier.HOST) == 0
    assert cache.l1.allocator.used == tree.total_size(RadixTier.DEVICE) // ps
    assert cache.room.waiting == 0


def test_chunks_cover_the_rest_in_turn() -> None:
    assert list(_chunks(10, ())) == [10]
    assert list(_chunks(0, ())) == [0]  # one commit, even of nothing
    assert list(_chunks(0, (3, 5))) == []
    assert list(_chunks(20, (3, 5))) == [3, 5, 3, 5, 3, 1]


def test_decoded_tokens_depend_on_the_tenant_and_the_prefix_only() -> None:
    out = decode_tokens(PROMPT, TENANT, 6)
    assert out == decode_tokens(PROMPT, TENANT, 6)
    assert all(1 <= token < 50_000 for token in out)
    assert decode_tokens(PROMPT, TENANT, 3) == out[:3]
    assert decode_tokens([*PROMPT, *out[:2]], TENANT, 4) == out[2:]  # one token at a time
    assert decode_tokens(PROMPT, None, 6) != out


def test_the_workload_draws_every_lifecycle_and_continues_with_the_answer() -> None:
    load = Workload(1, 3, Prompts.make(seed=3), scheduler_rate=0.5)
    plans = []
    for _ in range(200):
        plan = load.next()
        turn = load.current
        assert turn is not None
        before = list(plan.tokens)
        load.served(plan)
        if plan.decode and turn is load.current:
            answer = decode_tokens(before, plan.extra_key, plan.decode)
            assert turn.tokens == [*before, *answer]  # the next turn's prompt contains it
            assert turn.outputs[-1] == (len(before), len(before) + plan.decode)
        plans.append(plan)
    assert any(len(plan.chunks) > 1 for plan in plans)
    assert any(plan.decode for plan in plans)
    assert any(plan.outputs for plan in plans)
    assert {plan.api for plan in plans} == {"session", "scheduler"}
    assert any(plan.abort_after for plan in plans)
    assert len({plan.wait_s for plan in plans}) > 1


@pytest.mark.parametrize("api", APIS)
async def test_chunked_prefill_and_decode_then_the_next_turn_hits_the_answer(api: str) -> None:
    chunks, decode = (5, 13, 1), 7
    async with HiCache.open(config()) as cache:
        ctx = context(cache)
        first = RequestPlan(PROMPT, TENANT, chunks=chunks, decode=decode, api=api)
        assert await serve(ctx, first)
        counts, tally = ctx.tally.lifecycle, ctx.tally
        # A scheduler's hit leaves the last token to compute; the cache was empty: no hit.
        assert counts["prefill_commits"] == len(list(_chunks(len(PROMPT), chunks)))
        assert counts["decode_steps"] == decode
        assert counts["tables_checked"] == 1
        assert (tally.wrong_bytes, tally.wrong_tables) == (0, 0)
        answer = decode_tokens(PROMPT, TENANT, decode)
        end = len(PROMPT) + decode
        following = RequestPlan(
            [*PROMPT, *answer, 3, 3, 3], TENANT, api=api, outputs=((len(PROMPT), end),)
        )
        assert await serve(ctx, following)
        whole = end // LAYOUT.page_size * LAYOUT.page_size  # prompt + answer, whole pages
        assert tally.hit_tokens == whole
        assert counts["output_hit_tokens"] == whole - len(PROMPT)
        assert tally.hits_checked == 2
        assert (tally.wrong_bytes, tally.wrong_hits, tally.wrong_tables) == (0, 0, 0)
        assert counts["scheduler_finished" if api == "scheduler" else "allocations"] > 0
        await cache.drain()
        assert_index_intact(cache)


async def test_chunks_another_request_committed_first_switch_to_the_trees_pages() -> None:
    """Two requests prefill the same prompt in different chunks, interleaved (each chunk's
    "forward pass" yields to the loop): the second's commits find the first's pages, free its
    own and switch to the tree's, and its page table still holds the right bytes (checked at
    its end), as do the hits after. The decode step that fills the page the previous turn
    inserted does the same."""
    async with HiCache.open(config()) as cache:
        ctx = context(cache)
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve, ctx, RequestPlan(PROMPT, TENANT, chunks=(8,), decode=2))
            tg.start_soon(serve, ctx, RequestPlan(PROMPT, TENANT, chunks=(3, 9), decode=2))
        tally = ctx.tally
        assert tally.hit_tokens == 0  # both entered before anything was committed
        assert tally.lifecycle["tables_checked"] == 2
        assert tally.lifecycle["duplicate_tokens"] >= 64  # the whole prompt, at least
        assert (tally.wrong_bytes, tally.wrong_tables) == (0, 0)
        await cache.drain()
        assert_index_intact(cache)
        assert await serve(ctx, RequestPlan([*PROMPT, 1], TENANT))
        assert tally.hit_tokens == 64  # 16 whole pages
        assert tally.wrong_bytes == 0
        before = tally.lifecycle["duplicate_tokens"]
        # The next turn hits 16 pages, prefills its 17th page's first 3 tokens, and the decode
        # step that fills it finds it in the tree (the first turn decoded the same token).
        assert await serve(ctx, RequestPlan(PROMPT, TENANT, decode=1))
        assert tally.lifecycle["duplicate_tokens"] == before + 4
        assert (tally.wrong_bytes, tally.wrong_tables) == (0, 0)
        await cache.drain()
        assert_index_intact(cache)


async def test_a_scheduler_abort_keeps_the_whole_pages_it_committed() -> None:
    async with HiCache.open(config()) as cache:
        ctx = context(cache)
        plan = RequestPlan(PROMPT, TENANT, chunks=(6, 10), api="scheduler", abort_after=2)
        assert not await serve(ctx, plan)
        assert ctx.tally.lifecycle["scheduler_aborted"] == 1
        assert ctx.tally.lifecycle["scheduler_finished"] == 0
        match = cache.match_prefix(cache.key(PROMPT, extra_key=TENANT))
        assert match.device_hit_length == 16  # 6 + 10 tokens: 4 whole pages
        await cache.drain()
        assert_index_intact(cache)


async def _hold(
    cache: HiCache, tokens: list[int], entered: anyio.Event, leave: anyio.Event
) -> None:
    """A request that holds L1 pages (committed, locked) until ``leave`` is set."""
    kv = expected_kv(LAYOUT, prefix_hashes(tokens, None))
    async with cache.session(tokens) as s:
        await s.load()
        slots = await s.allocate(len(tokens))
        write_kv(cache.device_pool, slots, kv)
        await s.commit(slots)
        await cache.drain()  # its backup copied: nothing else pins L1 pages
        entered.set()
        await leave.wait()


@pytest.mark.parametrize("api", APIS)
async def test_a_wait_for_room_times_out_counted_then_is_served_when_a_request_leaves(
    api: str,
) -> None:
    held = list(range(5000, 5048))  # 12 of L1's 16 pages
    prompt = list(range(9000, 9032))  # needs 8
    async with HiCache.open(config(device_pages=16, host_pages=32)) as cache:
        ctx = context(cache)
        counts = ctx.tally.lifecycle
        entered, leave = anyio.Event(), anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_hold, cache, held, entered, leave)
            await entered.wait()
            short = RequestPlan(prompt, None, api=api, wait_s=0.1)
            if api == "session":
                with pytest.raises(CapacityError):
                    await serve(ctx, short)
                assert counts["allocate_waits"] == counts["allocate_wait_timeouts"] == 1
            else:
                assert not await serve(ctx, short)
                assert counts["scheduler_waits"] == counts["scheduler_retracted"] == 1
            assert_index_intact_but_held(cache, pages=12)
            served = []

            async def patient() -> None:
                served.append(await serve(ctx, RequestPlan(prompt, None, api=api, wait_s=30)))

            tg.start_soon(patient)
            await anyio.sleep(0.05)  # it waits (a checkpoint of the test is not enough)
            assert not served
            leave.set()  # the holder leaves: its pages become evictable, the waiter goes on
        assert served == [True]
        waited = "allocate_waits_served" if api == "session" else "scheduler_waits_served"
        assert counts[waited] == 1
        assert ctx.tally.wrong_bytes == 0
        await cache.drain()
        assert_index_intact(cache)


def assert_index_intact_but_held(cache: HiCache, pages: int) -> None:
    tree, ps = cache.tree, cache.page_size
    tree.check()
    assert tree.protected_size(RadixTier.DEVICE) == pages * ps
    assert cache.l1.allocator.used == tree.total_size(RadixTier.DEVICE) // ps
    assert cache.room.waiting == 0
