"""End to end on CPU: hits in L1, then L2 after L1 pressure, then L3 from a fresh cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hicache_async import HiCacheConfig, HostLayout, KVLayout
from hicache_async.cache import HiCache
from hicache_async.metrics import Tier

MHA = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", page_size=4)
MLA = KVLayout(num_layers=2, use_mla=True, head_dim=8, dtype="bfloat16", page_size=4)


def kv_for(cache: HiCache, tokens: torch.Tensor, layer: int, plane: int) -> torch.Tensor:
    """The KV 'the model' writes for ``tokens``: a function of the token, layer and plane."""
    layout = cache.layout
    base = tokens.to(torch.float32)[:, None, None] * 0.001 + layer * 0.1 + plane * 0.01
    shape = (tokens.numel(), layout.num_kv_heads, layout.head_dim)
    ramp = (
        torch.arange(layout.num_kv_heads * layout.head_dim, dtype=torch.float32).view(
            1, layout.num_kv_heads, layout.head_dim
        )
        * 1e-4
    )
    return (base + ramp).expand(shape).to(layout.dtype).contiguous().to(cache.device_pool.device)


def write_kv(cache: HiCache, tokens: torch.Tensor, slots: torch.Tensor) -> None:
    for layer in range(cache.layout.num_layers):
        k = kv_for(cache, tokens, layer, 0)
        v = None if cache.layout.use_mla else kv_for(cache, tokens, layer, 1)
        cache.device_pool.set_kv_buffer(layer, slots, k, v)


def assert_kv(cache: HiCache, tokens: torch.Tensor, slots: torch.Tensor) -> None:
    for layer in range(cache.layout.num_layers):
        got = cache.device_pool.get_key_buffer(layer)[slots]
        assert torch.equal(got, kv_for(cache, tokens, layer, 0)), f"layer {layer} keys"
        if not cache.layout.use_mla:
            got = cache.device_pool.get_value_buffer(layer)[slots]
            assert torch.equal(got, kv_for(cache, tokens, layer, 1)), f"layer {layer} values"


async def serve(cache: HiCache, tokens: torch.Tensor) -> int:
    """One request as a serving framework runs it; returns the hit length."""
    async with cache.session(tokens) as s:
        await s.prefetch()
        hit = await s.load()
        assert_kv(cache, tokens[: hit.length], hit.device_indices)  # bit-exact hits
        new = await s.allocate(tokens.numel() - hit.length)
        write_kv(cache, tokens[hit.length :], new)
        await s.commit(new)
        return hit.length


def config(layout: KVLayout, host_layout: HostLayout, **kw: object) -> HiCacheConfig:
    options: dict[str, object] = {
        "layout": layout,
        "model_name": "test-model",
        "device": "cpu",
        "device_pages": 16,
        "host_pages": 64,
        "host_layout": host_layout,
        "storage_backend": "none",
        "prefetch_threshold": 4,
        "prefetch_policy": "wait_complete",
    }
    options.update(kw)
    return HiCacheConfig(**options)


@pytest.mark.parametrize("layout", [MHA, MLA], ids=["mha", "mla"])
@pytest.mark.parametrize("host_layout", list(HostLayout))
async def test_l1_then_l2_hits_are_bit_exact(layout: KVLayout, host_layout: HostLayout) -> None:
    prompt = torch.arange(1000, 1000 + 10 * 4)  # ten pages
    async with HiCache.open(config(layout, host_layout)) as cache:
        assert await serve(cache, prompt) == 0
        assert await serve(cache, prompt) == 40  # L1 hit
        for i in range(6):  # other prompts push the first one out of L1 (16 pages)
            await serve(cache, torch.arange(5000 + 100 * i, 5000 + 100 * i + 12))
            # Copies keep up (back to back, a queue of backups would pin more than a quarter
            # of this tiny L1 and the newer ones would be deferred: see the pin limit tests).
            await cache.drain()
        match = cache.match_prefix(cache.key(prompt))
        assert match.device_hit_length < 40
        assert match.device_hit_length + match.host_hit_length == 40
        assert await serve(cache, prompt) == 40  # from L2, loaded back
        stats = cache.stats()
        assert stats.tiers[Tier.HOST].hit_tokens > 0
        cache.tree.check()


@pytest.mark.parametrize("layout", [MHA, MLA], ids=["mha", "mla"])
async def test_l3_hits_from_a_fresh_cache_on_the_same_directory(
    layout: KVLayout, tmp_path: Path
) -> None:
    prompt = torch.arange(7, 7 + 12 * 4)
    options = {
        "storage_backend": "file",
        "storage_backend_extra_config": f'{{"path": "{tmp_path}"}}',
    }
    async with HiCache.open(config(layout, HostLayout.PAGE_FIRST, **options)) as first:
        await serve(first, prompt)
    async with HiCache.open(config(layout, HostLayout.LAYER_FIRST, **options)) as second:
        assert await serve(second, prompt) == 48
        stats = second.stats()
        assert stats.tiers[Tier.STORAGE].hit_tokens == 48
        assert stats.prefetch.completed == 1
