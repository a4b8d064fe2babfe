from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio
import pytest
import torch

from hicache_async.events import BlockStored, StorageMedium
from hicache_async.radix import NodeState, RadixKey
from hicache_async.storage import HiCacheStorage
from hicache_async.testing.faults import CorruptingStorage, ForwardingStorage, SlowStorage
from hicache_async.tiers.prefetch import PrefetchControl, Prefetcher, PrefetchOutcome

from .conftest import LAYOUT, Rig

PS = LAYOUT.page_size
TOKENS = list(range(100, 100 + 10 * PS))  # ten pages


async def store_pages(rig: Rig, tokens: list[int], pages: int) -> list[str]:
    """Put the first ``pages`` pages of ``tokens`` in L3 (as a previous server would have)."""
    prefetcher = make(rig)
    _, _, keys = prefetcher.suffix_keys(RadixKey(tokens), rig.tree.match_prefix(RadixKey(tokens)))
    slots = rig.host.reserve(pages)
    assert slots is not None
    rig.fill(slots, value=40)
    assert all(await rig.storage.batch_set_v1(keys[:pages], slots))
    rig.host.free(slots)
    return keys


def make(rig: Rig, storage: HiCacheStorage | None = None, **kw: object) -> Prefetcher:
    options: dict[str, object] = {"threshold_tokens": 2 * PS, "capacity_pages": 16}
    options.update(kw)
    return Prefetcher(rig.tree, rig.host, storage or rig.storage, rig.counters, rig.hub, **options)  # type: ignore[arg-type]


async def test_arrived_pages_become_host_nodes_with_the_stored_bytes(rig: Rig) -> None:
    keys = await store_pages(rig, TOKENS, 10)
    key = RadixKey(TOKENS)
    result = await make(rig).fetch(key, rig.tree.match_prefix(key))
    assert (result.outcome, result.found_pages, result.arrived_pages) == (
        PrefetchOutcome.COMPLETED,
        10,
        10,
    )
    match = rig.tree.match_prefix(key)
    assert match.host_hit_length == len(TOKENS)
    node = match.last_host_node
    assert node.state is NodeState.HOST
    assert rig.tree.path_hashes(node) == keys  # same chained hashes as the L3 keys
    assert node.host_indices is not None
    assert rig.page_bytes(node.host_indices) == [(40 + i) % 251 for i in range(10)]
    (event,) = (await rig.events.receive()).events
    assert isinstance(event, BlockStored)
    assert event.medium is StorageMedium.CPU_PINNED
    assert event.block_hashes == tuple(keys)
    assert rig.counters.prefetch_completed == 1


async def test_short_suffix_is_skipped(rig: Rig) -> None:
    key = RadixKey(TOKENS[:PS])  # one page < threshold of two
    result = await make(rig).fetch(key, rig.tree.match_prefix(key))
    assert result.outcome is PrefetchOutcome.SKIPPED
    assert rig.counters.prefetch_skipped == 1


async def test_only_the_stored_prefix_is_reserved_and_fetched(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 6)
    free = rig.pool.allocator.available
    key = RadixKey(TOKENS)
    result = await make(rig).fetch(key, rig.tree.match_prefix(key))
    assert (result.found_pages, result.arrived_pages) == (6, 6)
    assert rig.pool.allocator.available == free - 6
    assert rig.tree.match_prefix(key).host_hit_length == 6 * PS


