"""Requests/s and event-loop lag of the runtime, and its overhead over the bare tree and pools.

Measurements in one process:

* ``mixed`` (closed loop): ``--concurrency`` sessions (match, load, allocate, commit) always
  runnable, over prompts with shared prefixes and unique tails, L1 + L2, while a ticker task
  measures its own lateness. This is the maximum throughput; the loop is saturated by design.
* ``open_loop``: the same requests arriving as a Poisson process at ``--load`` x the closed
  loop's throughput (or ``--rate`` requests/s), each started when it arrives whatever is in
  flight; loop lag and request latency (from arrival) at a sustainable rate. ``idle_loop_lag_ms``
  is the ticker alone, the timer's own resolution. Saturated, the closed loop defers most
  write-through backups (queued backups pin at most a quarter of L1; ``backups`` says how many
  were deferred), so it does less work per request than a loop that keeps up, and 60% of its
  rate can be past what the copies sustain on this machine. ``open_loop_sweep`` runs the open
  loop at the absolute ``--rates`` as well, to show where the backups stop keeping up.
* ``hit_path``: a full L1 hit through sessions, by hand (:func:`bare_hit`: key and its ids'
  range check, match, lock, unlock; ``overhead`` = runtime / by hand - 1, target < 15%), and
  through the smallest session of the same shape (``api_floor``: ``async with`` + ``await
  load()`` + a ``Hit``, nothing else), what the API's shape alone costs. The paths alternate
  request by request (paired samples), so the ratio holds while the VM's speed drifts;
* ``hit_and_tail``: a cached prefix plus one new page, through sessions and by hand
  (:func:`bare_hit_and_tail`).
* ``chunked``: a new prompt prefilled in chunks that do not fall on page boundaries, a commit
  after each (whole pages into the tree, lock moved down, tail kept private), through a session
  and by hand (:func:`bare_chunked`); per chunk.
* ``decode``: a cached prompt then decode steps of one token (extend, allocate, commit), through
  a session and by hand (:func:`bare_decode`); per step. Both alternate request by request
  with their by-hand twin, as ``hit_path`` does.

    python benchmarks/bench_runtime.py [--requests 4000] [--concurrency 32] [--load 0.6] [--json]
"""

from __future__ import annotations

import argparse
import gc
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
from hicache_async.metrics import Tier
from hicache_async.radix import MatchResult, RadixKey, TreeNode
from hicache_async.radix.key import check_token_ids
from hicache_async.session import Hit

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


class LagTicker:
    """Sleeps 1 ms again and again and records how late it wakes: the event loop's lag."""

    def __init__(self) -> None:
        self.lateness: list[float] = []

    async def run(self) -> None:
        while True:
            start = time.perf_counter()
            await anyio.sleep(0.001)
            self.lateness.append(time.perf_counter() - start - 0.001)

    def percentiles_ms(self) -> dict[str, float]:
        return percentiles_ms(self.lateness)


