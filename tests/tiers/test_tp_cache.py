"""Two tensor-parallel ranks (real gloo processes), each with its own HiCache. A prefix that is
in one rank's L3 only is used by neither, one in both is used by both; ranks whose L1s differ,
or that take requests in different orders, still use the same hit."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.tiers._ranks import run_ranks

WORLD = 2
ONLY_RANK0 = torch.arange(1000, 1000 + 24 * 4)
BOTH = torch.arange(5000, 5000 + 24 * 4)
PROMPT = torch.arange(9000, 9000 + 24 * 4)  # 24 pages
OTHER = torch.arange(20000, 20000 + 24 * 4)


def _tp_config(rank: int, **kw: Any) -> Any:
    from hicache_async import HiCacheConfig, KVLayout

    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float16", page_size=4)
    options: dict[str, Any] = {
        "layout": layout,
        "model_name": "tp-test",
        "device": "cpu",
        "device_pages": 128,
        "host_pages": 128,
        "prefetch_threshold": 4,
        "prefetch_policy": "wait_complete",
    }
    options.update(kw)
    return HiCacheConfig(**options)


def _cache_only_here(cache: Any, tokens: torch.Tensor) -> None:
    """Put ``tokens`` in this rank's L1 without a session, as a backup or an eviction that
    landed at another time on this rank than on the others would leave it."""
    from hicache_async.radix import RadixKey

    pages = cache.l1.allocator.alloc(tokens.numel() // cache.page_size)
    assert cache.tree.insert_pages(RadixKey(tokens), pages) == 0


async def _hit(cache: Any, tokens: torch.Tensor, *, prefetch: bool = False) -> int:
    async with cache.session(tokens) as s:
        if prefetch:
            await s.prefetch()
        hit = await s.load()
        await s.commit(await s.allocate(tokens.numel() - hit.length))
        return int(hit.length)


async def _put_in_l3(cache: Any, tokens: torch.Tensor) -> None:
    """What an earlier server on this rank wrote to L3 (not a collective)."""
    from hicache_async.radix import RadixKey

    key = RadixKey(tokens)
    _, _, keys = cache.prefetcher.suffix_keys(key, cache.tree.match_prefix(key))
    slots = cache.host_tier.reserve(len(keys))
    assert slots is not None
    assert all(await cache.storage.batch_set_v1(keys, slots))
    cache.host_tier.free(slots)


async def _rank_main(rank: int) -> dict[str, Any]:
    from hicache_async import HiCache

    config = _tp_config(
        rank,
        device_pages=64,
        storage_backend="memory",
        storage_backend_extra_config=f'{{"store": "tp-rank{rank}"}}',
        model_name="m",
    )
    async with HiCache.open(config, process_group=dist.group.WORLD) as cache:
        if rank == 0:
            await _put_in_l3(cache, ONLY_RANK0)
        await _put_in_l3(cache, BOTH)
        # Both ranks issue the same agreement rounds, in order.
        hits = [await _hit(cache, t, prefetch=True) for t in (ONLY_RANK0, BOTH)]
        await cache.drain()
        tree = []
        stack = [cache.tree.root]
        while stack:
            node = stack.pop()
            tree.append((node.num_tokens, node.state.name))
            stack.extend(node.children[k] for k in sorted(node.children))
        consensus = cache.consensus
        assert consensus is not None
        return {"hits": hits, "tree": tree, "rounds": consensus.rounds}


@pytest.mark.timeout(180)
def test_ranks_use_only_what_every_rank_prefetched(tmp_path: Path) -> None:
    results = run_ranks(_rank_main, WORLD, tmp_path)
    # Rank 0 held ONLY_RANK0 in L3, rank 1 did not: neither used it (MIN), both used BOTH.
    assert results[0]["hits"] == results[1]["hits"] == [0, BOTH.numel()]
    assert results[0]["tree"] == results[1]["tree"]
    assert results[0]["rounds"] == results[1]["rounds"] > 0


async def _diverged_l1_main(rank: int) -> dict[str, Any]:
    from hicache_async import HiCache

    async with HiCache.open(_tp_config(rank), process_group=dist.group.WORLD) as cache:
        if rank == 0:
            _cache_only_here(cache, PROMPT)
        hits = [await _hit(cache, PROMPT), await _hit(cache, PROMPT)]
        assert cache.consensus is not None
        return {"hits": hits, "unpaired": cache.consensus.unpaired}


@pytest.mark.timeout(180)
def test_ranks_use_the_same_hit_when_their_l1s_differ(tmp_path: Path) -> None:
    results = run_ranks(_diverged_l1_main, WORLD, tmp_path)
    # Rank 0 held the prompt, rank 1 did not: both computed it (a hit on rank 0 alone would
    # have the ranks run the model on different tokens); then both hold it.
    assert results[0]["hits"] == results[1]["hits"] == [0, PROMPT.numel()]
    assert results[0]["unpaired"] == results[1]["unpaired"] == 0


async def _out_of_order_main(rank: int) -> dict[str, Any]:
    from hicache_async import HiCache

    async with HiCache.open(_tp_config(rank), process_group=dist.group.WORLD) as cache:
        for tokens in (PROMPT, OTHER):
            _cache_only_here(cache, tokens)
        order = (PROMPT, OTHER) if rank == 0 else (OTHER, PROMPT)
        hits = [await _hit(cache, tokens) for tokens in order]
        in_order = [await _hit(cache, tokens) for tokens in (PROMPT, OTHER)]
        assert cache.consensus is not None
        stats = cache.stats()
        return {
            "hits": hits,
            "in_order": in_order,
            "unpaired": cache.consensus.unpaired,
            "stats": (stats.tp_rounds, stats.tp_unpaired_rounds),
        }


@pytest.mark.timeout(180)
def test_ranks_that_reach_a_round_from_different_requests_all_miss(tmp_path: Path) -> None:
    results = run_ranks(_out_of_order_main, WORLD, tmp_path)
    # Both hold both prompts, but took them in opposite orders: each round paired different
    # requests, every rank saw it and used no hit. In step again, both hit in full.
    for r in results.values():
        assert r["hits"] == [0, 0]
        assert r["in_order"] == [PROMPT.numel(), OTHER.numel()]
        assert r["unpaired"] == 2
        assert r["stats"] == (4, 2)  # one round per load


async def _prefetch_from_different_trees_main(rank: int, part: int = 2) -> dict[str, Any]:
    """Rank 0's L1 holds ``1/part`` of PROMPT, rank 1's nothing; both L3s hold all of it."""
    from hicache_async import HiCache

    config = _tp_config(
        rank,
        storage_backend="memory",
        storage_backend_extra_config=f'{{"store": "tp-trees-rank{rank}"}}',
        model_name="m",
    )
    async with HiCache.open(config, process_group=dist.group.WORLD) as cache:
        await _put_in_l3(cache, PROMPT)
        if rank == 0:
            _cache_only_here(cache, PROMPT[: PROMPT.numel() // part])
        hit = await _hit(cache, PROMPT, prefetch=True)
        assert cache.consensus is not None
        return {"hit": hit, "unpaired": cache.consensus.unpaired}


@pytest.mark.timeout(180)
def test_a_prefetch_reaches_as_far_on_every_rank_when_their_trees_differ(tmp_path: Path) -> None:
    results = run_ranks(_prefetch_from_different_trees_main, WORLD, tmp_path)
    # Rank 0's L1 held the first half, rank 1's nothing; L3 held all on both. Each fetched
    # from where its own tree ended, and both use the whole prompt.
    assert results[0]["hit"] == results[1]["hit"] == PROMPT.numel()
    assert results[0]["unpaired"] == results[1]["unpaired"] == 0


async def _one_tree_holds_all_main(rank: int) -> dict[str, Any]:
    return await _prefetch_from_different_trees_main(rank, part=1)


@pytest.mark.timeout(180)
def test_a_rank_whose_tree_holds_the_prompt_does_not_stop_the_prefetch(tmp_path: Path) -> None:
    results = run_ranks(_one_tree_holds_all_main, WORLD, tmp_path)
    # Rank 0's own suffix is empty (under the threshold), rank 1 needs all 24 pages: the
    # threshold applies to the rank holding the least, so rank 1 fetched and both hit in full.
    assert results[0]["hit"] == results[1]["hit"] == PROMPT.numel()


async def _cancelled_everywhere_main(rank: int) -> dict[str, Any]:
    import anyio

    from hicache_async import HiCache
    from hicache_async.storage import HiCacheStorageConfig, create_storage
    from hicache_async.testing.faults import SlowStorage

    store = create_storage("memory", HiCacheStorageConfig(), store=f"tp-cancel-rank{rank}")
    # Rank 0's L3 is slow: when the request is cancelled on both ranks at once, rank 0 is
    # still fetching while rank 1 already waits in the arrival round.
    storage = SlowStorage(store, delay=0.0, per_page=0.05 if rank == 0 else 0.0)
    config = _tp_config(rank, storage_backend="memory")
    async with HiCache.open(config, process_group=dist.group.WORLD, storage=storage) as cache:
        await _put_in_l3(cache, PROMPT)
        storage.per_page = 0.05 if rank == 0 else 0.0
        _cache_only_here(cache, OTHER)
        with anyio.move_on_after(0.3):
            await _hit(cache, PROMPT, prefetch=True)
        after = [await _hit(cache, OTHER) for _ in range(3)]
        stats = cache.stats()
        return {"after": after, "unpaired": stats.tp_unpaired_rounds}


@pytest.mark.timeout(180)
def test_a_request_cancelled_on_every_rank_leaves_the_rounds_in_step(tmp_path: Path) -> None:
    results = run_ranks(_cancelled_everywhere_main, WORLD, tmp_path)
    # The cancelled request made all its rounds on both ranks (with nothing, where cut), so
    # the next requests' rounds pair up and both ranks hit in full.
    for r in results.values():
        assert r["after"] == [OTHER.numel()] * 3
        assert r["unpaired"] == 0
