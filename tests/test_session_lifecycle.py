"""The whole request lifecycle in one session: chunked prefill, decode, finish and abort, and
waiting for L1 room (issue 18)."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.errors import CapacityError, HiCacheError, LayoutError
from hicache_async.radix import Tier as RadixTier
from hicache_async.session import Session
from hicache_async.testing._soak_kv import expected_kv, prefix_hashes, write_kv, wrong_bytes
from hicache_async.testing.soak import CancelAtSuspension

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", page_size=4)
PS = LAYOUT.page_size
HANG_GUARD_S = 60  # a liveness guard, not a speed check


def config(**kw: Any) -> HiCacheConfig:
    options: dict[str, Any] = {
        "layout": LAYOUT,
        "device": "cpu",
        "device_pages": 64,
        "host_pages": 128,
        "storage_backend": "none",
    }
    options.update(kw)
    return HiCacheConfig(**options)


def kv_of(tokens: list[int]) -> torch.Tensor:
    return expected_kv(LAYOUT, prefix_hashes(tokens, None))


async def settled(cache: HiCache) -> None:
    """Nothing locked, nothing leaked, the index consistent."""
    await cache.drain()
    cache.check()
    assert cache.tree.protected_size(RadixTier.DEVICE) == 0
    assert cache.l1.allocator.used == cache.tree.total_size(RadixTier.DEVICE) // PS


async def prefill(s: Session, kv: torch.Tensor, chunk: int) -> int:
    """Load the hit, then compute the rest of the key in chunks of ``chunk`` tokens; checks
    after each commit that the request's whole page table reads back bit-exact."""
    cache = s._cache
    hit = await s.load()
    assert wrong_bytes(cache.device_pool, hit.device_indices, kv[: hit.length]) == 0
    done = hit.length
    while done < len(s.key):
        n = min(chunk, len(s.key) - done)
        slots = await s.allocate(n)
        await anyio.lowlevel.checkpoint()  # the model's forward pass
        write_kv(cache.device_pool, slots, kv[done : done + n])
        await s.commit(slots)
        done += n
        assert wrong_bytes(cache.device_pool, s.device_indices, kv[:done]) == 0
    return int(hit.length)


async def decode(s: Session, output: list[int], kv: torch.Tensor) -> None:
    """Generate ``output`` one token at a time: extend, allocate one slot, write, commit."""
    cache = s._cache
    for token in output:
        s.extend([token])
        slot = await s.allocate(1)
        await anyio.lowlevel.checkpoint()  # the model's forward pass
        position = len(s.key) - 1
        write_kv(cache.device_pool, slot, kv[position : position + 1])
        await s.commit(slot)


# -- chunked prefill --------------------------------------------------------------------------


async def test_a_concurrent_request_hits_the_first_chunks_before_the_last_is_committed() -> None:
    prompt = list(range(1000, 1000 + 12 * PS))
    kv = kv_of(prompt)
    async with HiCache.open(config()) as cache:
        async with cache.session(prompt) as a:
            await a.load()
            first = await a.allocate(5 * PS + 2)  # five whole pages and a partial one
            write_kv(cache.device_pool, first, kv[: 5 * PS + 2])
            assert await a.commit(first) == 0
            # The whole pages are in the tree now; the partial one is still a's alone.
            async with cache.session(prompt) as b:
                hit = await b.load()
                assert hit.length == 5 * PS
                assert wrong_bytes(cache.device_pool, hit.device_indices, kv[: 5 * PS]) == 0
            rest = await a.allocate(len(prompt) - 5 * PS - 2)
            write_kv(cache.device_pool, rest, kv[5 * PS + 2 :])
            await a.commit(rest)
            assert torch.equal(a.device_indices, torch.cat([first, rest]))
            assert wrong_bytes(cache.device_pool, a.device_indices, kv) == 0
        await settled(cache)
        assert cache.tree.total_size(RadixTier.DEVICE) == len(prompt)