def percentiles_ms(samples: list[float]) -> dict[str, float]:
    """p50, p99 and max of ``samples`` (seconds), in ms."""
    xs = sorted(samples)
    return {
        "p50": xs[len(xs) // 2] * 1e3,
        "p99": xs[int(len(xs) * 0.99)] * 1e3,
        "max": xs[-1] * 1e3,
    }


async def serve(cache: HiCache, tokens: torch.Tensor) -> None:
    """One request: match, load, allocate, (the model), commit."""
    async with cache.session(tokens) as s:
        hit = await s.load()
        new = await s.allocate(tokens.numel() - hit.length)
        await anyio.lowlevel.checkpoint()  # the model would run here
        await s.commit(new)


def hit_ratio(cache: HiCache, requests: list[torch.Tensor]) -> float:
    stats = cache.stats()
    return sum(t.hit_tokens for t in stats.tiers.values()) / sum(t.numel() for t in requests)


def backups(cache: HiCache) -> dict[str, int]:
    """Pages backed up, and backups deferred because the copies were behind (or L2 full): a
    phase that defers backups does less work per request than one that makes them all."""
    b = cache.stats().transitions["backup"]
    return {"pages": b.pages, "skipped": b.skipped, "retried": b.retried, "dropped": b.dropped}


async def mixed(requests: list[torch.Tensor], concurrency: int) -> dict[str, Any]:
    ticker = LagTicker()
    async with HiCache.open(config(device_pages=4096)) as cache:
        send, receive = anyio.create_memory_object_stream[torch.Tensor](len(requests))
        for tokens in requests:
            send.send_nowait(tokens)
        send.close()

        async def worker(queue: Any) -> None:
            async with queue:
                async for tokens in queue:
                    await serve(cache, tokens)

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            async with anyio.create_task_group() as workers:
                with receive:
                    for _ in range(concurrency):
                        workers.start_soon(worker, receive.clone())
            tg.cancel_scope.cancel()
        elapsed = time.perf_counter() - start
        ratio = hit_ratio(cache, requests)
        backed = backups(cache)
    return {
        "requests": len(requests),
        "seconds": elapsed,
        "requests_per_s": len(requests) / elapsed,
        "hit_ratio_tokens": ratio,
        "backups": backed,
        "loop_lag_ms": ticker.percentiles_ms(),
    }


async def idle_lag(seconds: float = 1.0) -> dict[str, float]:
    """The ticker on an otherwise idle loop: the floor of what it can report."""
    ticker = LagTicker()
    with anyio.move_on_after(seconds):
        await ticker.run()
    return ticker.percentiles_ms()


async def open_loop(
    requests: list[torch.Tensor], rate: float, concurrency: int, seed: int = 1
) -> dict[str, Any]:
    """Requests arrive as a Poisson process at ``rate`` per second, whatever is in flight; at
    most ``concurrency`` are served at once (a server's batch), the others wait in arrival
    order, and their latency counts from arrival."""
    rng = random.Random(seed)
    ticker = LagTicker()
    latencies: list[float] = []
    in_flight = max_in_flight = 0
    batch = anyio.CapacityLimiter(concurrency)

    async with HiCache.open(config(device_pages=4096)) as cache:

        async def one(tokens: torch.Tensor, arrival: float) -> None:
            nonlocal in_flight
            try:
                async with batch:
                    await serve(cache, tokens)
            finally:
                in_flight -= 1
                latencies.append(time.perf_counter() - arrival)

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker.run)
            async with anyio.create_task_group() as arrivals:
                start = due = time.perf_counter()
                pending = iter(requests)
                tokens = next(pending, None)
                while tokens is not None:
                    now = time.perf_counter()
                    if due > now:
                        await anyio.sleep(due - now)
                        continue
                    while tokens is not None and due <= time.perf_counter():  # all that are due
                        in_flight += 1
                        max_in_flight = max(max_in_flight, in_flight)
                        arrivals.start_soon(one, tokens, due)
                        due += rng.expovariate(rate)
                        tokens = next(pending, None)
                    await anyio.lowlevel.checkpoint()
            elapsed = time.perf_counter() - start
            tg.cancel_scope.cancel()
        ratio = hit_ratio(cache, requests)
        backed = backups(cache)
    return {
        "requests": len(requests),
        "arrival_rate_per_s": rate,
        "seconds": elapsed,
        "completed_per_s": len(requests) / elapsed,
        "hit_ratio_tokens": ratio,
        "max_in_flight": max_in_flight,  # arrived and not finished, waiting ones included
        "backups": backed,
        "latency_ms": percentiles_ms(latencies),
        "loop_lag_ms": ticker.percentiles_ms(),
    }


