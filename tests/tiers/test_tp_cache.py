"""Two tensor-parallel ranks (real gloo processes), each with its own HiCache: a prefix that is
in one rank's L3 only is used by neither, one in both is used by both, and the trees agree."""

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


async def _rank_main(rank: int) -> dict[str, Any]:
    from hicache_async import HiCache, HiCacheConfig, KVLayout
    from hicache_async.radix import RadixKey

    layout = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float16", page_size=4)
    config = HiCacheConfig(
        layout=layout,
        device="cpu",
        device_pages=64,
        host_pages=128,
        storage_backend="memory",
        storage_backend_extra_config=f'{{"store": "tp-rank{rank}"}}',
        prefetch_threshold=4,
        prefetch_policy="wait_complete",
    )

    async def put_in_l3(cache: HiCache, tokens: torch.Tensor) -> None:
        """What an earlier server on this rank wrote to L3 (not a collective)."""
        assert cache.prefetcher is not None
        assert cache.host_tier is not None
        assert cache.storage is not None
        key = RadixKey(tokens)
        _, _, keys = cache.prefetcher.suffix_keys(key, cache.tree.match_prefix(key))
        slots = cache.host_tier.reserve(len(keys))
        assert slots is not None
        assert all(await cache.storage.batch_set_v1(keys, slots))
        cache.host_tier.free(slots)

    async def request(cache: HiCache, tokens: torch.Tensor) -> int:
        async with cache.session(tokens) as s:
            await s.prefetch()  # both ranks issue the same agreement rounds, in order
            hit = await s.load()
            await s.commit(s.allocate(tokens.numel() - hit.length))
            return hit.length

    async with HiCache.open(config, process_group=dist.group.WORLD, model_name="m") as cache:
        if rank == 0:
            await put_in_l3(cache, ONLY_RANK0)
        await put_in_l3(cache, BOTH)
        hits = [await request(cache, ONLY_RANK0), await request(cache, BOTH)]
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