async def test_the_partial_last_page_is_filled_before_a_new_page_is_taken() -> None:
    async with HiCache.open(config()) as cache:
        async with cache.session(list(range(20))) as s:
            await s.load()
            used = cache.l1.allocator.used
            slots = [await s.allocate(1) for _ in range(PS)]  # one page, token by token
            assert cache.l1.allocator.used == used + 1
            assert torch.equal(torch.cat(slots) // PS, torch.full((PS,), int(slots[0]) // PS))
            await s.allocate(1)
            assert cache.l1.allocator.used == used + 2
        await settled(cache)
        assert cache.l1.allocator.used == 0  # nothing committed: all freed


async def test_decode_steps_hand_out_the_slots_of_their_pages_across_commits() -> None:
    """A decode step's slot is a slice of the session's own pages; after a commit inserts
    a full page, the next step's slots are those of the page taken after it."""
    async with HiCache.open(config()) as cache:
        async with cache.session(list(range(6))) as s:
            await s.load()
            await s.commit(await s.allocate(6))
            handed = []
            for token in range(100, 100 + 3 * PS):
                s.extend([token])
                slot = await s.allocate(1)
                handed.append(slot)
                await s.commit(slot)
                assert torch.equal(s.device_indices[-1:], slot)
            slots = torch.cat(handed)
            assert slots.unique().numel() == slots.numel()
            assert torch.equal(s.device_indices[6:], slots)
        await settled(cache)
        assert cache.tree.total_size(RadixTier.DEVICE) == (6 + 3 * PS) // PS * PS


async def test_two_requests_prefilling_one_prompt_share_the_pages_of_the_first() -> None:
    """b's chunks were computed too, but a inserted them first: b's pages are freed and b's
    page table switches to the tree's (as SGLang's cache_unfinished_req)."""
    prompt = list(range(3000, 3000 + 8 * PS))
    kv = kv_of(prompt)
    async with HiCache.open(config()) as cache:
        async with cache.session(prompt) as a, cache.session(prompt) as b:
            await a.load()
            await b.load()
            a1, b1 = await a.allocate(4 * PS), await b.allocate(4 * PS)
            write_kv(cache.device_pool, a1, kv[: 4 * PS])
            write_kv(cache.device_pool, b1, kv[: 4 * PS])
            assert await a.commit(a1) == 0
            assert await b.commit(b1) == 4 * PS  # a had them: b's four pages go back
            assert torch.equal(b.device_indices, a.device_indices)
            used = cache.l1.allocator.used
            assert used == 4
            b2 = await b.allocate(4 * PS)  # b goes on from the shared pages
            write_kv(cache.device_pool, b2, kv[4 * PS :])
            assert await b.commit(b2) == 0
            assert wrong_bytes(cache.device_pool, b.device_indices, kv) == 0
        await settled(cache)
        assert cache.tree.total_size(RadixTier.DEVICE) == len(prompt)


async def test_commit_takes_only_the_next_allocated_slots() -> None:
    async with HiCache.open(config()) as cache:
        async with cache.session(list(range(16))) as s:
            await s.load()
            slots = await s.allocate(8)
            with pytest.raises(HiCacheError, match="next"):
                await s.commit(slots[4:])  # not the next tokens
            with pytest.raises(LayoutError, match="extend"):
                await s.allocate(9)  # past the key
            await s.commit(slots[:4])
            await s.commit(slots[4:])
            with pytest.raises(HiCacheError):
                await s.commit(slots[4:])  # committed already
        await settled(cache)
        assert cache.tree.total_size(RadixTier.DEVICE) == 8


# -- decode and multi-turn chat ---------------------------------------------------------------


async def test_a_three_turn_chat_hits_every_whole_page_of_the_previous_turns() -> None:
    """Chunked prefill then decode, three turns; each turn's prompt holds the previous
    prompt and answer, and its hit is every whole page of them, bit-exact."""
    system = list(range(100, 100 + 3 * PS + 1))
    answers = [list(range(5000 + 100 * t, 5000 + 100 * t + 2 * PS + 3)) for t in range(3)]
    questions = [list(range(7000 + 100 * t, 7000 + 100 * t + PS + 2)) for t in range(3)]
    async with HiCache.open(config(device_pages=128)) as cache:
        history: list[int] = list(system)
        for turn in range(3):
            prompt = history + questions[turn]
            full = prompt + answers[turn]
            kv = kv_of(full)
            async with cache.session(prompt) as s:
                hit = await prefill(s, kv, chunk=3 * PS + 1)
                await decode(s, answers[turn], kv)
                assert wrong_bytes(cache.device_pool, s.device_indices, kv) == 0
            if turn:
                assert hit == len(history) // PS * PS, f"turn {turn} missed the previous turns"
            history = full
            await settled(cache)
            assert cache.tree.total_size(RadixTier.DEVICE) >= len(history) // PS * PS


async def test_extend_refuses_bad_tokens_and_a_closed_session() -> None:
    async with HiCache.open(config()) as cache:
        async with cache.session(list(range(8))) as s:
            with pytest.raises(HiCacheError):
                s.extend([2**40])
            for bad in ([-1], [2**31], [1, 2**31], [1.5]):  # a decode step's short lists too
                with pytest.raises(HiCacheError):
                    s.extend(bad)  # type: ignore[arg-type]
            with pytest.raises(HiCacheError):
                s.extend("abc")  # type: ignore[arg-type]
            assert len(s.key) == 8
        with pytest.raises(HiCacheError):
            s.extend([1])


# -- abort at every await ----------------------------------------------------------------------


async def _chat_turn_cut_at(at: int, write_policy: str) -> int:
    """A turn (chunked prefill of a prompt that hits L2, then decode) cancelled at its
    ``at``-th suspension; then everything is back at the baseline and the turn serves."""
    base = list(range(100, 100 + 6 * PS))
    prompt = base + list(range(900, 900 + 5 * PS + 2))
    answer = list(range(4000, 4000 + PS + 3))
    kv = kv_of(prompt + answer)
    async with HiCache.open(config(device_pages=40, write_policy=write_policy)) as cache:
        async with cache.session(base) as s:  # the base on L2 only
            await prefill(s, kv_of(base), chunk=len(base))
        await cache.drain()
        await cache.ensure_device_room(cache.l1.allocator.usable)
        cache.device_tier.evict(cache.l1.allocator.usable)

        async def turn() -> None:
            async with cache.session(prompt) as s:
                await prefill(s, kv, chunk=2 * PS + 1)
                await decode(s, answer, kv)

        with anyio.fail_after(HANG_GUARD_S):
            with anyio.CancelScope() as scope:
                step = CancelAtSuspension(turn(), scope, at)
                await step
            await settled(cache)
            async with cache.session(prompt + answer) as s:  # served again, bit-exact
                await prefill(s, kv, chunk=len(prompt))
            await settled(cache)
        return step.suspensions


@pytest.mark.parametrize("write_policy", ["write_through", "write_back"])
async def test_abort_at_every_await_of_a_turn_leaves_the_baseline(write_policy: str) -> None:
    total = await _chat_turn_cut_at(0, write_policy)
    assert total >= 3, f"the turn suspended only {total} times: not the path meant"
    for at in range(1, total + 1):
        await _chat_turn_cut_at(at, write_policy)


# -- waiting for room ----------------------------------------------------------------------------


async def test_allocate_waits_for_a_request_that_leaves() -> None:
    async with HiCache.open(config(device_pages=16)) as cache:
        order: list[str] = []
        holder = cache.session(list(range(100)))
        await holder.__aenter__()
        await holder.load()
        held = await holder.allocate(12 * PS)  # 12 of 15 usable pages, uncommitted
        assert held.numel() == 12 * PS

        async def waiter() -> None:
            async with cache.session(list(range(500, 500 + 8 * PS))) as s:
                await s.load()
                order.append("waiting")
                slots = await s.allocate(8 * PS)
                order.append("got")
                await s.commit(slots)

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(waiter)
                await anyio.wait_all_tasks_blocked()
                assert order == ["waiting"]
                assert cache.room.waiting == 1
                order.append("leaving")
                holder.close()  # its 12 pages go back: the waiter is woken
        assert order == ["waiting", "leaving", "got"]
        assert cache.room.waiting == 0
        await settled(cache)


def test_allocate_gives_up_after_its_timeout_with_a_room_report() -> None:
    """On trio's virtual clock: the wait ends with CapacityError once the timeout passed."""
    import trio
    import trio.testing

    async def main() -> None:
        async with HiCache.open(config(device_pages=16)) as cache:
            holder = cache.session(list(range(100)))
            await holder.__aenter__()
            await holder.load()
            await holder.allocate(12 * PS)
            busy = cache.session(list(range(900, 940)))  # an open request, not waiting
            await busy.__aenter__()
            async with cache.session(list(range(500, 500 + 8 * PS))) as s:
                await s.load()
                start = trio.current_time()
                with pytest.raises(CapacityError, match="free") as caught:
                    await s.allocate(8 * PS, timeout=5.0)
                assert trio.current_time() - start >= 5.0
                assert "waited 5.0 s" in str(caught.value)
                assert "locked" in str(caught.value)
            busy.close()
            holder.close()
            await settled(cache)

    clock = trio.testing.MockClock(autojump_threshold=0)
    anyio.run(main, backend="trio", backend_options={"clock": clock})


async def test_waiters_are_served_first_come_first_served() -> None:
    async with HiCache.open(config(device_pages=16)) as cache:
        holder = cache.session(list(range(100)))
        await holder.__aenter__()
        await holder.load()
        await holder.allocate(15 * PS)  # all of L1
        served: list[int] = []

        async def waiter(i: int, pages: int) -> None:
            async with cache.session(list(range(1000 * (i + 1), 1000 * (i + 1) + 40))) as s:
                await s.load()
                slots = await s.allocate(pages * PS)
                served.append(i)
                await anyio.lowlevel.checkpoint()
                await s.commit(slots)

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                for i, pages in enumerate([10, 1, 1]):  # the big one first: not starved
                    tg.start_soon(waiter, i, pages)
                    await anyio.wait_all_tasks_blocked()
                assert cache.room.waiting == 3
                holder.close()
        assert served == [0, 1, 2]
        await settled(cache)


async def test_when_every_open_request_waits_for_room_the_wait_fails_at_once() -> None:
    """Two requests each hold half of L1 and each want more: neither can ever be served, so
    one gets a CapacityError (no timeout needed), leaves, and the other is served."""
    async with HiCache.open(config(device_pages=17)) as cache:
        outcomes: list[str] = []

        async def request(i: int) -> None:
            async with cache.session(list(range(1000 * (i + 1), 1000 * (i + 1) + 16 * PS))) as s:
                await s.load()
                await s.allocate(8 * PS)
                await anyio.wait_all_tasks_blocked()  # both hold 8 pages now
                try:
                    await s.allocate(8 * PS)
                    outcomes.append("served")
                except CapacityError as exc:
                    outcomes.append("refused" if "every open request" in str(exc) else repr(exc))

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(request, 0)
                tg.start_soon(request, 1)
        assert sorted(outcomes) == ["refused", "served"]
        await settled(cache)


async def test_a_session_closed_while_it_waits_for_room_leaves_the_queue() -> None:
    async with HiCache.open(config(device_pages=16)) as cache:
        holder = cache.session(list(range(100)))
        await holder.__aenter__()
        await holder.load()
        await holder.allocate(15 * PS)
        waiting = cache.session(list(range(500, 540)))
        await waiting.__aenter__()
        await waiting.load()
        outcome: list[object] = []

        async def wait() -> None:
            try:
                outcome.append(await waiting.allocate(4 * PS))
            except HiCacheError as exc:
                outcome.append(exc)

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(wait)
                await anyio.wait_all_tasks_blocked()
                waiting.close()  # a disconnect while it waits
        assert isinstance(outcome[0], HiCacheError)
        assert cache.room.waiting == 0
        holder.close()
        await settled(cache)


async def test_a_request_larger_than_l1_is_refused_at_once() -> None:
    async with HiCache.open(config(device_pages=16)) as cache:
        async with cache.session(list(range(200))) as s:
            await s.load()
            with pytest.raises(CapacityError, match="can never get 50 more: L1 has 16"):
                await s.allocate(200)
        await settled(cache)