def bare_hit(cache: HiCache, tokens: torch.Tensor) -> torch.Tensor:
    """What a framework must do by hand for a safe hit: key (ids checked: one outside
    ``[0, 2**31)`` would fail later, hashing pages for L3 or events), match, lock the matched
    path while the model reads it (the host path too when part of the hit is host-only),
    unlock."""
    tree = cache.tree
    key = RadixKey(tokens)
    check_token_ids(key.data)
    match = tree.match_prefix(key)
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
    the prompt's page table (``insert_pages``: the pages are at hand, as in the session's
    usual commit), free the pages another request inserted first, unlock."""
    tree, allocator, ps = cache.tree, cache.l1.allocator, cache.page_size
    key = RadixKey(tokens)
    check_token_ids(key.data)  # as bare_hit
    match = tree.match_prefix(key)
    last_device, last_host = match.last_device_node, match.last_host_node
    tree.lock(last_device)
    host = last_host is not last_device
    if host:
        tree.lock_host(last_host)
    try:
        hit = match.device_hit_length
        pages = allocator.alloc(-(-(len(key) - hit) // ps))
        assert pages is not None
        # The model reads the hit's KV and writes the new KV through token slots.
        _model_slots = match.device_indices, pages_to_slots(pages, ps)
        assert len(key) % ps == 0, "with_tail() builds whole pages"
        present = tree.insert_pages(key, torch.cat([match.device_pages, pages]))
        if present > hit:  # another request cached these pages first: free our copies
            allocator.free(pages[: (present - hit) // ps])
        return present
    finally:
        if host:
            tree.unlock_host(last_host)
        tree.unlock(last_device)


class FloorSession:
    """The smallest session of the API's shape: ``async with`` matches and locks, ``await
    load()`` returns a ``Hit``, leaving unlocks. No checks, no counters, no room check, no
    prefetch or load logic: what the shape alone costs over :func:`bare_hit`."""

    __slots__ = ("cache", "key", "match")

    def __init__(self, cache: HiCache, tokens: torch.Tensor) -> None:
        self.cache, self.key = cache, RadixKey(tokens)

    async def __aenter__(self) -> FloorSession:
        check_token_ids(self.key.data)
        self.match = self.cache.tree.match_prefix(self.key)
        self.cache.tree.lock(self.match.last_device_node)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.cache.tree.unlock(self.match.last_device_node)

    async def load(self) -> Hit:
        indices = self.match.device_indices
        n = indices.numel()
        return Hit(n, indices, {Tier.DEVICE: n, Tier.HOST: 0, Tier.STORAGE: 0})


async def hit_path(requests: list[torch.Tensor], repeats: int) -> dict[str, Any]:
    """Per-request time of a full L1 hit: through a session, by hand (:func:`bare_hit`), and
    through :class:`FloorSession`.

    L1 holds every prompt (a small layout keeps that cheap), so nothing is evicted or loaded:
    what is measured is the bookkeeping. The three run back to back on each request, in an
    order that rotates from one request to the next, so each pair of samples sees the same
    machine state (this VM's speed drifts by 1.5x between runs, and between blocks of a few
    ms): ``overhead`` is the ratio of the summed times, ``overhead_median`` the median of the
    per-request ratios. ``overhead_blocks`` is the older figure, from blocks of 500 requests
    per path (a block's median), kept for comparison with earlier results."""
    pages = sum(t.numel() for t in requests) // SMALL.page_size + len(requests)
    async with HiCache.open(config(device_pages=pages, layout=SMALL)) as cache:
        for tokens in requests:  # warm: every prompt cached
            async with cache.session(tokens) as s:
                hit = await s.load()
                await s.commit(await s.allocate(tokens.numel() - hit.length))
        await cache.drain()

        clock = time.perf_counter

        async def timed(k: int, tokens: torch.Tensor) -> float:
            """One request through path ``k``, timed without any wrapper of its own."""
            if k == 0:
                start = clock()
                async with cache.session(tokens) as s:
                    (await s.load()).device_indices  # noqa: B018 - what the model reads
            elif k == 1:
                start = clock()
                bare_hit(cache, tokens)
            else:
                start = clock()
                async with FloorSession(cache, tokens) as f:
                    (await f.load()).device_indices  # noqa: B018
            return clock() - start

        paired: list[list[float]] = [[], [], []]
        blocks: list[list[float]] = [[], [], []]
        for rep in range(repeats):
            for i, tokens in enumerate(requests):
                for j in range(3):
                    k = (i + rep + j) % 3
                    paired[k].append(await timed(k, tokens))
            for k in range(3):
                block = [await timed(k, tokens) for tokens in requests]
                blocks[k].append(sum(block) / len(block))
    runtime, direct, floor = paired
    keys = [RadixKey(tokens).data for tokens in requests]
    start = clock()
    for data in keys:
        check_token_ids(data)
    token_check = (clock() - start) / len(keys)
    ratios = [r / d for r, d in zip(runtime, direct, strict=True)]
    floor_ratios = [f / d for f, d in zip(floor, direct, strict=True)]
    return {
        "runtime_us": statistics.median(runtime) * 1e6,
        "direct_us": statistics.median(direct) * 1e6,
        "overhead": sum(runtime) / sum(direct) - 1,
        "overhead_median": statistics.median(ratios) - 1,
        "api_floor_us": statistics.median(floor) * 1e6,
        "api_floor_overhead": sum(floor) / sum(direct) - 1,
        "api_floor_overhead_median": statistics.median(floor_ratios) - 1,
        "token_check_us": token_check * 1e6,  # of the by-hand time: the ids' range check
        "samples": len(ratios),
        "overhead_blocks": statistics.median(blocks[0]) / statistics.median(blocks[1]) - 1,
    }


def compare(runtime: list[float], direct: list[float]) -> dict[str, float]:
    """Per-request times (us) and overhead, from the medians of the repeats and from their
    minimums (the least disturbed repeat: others' jobs share this machine's cores)."""
    r, d = statistics.median(runtime), statistics.median(direct)
    return {
        "runtime_us": r * 1e6,
        "direct_us": d * 1e6,
        "overhead": r / d - 1,
        "runtime_us_min": min(runtime) * 1e6,
        "direct_us_min": min(direct) * 1e6,
        "overhead_min": min(runtime) / min(direct) - 1,
    }


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
                await s.commit(await s.allocate(tokens.numel() - hit.length))
        runtime, direct = [], []
        for _ in range(repeats):
            batch = [with_tail(t) for t in requests]
            start = time.perf_counter()
            for tokens in batch:
                async with cache.session(tokens) as s:
                    hit = await s.load()
                    await s.commit(await s.allocate(tokens.numel() - hit.length))
            runtime.append((time.perf_counter() - start) / len(batch))
            batch = [with_tail(t) for t in requests]
            start = time.perf_counter()
            for tokens in batch:
                bare_hit_and_tail(cache, tokens)
            direct.append((time.perf_counter() - start) / len(batch))
    return compare(runtime, direct)


def _move_lock(
    cache: HiCache, key: RadixKey, pages: torch.Tensor, cached: int, node: TreeNode
) -> TreeNode:
    """Insert a request's whole pages so far (``cached`` tokens of them were in the tree) and
    move its lock to their last node, freeing the pages another request inserted first
    (SGLang's ``cache_unfinished_req``)."""
    tree = cache.tree
    present = tree.insert_pages(key, pages)
    last = tree.find(key)
    if present > cached:  # this bench's prompts are fresh: the branch is there for fairness
        tree_pages, last = tree.device_path(key)
        mine = pages[: tree_pages.numel()]
        dup = mine[mine != tree_pages]
        if dup.numel():
            cache.l1.allocator.free(dup)
    tree.lock(last)
    tree.unlock(node)
    return last


def _locked_match(cache: HiCache, tokens: torch.Tensor) -> tuple[RadixKey, MatchResult]:
    """The key (ids checked, as bare_hit), its match, the matched device path locked."""
    key = RadixKey(tokens)
    check_token_ids(key.data)
    match = cache.tree.match_prefix(key)
    cache.tree.lock(match.last_device_node)
    return key, match


def bare_chunked(cache: HiCache, tokens: torch.Tensor, chunk: int) -> None:
    """A chunked prefill by hand: match and lock; per chunk, the pages it needs (the last page
    filled first), the chunk's slots, the whole pages so far into the tree and the lock moved
    down; at the end the private tail freed and the lock released."""
    tree, allocator, ps = cache.tree, cache.l1.allocator, cache.page_size
    key, match = _locked_match(cache, tokens)
    node = match.last_device_node
    table, own = match.device_pages, torch.empty(0, dtype=torch.int64)
    cached = done = match.device_hit_length
    try:
        while done < len(key):
            n = min(chunk, len(key) - done)
            need = -(-(done + n) // ps) - table.numel() - own.numel()
            if need > 0:
                fresh = allocator.alloc(need)
                assert fresh is not None
                own = torch.cat([own, fresh]) if own.numel() else fresh
            first = done - cached
            _model_slots = pages_to_slots(own[first // ps : -(-(first + n) // ps)], ps)
            done += n
            aligned = done // ps * ps
            if aligned > cached:
                k = (aligned - cached) // ps
                pages = torch.cat([table, own[:k]]) if table.numel() else own[:k]
                node = _move_lock(cache, key.prefix(aligned), pages, cached, node)
                table, own, cached = pages, own[k:], aligned
    finally:
        if own.numel():
            allocator.free(own)
        tree.unlock(node)


def bare_decode(cache: HiCache, tokens: torch.Tensor, steps: list[int]) -> None:
    """Decode by hand after a cached prompt (whole pages): per step the token appended to the
    key's bytes, a new page only when the last is full, the step's slot, and a full page into
    the tree with the lock moved down; at the end the private tail freed."""
    tree, allocator, ps = cache.tree, cache.l1.allocator, cache.page_size
    key, match = _locked_match(cache, tokens)
    node = match.last_device_node
    table, tail = match.device_pages, None
    data, n = bytearray(key.data), len(key)
    try:
        for token in steps:
            if not 0 <= token < 2**31:  # as bare_hit
                raise ValueError(f"token id {token} outside [0, 2**31)")
            data += token.to_bytes(8, "little", signed=True)
            if n % ps == 0:
                tail = allocator.alloc(1)
                assert tail is not None
            assert tail is not None
            _model_slot = tail * ps + n % ps
            n += 1
            if n % ps == 0:
                pages = torch.cat([table, tail])
                node = _move_lock(cache, RadixKey(bytes(data), copy=False), pages, n - ps, node)
                table, tail = pages, None
    finally:
        if tail is not None:
            allocator.free(tail)
        tree.unlock(node)


async def chunked_and_decode(
    requests: list[torch.Tensor], repeats: int, chunk: int = 40, steps: int = 32
) -> dict[str, Any]:
    """Per chunk of a chunked prefill and per decode step: through a session and by hand,
    paired request by request (the order alternates), write_back so that neither backs up."""
    ps = SMALL.page_size
    prompt_tokens = 160  # 10 pages in chunks of 40 tokens: every other commit ends mid-page
    per_request = prompt_tokens // ps + 1 + steps // ps + 1
    pages = len(requests) * (2 * repeats * per_request + 2) + sum(t.numel() for t in requests)
    cfg = config(device_pages=pages, layout=SMALL).model_copy(update={"write_policy": "write_back"})
    fresh = iter(range(10**9, 2 * 10**9, prompt_tokens))
    clock = time.perf_counter

    def fresh_prompt() -> torch.Tensor:
        first = next(fresh)
        return torch.arange(first, first + prompt_tokens)

    async with HiCache.open(cfg) as cache:
        decode_prompts = [t[: t.numel() // ps * ps] for t in requests]
        for tokens in decode_prompts:  # cached: decode starts at a page boundary
            async with cache.session(tokens) as s:
                hit = await s.load()
                await s.commit(await s.allocate(tokens.numel() - hit.length))

        async def chunked_session(tokens: torch.Tensor) -> float:
            start = clock()
            async with cache.session(tokens) as s:
                done = (await s.load()).length
                while done < tokens.numel():
                    n = min(chunk, tokens.numel() - done)
                    await s.commit(await s.allocate(n))
                    done += n
            return clock() - start

        def chunked_by_hand(tokens: torch.Tensor) -> float:
            start = clock()
            bare_chunked(cache, tokens, chunk)
            return clock() - start

        async def decode_session(tokens: torch.Tensor, out: list[int]) -> float:
            start = clock()
            async with cache.session(tokens) as s:
                await s.load()
                for token in out:
                    s.extend([token])
                    await s.commit(await s.allocate(1))
            return clock() - start

        async def decode_scheduler(tokens: torch.Tensor, out: list[int]) -> float:
            """The scheduler-level API's step: synchronous allocate and commit."""
            start = clock()
            s = cache.session(tokens).enter()
            await s.load()
            for token in out:
                s.extend([token])
                slots = s.try_allocate(1)
                assert slots is not None
                s.commit_nowait(slots)
            s.finish()
            return clock() - start

        def decode_by_hand(tokens: torch.Tensor, out: list[int]) -> float:
            start = clock()
            bare_decode(cache, tokens, out)
            return clock() - start

        samples: dict[str, list[float]] = {k: [] for k in ("cs", "ch", "ds", "dh", "dx")}
        next_id = iter(range(2 * 10**9, 2**31))  # fresh ids (the prompts use fewer)
        for rep in range(repeats):
            for i, tokens in enumerate(decode_prompts):
                first = (i + rep) % 2 == 0
                a, b = fresh_prompt(), fresh_prompt()
                if first:
                    samples["cs"].append(await chunked_session(a))
                samples["ch"].append(chunked_by_hand(b))
                if not first:
                    samples["cs"].append(await chunked_session(a))
                out_a = [next(next_id) for _ in range(steps)]
                out_b = [next(next_id) for _ in range(steps)]
                if first:
                    samples["ds"].append(await decode_session(tokens, out_a))
                samples["dh"].append(decode_by_hand(tokens, out_b))
                if not first:
                    samples["ds"].append(await decode_session(tokens, out_a))
                samples["dx"].append(await decode_scheduler(tokens, [next(next_id) for _ in out_a]))
        cache.check()
    n_chunks = -(-prompt_tokens // chunk)

    def per(key: str, n: int) -> float:
        return statistics.median(samples[key]) / n * 1e6

    def ratios(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(samples[a], samples[b], strict=True)) - 1

    return {
        "chunk": {
            "chunks_per_request": n_chunks,
            "chunk_tokens": chunk,
            "runtime_us_per_chunk": per("cs", n_chunks),
            "direct_us_per_chunk": per("ch", n_chunks),
            "overhead": sum(samples["cs"]) / sum(samples["ch"]) - 1,
            "overhead_median": ratios("cs", "ch"),
        },
        "decode": {
            "steps_per_request": steps,
            "runtime_us_per_step": per("ds", steps),
            "direct_us_per_step": per("dh", steps),
            "overhead": sum(samples["ds"]) / sum(samples["dh"]) - 1,
            "overhead_median": ratios("ds", "dh"),
            "scheduler_api_us_per_step": per("dx", steps),
            "scheduler_api_overhead": sum(samples["dx"]) / sum(samples["dh"]) - 1,
        },
        "samples": len(samples["cs"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--load", type=float, default=0.6, help="open-loop arrival rate / closed-loop throughput"
    )
    parser.add_argument("--rate", type=float, help="open-loop arrivals per second (over --load)")
    parser.add_argument(
        "--rates",
        default="1000,1500,2000",
        help="open-loop sweep at these absolute rates (requests/s; empty for none)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    reqs = prompts(args.requests)

    def run(phase: Any, *phase_args: Any) -> Any:
        # A closed cache's pools (hundreds of MiB) are freed when the cyclic collector gets to
        # them: collect now, not in the middle of the next phase's measurement.
        gc.collect()
        return anyio.run(phase, *phase_args)

    closed = run(mixed, reqs, args.concurrency)
    rate = args.rate or args.load * closed["requests_per_s"]
    result = {
        "mixed": closed,
        "open_loop": {
            **run(open_loop, reqs, rate, args.concurrency),
            "load": rate / closed["requests_per_s"],
            "idle_loop_lag_ms": run(idle_lag),
        },
        "open_loop_sweep": [
            run(open_loop, reqs, float(r), args.concurrency) for r in args.rates.split(",") if r
        ],
        "hit_path": run(hit_path, reqs[:500], args.repeats),
        "hit_and_tail": run(hit_and_tail, reqs[:500], args.repeats),
        "lifecycle": run(chunked_and_decode, reqs[:200], max(1, args.repeats // 3)),
        "machine": {"torch": torch.__version__, "threads": torch.get_num_threads()},
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m, o, h, t = (result[k] for k in ("mixed", "open_loop", "hit_path", "hit_and_tail"))
    lag = "p50 {p50:.2f} ms p99 {p99:.2f} ms max {max:.2f} ms"
    print(
        f"closed loop: {m['requests_per_s']:.0f} requests/s, hit ratio "
        f"{m['hit_ratio_tokens']:.2f}, loop lag {lag.format(**m['loop_lag_ms'])}"
    )
    print(
        f"open loop at {o['arrival_rate_per_s']:.0f} requests/s ({o['load']:.0%} of that): "
        f"loop lag {lag.format(**o['loop_lag_ms'])}; latency {lag.format(**o['latency_ms'])}; "
        f"idle loop lag {lag.format(**o['idle_loop_lag_ms'])}"
    )
    for sweep in result["open_loop_sweep"]:
        print(
            f"open loop at {sweep['arrival_rate_per_s']:.0f} requests/s: loop lag "
            f"{lag.format(**sweep['loop_lag_ms'])}; backups deferred "
            f"{sweep['backups']['skipped']}, max in flight {sweep['max_in_flight']}"
        )
    print(
        f"hit path: runtime {h['runtime_us']:.1f} us, by hand {h['direct_us']:.1f} us, "
        f"overhead {h['overhead']:.1%} (median of pairs {h['overhead_median']:.1%}; API "
        f"floor {h['api_floor_overhead']:.1%}; in blocks {h['overhead_blocks']:.1%})"
    )
    print(
        f"hit + new page: runtime {t['runtime_us']:.1f} us, by hand {t['direct_us']:.1f} us, "
        f"overhead {t['overhead']:.0%} (min {t['overhead_min']:.0%})"
    )
    c, d = result["lifecycle"]["chunk"], result["lifecycle"]["decode"]
    print(
        f"chunked prefill: runtime {c['runtime_us_per_chunk']:.1f} us per chunk, by hand "
        f"{c['direct_us_per_chunk']:.1f} us, overhead {c['overhead']:.1%} (median of pairs "
        f"{c['overhead_median']:.1%})"
    )
    print(
        f"decode step: runtime {d['runtime_us_per_step']:.1f} us, by hand "
        f"{d['direct_us_per_step']:.1f} us, overhead {d['overhead']:.1%} (median of pairs "
        f"{d['overhead_median']:.1%}); scheduler-level API {d['scheduler_api_us_per_step']:.1f} "
        f"us ({d['scheduler_api_overhead']:.1%})"
    )


if __name__ == "__main__":
    main()