async def test_prefetch_continues_after_a_cached_prefix(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    key = RadixKey(TOKENS)
    head = RadixKey(TOKENS[: 3 * PS])
    slots = rig.host.reserve(3)
    assert slots is not None
    rig.tree.insert_host(head, slots)
    result = await make(rig).fetch(key, rig.tree.match_prefix(key))
    assert (result.found_pages, result.arrived_pages) == (7, 7)
    assert rig.tree.match_prefix(key).host_hit_length == len(TOKENS)


async def test_refused_beyond_capacity(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    key = RadixKey(TOKENS)
    result = await make(rig, capacity_pages=5).fetch(key, rig.tree.match_prefix(key))
    assert result.outcome is PrefetchOutcome.REFUSED
    assert rig.counters.prefetch_refused == 1
    assert rig.pool.allocator.available == 32


async def test_deadline_keeps_the_arrived_prefix(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    slow = SlowStorage(rig.storage, delay=0.0, per_page=0.05)
    slow.register_mem_pool_host(rig.pool)
    key = RadixKey(TOKENS)
    prefetcher = make(rig, storage=slow, batch_pages=1)
    result = await prefetcher.fetch(key, rig.tree.match_prefix(key), deadline_s=0.18)
    assert result.outcome is PrefetchOutcome.TIMED_OUT
    assert 1 <= result.arrived_pages < 10
    assert rig.tree.match_prefix(key).host_hit_length == result.arrived_pages * PS
    assert rig.pool.allocator.available == 32 - result.arrived_pages  # the rest were freed
    assert prefetcher.inflight_pages == 0


async def test_terminate_keeps_what_arrived(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    slow = SlowStorage(rig.storage, delay=0.0, per_page=0.03)
    slow.register_mem_pool_host(rig.pool)
    key = RadixKey(TOKENS)
    control = PrefetchControl()
    prefetcher = make(rig, storage=slow, batch_pages=2)
    results = []
    async with anyio.create_task_group() as tg:

        async def run() -> None:
            results.append(await prefetcher.fetch(key, rig.tree.match_prefix(key), control=control))

        tg.start_soon(run)
        await anyio.sleep(0.15)
        control.terminate()
    (result,) = results
    assert result.outcome is PrefetchOutcome.PARTIAL
    assert 1 <= result.arrived_pages < 10
    assert rig.pool.allocator.available == 32 - result.arrived_pages


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05])
async def test_cancelling_the_caller_rolls_everything_back(rig: Rig, delay: float) -> None:
    await store_pages(rig, TOKENS, 10)
    slow = SlowStorage(rig.storage, delay=0.01, per_page=0.01)
    slow.register_mem_pool_host(rig.pool)
    key = RadixKey(TOKENS)
    prefetcher = make(rig, storage=slow, batch_pages=3)
    with anyio.move_on_after(delay):
        await prefetcher.fetch(key, rig.tree.match_prefix(key))
    assert rig.pool.allocator.available == 32
    assert prefetcher.inflight_pages == 0
    assert rig.tree.match_prefix(key).host_hit_length == 0


async def test_corrupt_pages_are_misses_never_data(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    bad = CorruptingStorage(rig.storage, rate=1.0)
    bad.register_mem_pool_host(rig.pool)
    key = RadixKey(TOKENS)
    result = await make(rig, storage=bad).fetch(key, rig.tree.match_prefix(key))
    assert (result.found_pages, result.arrived_pages) == (10, 0)
    assert rig.tree.match_prefix(key).host_hit_length == 0
    assert rig.pool.allocator.available == 32
    assert rig.storage.stats.errors["corrupt"] >= 1


def other_rank(reach: int, held: int, arrived: int) -> Any:
    """Another tensor-parallel rank in the agreement rounds: its tree holds ``held`` pages of
    the prompt, its L3 reaches ``reach`` pages from the start, ``arrived`` pages reach it."""
    rounds: list[int] = []

    async def agree(tag: int, values: Sequence[int]) -> list[int] | None:
        rounds.append(tag & 3)
        theirs = [reach, held] if tag & 3 == 1 else [arrived]
        return [min(a, b) for a, b in zip(values, theirs, strict=True)]

    agree.rounds = rounds  # type: ignore[attr-defined]
    return agree


async def test_ranks_use_only_what_every_rank_has(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    key = RadixKey(TOKENS)
    agree = other_rank(reach=4, held=0, arrived=4)
    result = await make(rig, agree=agree).fetch(key, rig.tree.match_prefix(key), tag=8)
    assert (result.found_pages, result.arrived_pages) == (4, 4)
    assert agree.rounds == [1, 2]  # the reach, then the arrival
    assert rig.tree.match_prefix(key).host_hit_length == 4 * PS
    assert torch.equal(torch.tensor(rig.pool.allocator.available), torch.tensor(28))


async def test_ranks_keep_only_what_arrived_everywhere(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    key = RadixKey(TOKENS)
    agree = other_rank(reach=10, held=0, arrived=3)  # its fetch stopped after 3 pages
    result = await make(rig, agree=agree).fetch(key, rig.tree.match_prefix(key), tag=8)
    assert (result.found_pages, result.arrived_pages) == (10, 3)
    assert result.outcome is PrefetchOutcome.PARTIAL
    assert rig.tree.match_prefix(key).host_hit_length == 3 * PS
    assert rig.pool.allocator.available == 32 - 3


async def test_a_rank_whose_tree_holds_more_fetches_from_where_it_ends(rig: Rig) -> None:
    """Ranks' trees differ (backups land at different times): the other rank holds 6 pages
    in its tree and L3 has none after them, so every rank can reach 6 pages; this one holds
    none, so it fetches 6 pages from L3 (which has 10)."""
    await store_pages(rig, TOKENS, 10)
    key = RadixKey(TOKENS)
    agree = other_rank(reach=6, held=6, arrived=6)
    result = await make(rig, agree=agree).fetch(key, rig.tree.match_prefix(key), tag=8)
    assert (result.found_pages, result.arrived_pages) == (6, 6)
    assert rig.tree.match_prefix(key).host_hit_length == 6 * PS


async def test_an_unpaired_round_fetches_nothing(rig: Rig) -> None:
    await store_pages(rig, TOKENS, 10)
    key = RadixKey(TOKENS)

    async def other_rank_elsewhere(tag: int, values: Sequence[int]) -> list[int] | None:
        return None  # the other rank was at another request's round

    result = await make(rig, agree=other_rank_elsewhere).fetch(key, rig.tree.match_prefix(key))
    assert result.outcome is PrefetchOutcome.SKIPPED
    assert rig.tree.match_prefix(key).host_hit_length == 0
    assert rig.pool.allocator.available == 32


async def test_a_rank_whose_tree_holds_all_does_not_stop_the_others(rig: Rig) -> None:
    """The other rank's tree holds the whole prompt (its own suffix is under the threshold);
    the threshold applies to what the rank holding the least needs, so this rank fetches."""
    await store_pages(rig, TOKENS, 10)
    key = RadixKey(TOKENS)
    agree = other_rank(reach=10, held=10, arrived=10)
    result = await make(rig, agree=agree).fetch(key, rig.tree.match_prefix(key), tag=8)
    assert (result.outcome, result.found_pages, result.arrived_pages) == (
        PrefetchOutcome.COMPLETED,
        10,
        10,
    )


class _Stuck(ForwardingStorage):
    """Reads (or, with ``exists``, existence checks) that never finish: the request is
    cancelled there, whatever the machine's speed."""

    def __init__(self, inner: HiCacheStorage, *, exists: bool) -> None:
        super().__init__(inner)
        self.exists = exists

    async def _read_pages(self, keys: list[str], buffers: list[Any]) -> list[bool]:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def _leading(self, keys: list[str]) -> int:
        if self.exists:
            await anyio.sleep_forever()
        return await super()._leading(keys)


@pytest.mark.parametrize(("stuck_in", "rounds"), [("exists", [1]), ("reads", [1, 2])])
async def test_a_cancelled_prefetch_still_makes_its_rounds(
    rig: Rig, stuck_in: str, rounds: list[int]
) -> None:
    """Cancelled in L3's existence check, a rank still makes the reach round, reporting
    nothing beyond its tree (so no rank goes on: a miss everywhere); cancelled while its
    pages are on their way, it still makes the arrival round, reporting none arrived. Either
    way it frees what it reserved."""
    await store_pages(rig, TOKENS, 10)
    key = RadixKey(TOKENS)
    agree = other_rank(reach=10, held=0, arrived=10)
    storage = _Stuck(rig.storage, exists=stuck_in == "exists")
    storage.register_mem_pool_host(rig.pool)
    with anyio.move_on_after(0.1):
        await make(rig, storage, agree=agree).fetch(key, rig.tree.match_prefix(key), tag=8)
    assert agree.rounds == rounds
    assert rig.tree.match_prefix(key).host_hit_length == 0
    assert rig.pool.allocator.available == 32
