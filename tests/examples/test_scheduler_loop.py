"""The SGLang-style scheduler example: chunked prefill and decode in batches, shared prefixes,
exact logits, retraction under a small L1, no leaks; and the scheduler-level API counts what
sessions count."""

from __future__ import annotations

from typing import Any

import torch

from hicache_async import HiCache, HiCacheConfig
from hicache_async.demo.model import TinyCausalLM
from hicache_async.radix import Tier as RadixTier

from .conftest import load_example

scheduler_loop = load_example("scheduler_loop")


def config(model: TinyCausalLM, **kw: Any) -> HiCacheConfig:
    options: dict[str, Any] = {
        "layout": model.kv_layout(page_size=8),
        "device": "cpu",
        "device_pages": 48,
        "host_pages": 96,
        "storage_backend": "none",
    }
    options.update(kw)
    return HiCacheConfig(**options)


def prompts(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    system = torch.randint(0, 512, (64,), generator=gen)
    return [torch.cat([system, torch.randint(0, 512, (30 + i,), generator=gen)]) for i in range(n)]


def greedy(model: TinyCausalLM, prompt: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """The reference: ``n`` greedy tokens recomputed from scratch, and their logits."""
    tokens, out, logits = prompt, [], []
    for _ in range(n):
        last = model.forward_full(tokens)[-1]
        logits.append(last)
        out.append(int(last.argmax()))
        tokens = torch.cat([tokens, torch.tensor(out[-1:])])
    return out, torch.stack(logits)


def assert_nothing_leaked(cache: HiCache) -> None:
    tree, ps = cache.tree, cache.page_size
    assert tree.protected_size(RadixTier.DEVICE) == 0
    assert tree.protected_size(RadixTier.HOST) == 0
    assert cache.l1.allocator.used == tree.total_size(RadixTier.DEVICE) // ps
    cache.check()


async def test_scheduler_prefills_in_chunks_decodes_and_reuses_prefixes() -> None:
    model = TinyCausalLM(seed=1)
    async with HiCache.open(config(model)) as cache:
        sched = scheduler_loop.Scheduler(cache, model, max_batch=4, chunk_tokens=24)
        requests = [sched.add(p, max_new_tokens=5) for p in prompts(12)]
        await sched.run_until_idle()
        await cache.drain()
        assert len(sched.done) == len(requests)
        for request in requests:
            want, want_logits = greedy(model, request.prompt, 5)
            assert request.output == want
            assert torch.allclose(torch.stack(request.logits), want_logits, atol=1e-4, rtol=1e-4)
        # The first batch was admitted before any commit; every later request hit the system prompt.
        assert all(r.cached >= 64 for r in requests[4:])
        assert_nothing_leaked(cache)


async def test_a_follow_up_turn_hits_the_answer() -> None:
    model = TinyCausalLM(seed=1)
    async with HiCache.open(config(model)) as cache:
        sched = scheduler_loop.Scheduler(cache, model, chunk_tokens=24)
        first = sched.add(prompts(1)[0], max_new_tokens=12)
        await sched.run_until_idle()
        # The next turn's prompt holds the answer: its whole pages are hit too.
        follow = torch.cat([first.prompt, torch.tensor(first.output[:-1]), torch.arange(9)])
        again = sched.add(follow, max_new_tokens=1)
        await sched.run_until_idle()
        fed = first.prompt.numel() + len(first.output) - 1  # the last token was never fed
        assert fed // 8 * 8 > first.prompt.numel() // 8 * 8
        assert again.cached == fed // 8 * 8
        await cache.drain()
        assert_nothing_leaked(cache)


async def test_a_small_l1_retracts_and_every_request_ends_exact() -> None:
    model = TinyCausalLM(seed=2)
    async with HiCache.open(config(model, device_pages=24, host_pages=64)) as cache:
        sched = scheduler_loop.Scheduler(cache, model, max_batch=6, chunk_tokens=16)
        requests = [sched.add(p, max_new_tokens=3) for p in prompts(8)]
        await sched.run_until_idle()
        assert len(sched.done) == len(requests)
        assert sum(r.retracted for r in requests) > 0  # L1 was too small for the batch
        for request in requests:
            assert request.output == greedy(model, request.prompt, 3)[0]
        await cache.drain()
        assert_nothing_leaked(cache)


async def _with_sessions(cache: HiCache, model: TinyCausalLM, prompt: torch.Tensor) -> None:
    """What the scheduler does for one request (batch of one), written with ``async with``."""
    output: list[int] = []
    async with cache.session(prompt) as s:
        done = (await s.load(limit=prompt.numel() - 1)).length
        while len(output) < 3:
            if done < prompt.numel():
                tokens = prompt[done : done + 24]
            else:
                tokens = torch.tensor(output[-1:])
                s.extend(tokens)
            slots = await s.allocate(tokens.numel())
            logits = model.forward_cached(tokens, s.device_indices, slots, cache.device_pool)
            await s.commit(slots)
            done += tokens.numel()
            if done >= prompt.numel():
                output.append(int(logits[-1].argmax()))


async def test_the_scheduler_level_api_counts_what_sessions_count() -> None:
    model = TinyCausalLM(seed=3)
    workload = prompts(6)
    stats = []
    for scheduled in (True, False):
        async with HiCache.open(config(model)) as cache:
            if scheduled:
                sched = scheduler_loop.Scheduler(cache, model, max_batch=1, chunk_tokens=24)
                for prompt in workload:
                    sched.add(prompt, max_new_tokens=3)
                    await sched.run_until_idle()
                    await cache.drain()
            else:
                for prompt in workload:
                    await _with_sessions(cache, model, prompt)
                    await cache.drain()
            snapshot = cache.stats().model_dump()
            stats.append(snapshot)
    scheduled_stats, session_stats = stats
    assert scheduled_stats["requests"] == session_stats["requests"] == len(workload)
    assert scheduled_stats["tiers"] == session_stats["tiers"]
    assert scheduled_stats["tiers"]["device"]["hit_tokens"] > 0
    for stats_ in (scheduled_stats, session_stats):  # durations differ run to run
        for transition in stats_["transitions"].values():
            transition.pop("seconds")
            transition.pop("bandwidth_bytes_per_s")
    assert scheduled_stats["transitions"] == session_stats["transitions"]
