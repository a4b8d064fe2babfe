"""Requests/s and event-loop lag of the runtime, and its overhead over the bare tree and pools.

Three measurements in one process:

* ``mixed``: concurrent sessions (match, load, allocate, commit) over prompts with shared
  prefixes and unique tails, L1 + L2, while a ticker task measures its own lateness;
* ``hit_runtime``: the hit path through sessions (every prompt fully cached in L1);
* ``hit_direct``: the same hit path calling the tree directly (key, match, lock, unlock), the
  least any runtime must do. ``overhead`` = runtime / direct - 1 (target < 15%).

    python benchmarks/bench_runtime.py [--requests 4000] [--concurrency 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import anyio
import anyio.lowlevel
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.memory import pages_to_slots
from hicache_async.radix import RadixKey

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, dtype="float16", page_size=16)
SMALL = KVLayout(num_layers=2, num_kv_heads=1, head_dim=8, dtype="float16", page_size=16)


def prompts(n: int, seed: int = 0) -> list[torch.Tensor]:
    rng = random.Random(seed)
    systems = [torch.arange(i * 10_000, i * 10_000 + 512) for i in range(8)]
    out = []
    for _ in range(n):
        tail = torch.randint(1_000_000, 2_000_000, (rng.randrange(16, 512),))
        out.append(torch.cat([systems[rng.randrange(8)], tail]))
    return out


def config(device_pages: int, layout: KVLayout = LAYOUT) -> HiCacheConfig:
    return HiCacheConfig(
        layout=layout,
        device="cpu",
        device_pages=device_pages,
        host_pages=2 * device_pages,
        storage_backend="none",
    )


async def mixed(requests: list[torch.Tensor], concurrency: int) -> dict[str, Any]:
    lateness: list[float] = []

    async def ticker() -> None:
        while True:
            start = time.perf_counter()
            await anyio.sleep(0.001)
            lateness.append(time.perf_counter() - start - 0.001)

    async with HiCache.open(config(device_pages=4096)) as cache:
        send, receive = anyio.create_memory_object_stream[torch.Tensor](len(requests))
        for tokens in requests:
            send.send_nowait(tokens)
        send.close()

        async def worker(queue: Any) -> None:
            async with queue:
                async for tokens in queue:
                    async with cache.session(tokens) as s:
                        hit = await s.load()
                        new = s.allocate(tokens.numel() - hit.length)
                        await anyio.lowlevel.checkpoint()  # the model would run here
                        await s.commit(new)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            async with anyio.create_task_group() as workers:
                with receive:
                    for _ in range(concurrency):
                        workers.start_soon(worker, receive.clone())
            tg.cancel_scope.cancel()
        elapsed = time.perf_counter() - start
        stats = cache.stats()
    lateness.sort()
    hit_tokens = sum(t.hit_tokens for t in stats.tiers.values())
    return {
        "requests": len(requests),
        "seconds": elapsed,
        "requests_per_s": len(requests) / elapsed,
        "hit_ratio_tokens": hit_tokens / sum(t.numel() for t in requests),
        "loop_lag_ms": {
            "p50": lateness[len(lateness) // 2] * 1e3,
            "p99": lateness[int(len(lateness) * 0.99)] * 1e3,
            "max": lateness[-1] * 1e3,
        },
    }


def bare_hit(cache: HiCache, tokens: torch.Tensor) -> torch.Tensor:
    """What a framework must do by hand for a safe hit: key, match, lock the matched path
    while the model reads it (the host path too when part of the hit is host-only), unlock."""
    tree = cache.tree
    match = tree.match_prefix(RadixKey(tokens))
    last_device, last_host = match.last_device_node, match.last_host_node
    tree.lock(last_device)
    host = last_host is not last_device
    if host:
        tree.lock_host(last_host)
    try:
        return match.device_indices  # the model would run here
    finally:
        if host:
            tree.unlock_host(last_host)
        tree.unlock(last_device)


def bare_hit_and_tail(cache: HiCache, tokens: torch.Tensor) -> int:
    """The same for a cached prefix plus new tokens: allocate whole pages for the rest, insert
    the prompt, free the slots of pages another request inserted first, unlock."""
    tree, allocator, ps = cache.tree, cache.l1.allocator, cache.page_size
    key = RadixKey(tokens)
    match = tree.match_prefix(key)
    last_device, last_host = match.last_device_node, match.last_host_node
    tree.lock(last_device)
    host = last_host is not last_device
    if host:
        tree.lock_host(last_host)
    try:
        hit = match.device_indices.numel()
        pages = allocator.alloc(-(-(len(key) - hit) // ps))
        assert pages is not None
        new = pages_to_slots(pages, ps)  # the model would write the new KV here
        present = tree.insert(key, torch.cat([match.device_indices, new]), copy=False)
        if present > hit:  # another request cached these pages first: free our copies
            allocator.free(pages[: (present - hit) // ps])
        return present
    finally:
        if host:
            tree.unlock_host(last_host)
        tree.unlock(last_device)


async def hit_path(requests: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """Per-request time of a full L1 hit, through sessions and by hand (:func:`bare_hit`).

    L1 holds every prompt (a small layout keeps that cheap), so nothing is evicted or loaded:
    what is measured is the bookkeeping."""
    pages = sum(t.numel() for t in requests) // SMALL.page_size + len(requests)
    async with HiCache.open(config(device_pages=pages, layout=SMALL)) as cache:
        for tokens in requests:  # warm: every prompt cached
            async with cache.session(tokens) as s:
                hit = await s.load()
                await s.commit(s.allocate(tokens.numel() - hit.length))
        await cache.drain()
        runtime, direct = [], []
        for _ in range(repeats):  # interleaved, so both see the same machine state
            start = time.perf_counter()
            for tokens in requests:
                async with cache.session(tokens) as s:
                    await s.load()
            runtime.append((time.perf_counter() - start) / len(requests))
            start = time.perf_counter()
            for tokens in requests:
                bare_hit(cache, tokens)
            direct.append((time.perf_counter() - start) / len(requests))
    r, d = statistics.median(runtime), statistics.median(direct)
    return {"runtime_us": r * 1e6, "direct_us": d * 1e6, "overhead": r / d - 1}


async def hit_and_tail(requests: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """A cached prompt plus one new page, the common request: through a session (match, load,
    allocate, commit) and by hand (:func:`bare_hit_and_tail`: match, lock, alloc, insert, free
    duplicates, unlock). No backups (write_back policy, nothing evicted), so both do the same
    work."""
    ps = SMALL.page_size
    pages = sum(t.numel() for t in requests) // ps + len(requests) * (2 * repeats + 2)
    cfg = config(device_pages=pages, layout=SMALL).model_copy(update={"write_policy": "write_back"})
    fresh = iter(range(10**9, 2 * 10**9, ps))

    def with_tail(tokens: torch.Tensor) -> torch.Tensor:
        """The cached prompt's whole pages, then one page of tokens never seen before."""
        first = next(fresh)
        return torch.cat([tokens[: tokens.numel() // ps * ps], torch.arange(first, first + ps)])

    async with HiCache.open(cfg) as cache:
        for tokens in requests:
            async with cache.session(tokens) as s:
                hit = await s.load()
                await s.commit(s.allocate(tokens.numel() - hit.length))
        runtime, direct = [], []
        for _ in range(repeats):
            batch = [with_tail(t) for t in requests]
            start = time.perf_counter()
            for tokens in batch:
                async with cache.session(tokens) as s:
                    hit = await s.load()
                    await s.commit(s.allocate(tokens.numel() - hit.length))
            runtime.append((time.perf_counter() - start) / len(batch))
            batch = [with_tail(t) for t in requests]
            start = time.perf_counter()
            for tokens in batch:
                bare_hit_and_tail(cache, tokens)
            direct.append((time.perf_counter() - start) / len(batch))
    r, d = statistics.median(runtime), statistics.median(direct)
    return {"runtime_us": r * 1e6, "direct_us": d * 1e6, "overhead": r / d - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reqs = prompts(args.requests)
    result = {
        "mixed": anyio.run(mixed, reqs, args.concurrency),
        "hit_path": anyio.run(hit_path, reqs[:500], args.repeats),
        "hit_and_tail": anyio.run(hit_and_tail, reqs[:500], args.repeats),
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m, h, t = result["mixed"], result["hit_path"], result["hit_and_tail"]
    print(
        f"mixed: {m['requests_per_s']:.0f} requests/s, hit ratio {m['hit_ratio_tokens']:.2f}, "
        f"loop lag p50 {m['loop_lag_ms']['p50']:.2f} ms p99 {m['loop_lag_ms']['p99']:.2f} ms"
    )
    print(
        f"hit path: runtime {h['runtime_us']:.1f} us, direct {h['direct_us']:.1f} us, "
        f"overhead {h['overhead']:.0%}"
    )
    print(
        f"hit + new page: runtime {t['runtime_us']:.1f} us, direct {t['direct_us']:.1f} us, "
        f"overhead {t['overhead']:.0%}"
    )


if __name__ == "__main__":
    main()
