"""The core with the file and memory backends runs on trio too (through anyio)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout

from .test_cache_e2e import assert_kv, write_kv

LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float16", page_size=4)


async def scenario(config: HiCacheConfig) -> list[int]:
    prompt = torch.arange(100, 100 + 48)
    hits = []
    async with HiCache.open(config) as cache:
        for _ in range(2):
            async with cache.session(prompt) as s:
                await s.prefetch()
                hit = await s.load()
                assert_kv(cache, prompt[: hit.length], hit.device_indices)
                new = await s.allocate(prompt.numel() - hit.length)
                write_kv(cache, prompt[hit.length :], new)
                await s.commit(new)
            hits.append(hit.length)
        cache.device_tier.evict(cache.l1.allocator.usable)  # the next hit comes from L2
        await cache.drain()
        async with cache.session(prompt) as s:
            hit = await s.load()
            assert_kv(cache, prompt[: hit.length], hit.device_indices)
            hits.append(hit.length)
    return hits


@pytest.mark.parametrize("backend", ["memory", "file"])
def test_runtime_on_trio(backend: str, tmp_path: Path) -> None:
    extra = f'{{"path": "{tmp_path}"}}' if backend == "file" else None
    config = HiCacheConfig(
        layout=LAYOUT,
        model_name="test-model",
        device="cpu",
        device_pages=32,
        host_pages=64,
        storage_backend=backend,
        storage_backend_extra_config=extra,
        prefetch_threshold=4,
    )
    assert anyio.run(scenario, config, backend="trio") == [0, 48, 48]
