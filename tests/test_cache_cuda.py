"""The runtime end to end on a CUDA L1 (skipped without a GPU): hits in L1, L2, and L3."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hicache_async import HiCache, HostLayout, KVLayout
from hicache_async.metrics import Tier

from .test_cache_e2e import MHA, MLA, config, serve

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("layout", [MHA, MLA], ids=["mha", "mla"])
@pytest.mark.parametrize("host_layout", list(HostLayout))
async def test_cuda_l1_l2_l3_hits_are_bit_exact(
    layout: KVLayout, host_layout: HostLayout, tmp_path: Path
) -> None:
    prompt = torch.arange(1000, 1000 + 10 * 4)
    options = {
        "device": "cuda",
        "storage_backend": "file",
        "storage_backend_extra_config": f'{{"path": "{tmp_path}"}}',
    }
    async with HiCache.open(config(layout, host_layout, **options)) as cache:
        assert cache.device_pool.device.type == "cuda"
        assert await serve(cache, prompt) == 0
        assert await serve(cache, prompt) == 40  # L1
        for i in range(6):
            await serve(cache, torch.arange(5000 + 100 * i, 5000 + 100 * i + 12))
        await cache.drain()
        assert await serve(cache, prompt) == 40  # from L2 over the copy stream
        assert cache.stats().tiers[Tier.HOST].hit_tokens > 0
        cache.tree.check()
    async with HiCache.open(config(layout, host_layout, **options)) as fresh:
        assert await serve(fresh, prompt) == 40  # from L3
        assert fresh.stats().tiers[Tier.STORAGE].hit_tokens == 40
