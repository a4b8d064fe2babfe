"""The SGLang-style scheduler example: batches, shared prefixes, exact logits, no leaks."""

from __future__ import annotations

import torch

from hicache_async import HiCache, HiCacheConfig
from hicache_async.demo.model import TinyCausalLM

from .conftest import load_example

scheduler_loop = load_example("scheduler_loop")


async def test_scheduler_batches_and_reuses_prefixes() -> None:
    model = TinyCausalLM(seed=1)
    config = HiCacheConfig(
        layout=model.kv_layout(page_size=8),
        device="cpu",
        device_pages=48,
        host_pages=96,
        storage_backend="none",
    )
    gen = torch.Generator().manual_seed(0)
    system = torch.randint(0, 512, (64,), generator=gen)
    prompts = [
        torch.cat([system, torch.randint(0, 512, (30 + i,), generator=gen)]) for i in range(12)
    ]
    async with HiCache.open(config) as cache:
        sched = scheduler_loop.Scheduler(cache, model, max_batch=4)
        requests = [sched.add(p) for p in prompts]
        await sched.run_until_idle()
        await cache.drain()
        assert len(sched.done) == len(prompts)
        for request in requests:
            want = model.forward_full(request.tokens)[request.cached :]
            assert torch.allclose(request.logits, want, atol=1e-4, rtol=1e-4)
        assert sum(r.cached for r in requests[1:]) >= 64 * 8  # the system prompt was reused
        assert_nothing_leaked_no_l3(cache)


def assert_nothing_leaked_no_l3(cache: HiCache) -> None:
    from hicache_async.radix import Tier as RadixTier

    tree, ps = cache.tree, cache.page_size
    assert tree.protected_size(RadixTier.DEVICE) == 0
    assert tree.protected_size(RadixTier.HOST) == 0
    assert cache.l1.allocator.used == tree.total_size(RadixTier.DEVICE) // ps
    tree.check()
