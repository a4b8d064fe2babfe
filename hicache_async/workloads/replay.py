"""Replaying a Mooncake-format trace through the real runtime (``hicache-async replay``).

Each trace hash id is one page of ``page_tokens`` tokens; its tokens and KV bytes are pure
functions of the hash id (:mod:`hicache_async.workloads.mooncake`), so with ``verify`` every
hit is compared byte for byte with what the page must hold. Requests go through sessions as a
server would send them: match, prefetch, load, allocate the rest, write its KV, commit.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import torch
from anyio.streams.memory import MemoryObjectReceiveStream

from hicache_async.cache import HiCache
from hicache_async.config import HiCacheConfig
from hicache_async.errors import CapacityError, ConfigError
from hicache_async.layout import KVLayout
from hicache_async.metrics import Tier
from hicache_async.workloads.mooncake import (
    TraceRequest,
    load_mooncake_trace,
    page_kv,
    request_tokens,
)

__all__ = ["ReplayOptions", "ReplayResult", "replay"]

TRACE_BLOCK_TOKENS = 512  # the Mooncake traces hash 512-token blocks


@dataclass
class ReplayOptions:
    """How to replay a trace (the CLI's flags)."""

    trace: Path
    page_tokens: int = 16
    l1_pages: int = 4096
    l2_pages: int = 0  # 0: no L2
    l3: str = "none"
    l3_path: Path | None = None
    model_name: str = "replay"  # namespaces the trace's pages in a shared L3
    eviction_policy: str = "lru"
    write_policy: str = "write_through"
    prefetch_policy: str = "wait_complete"
    concurrency: int = 1
    verify: bool = False
    drain_each: bool = False  # wait for every backup and L3 write before the next request
    limit: int | None = None
    progress: bool = False


@dataclass
class ReplayResult:
    """What the replay measured (``as_dict`` is the ``--json`` document)."""

    requests: int = 0
    pages: int = 0
    hit_pages: int = 0
    input_tokens: int = 0
    hit_tokens: int = 0  # min(hit blocks x 512, input length), as the reference counts
    verify_failures: int = 0
    refused: int = 0  # requests L1 could not hold (counted as misses)
    wall_s: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    # Per window of requests: (requests so far, pages, device, host, storage hit pages).
    timeline: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    _window: list[int] = field(default_factory=lambda: [0, 0, 0, 0])

    def as_dict(self) -> dict[str, Any]:
        tiers = self.stats.get("tiers", {})
        return {
            "requests": self.requests,
            "pages": self.pages,
            "hit_pages": self.hit_pages,
            "hit_ratio_pages": self.hit_pages / max(1, self.pages),
            "hit_ratio_tokens": self.hit_tokens / max(1, self.input_tokens),
            "tiers": {
                tier.value: {"hit_pages": tiers.get(tier.value, {}).get("hit_pages", 0)}
                for tier in Tier
            },
            "verify_failures": self.verify_failures,
            "refused": self.refused,
            "wall_s": self.wall_s,
            "stats": self.stats,
        }


def plot(result: ReplayResult, path: Path) -> None:
    """Hit ratio per tier over the replay, in windows of 200 requests (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ConfigError("--plot needs matplotlib: pip install 'hicache-async[plot]'") from exc
    xs = [row[0] for row in result.timeline]
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0.0] * len(xs)
    for i, tier in enumerate(Tier, start=2):
        ys = [row[i] / max(1, row[1]) for row in result.timeline]
        ax.fill_between(
            xs,
            bottom,
            [b + y for b, y in zip(bottom, ys, strict=True)],
            label=f"{tier.value} hits",
            step="mid",
        )
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set_xlabel("requests replayed")
    ax.set_ylabel("hit ratio (pages), per 200 requests")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title("hicache-async replay: where the hits came from")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _layout(page_tokens: int) -> KVLayout:
    # Tiny on purpose: one layer, 8 values per token, so a replay of 12k requests is quick.
    return KVLayout(
        num_layers=1, num_kv_heads=1, head_dim=4, dtype="float16", page_size=page_tokens
    )


def _config(options: ReplayOptions) -> HiCacheConfig:
    extra = None
    if options.l3 == "file":
        path = options.l3_path or Path.home() / ".cache" / "hicache-async" / "replay"
        extra = json.dumps({"path": str(path)})  # a quote or backslash in the path stays JSON
    return HiCacheConfig(
        layout=_layout(options.page_tokens),
        model_name=options.model_name,
        device="cpu",
        device_pages=options.l1_pages,
        host_pages=options.l2_pages,
        storage_backend=options.l3,
        storage_backend_extra_config=extra,
        eviction_policy=options.eviction_policy,
        write_policy=options.write_policy,
        prefetch_policy=options.prefetch_policy,
        prefetch_threshold=options.page_tokens,
    )


class _Verifier:
    """Writes each page's derived KV, and checks hits against it."""

    def __init__(self, cache: HiCache) -> None:
        self.cache = cache
        self.layout = cache.layout

    def write(self, hash_ids: tuple[int, ...], slots: torch.Tensor) -> None:
        if not hash_ids:
            return
        pages = torch.stack([page_kv(h, self.layout) for h in hash_ids])  # [p, L, planes, ...]
        pool = self.cache.device_pool
        for layer in range(self.layout.num_layers):
            data = pages[:, layer].transpose(0, 1)  # [planes, p, page, heads, dim]
            k = data[0].reshape(-1, self.layout.num_kv_heads, self.layout.head_dim)
            v = None if self.layout.use_mla else data[1].reshape(k.shape)
            pool.set_kv_buffer(layer, slots, k, v)

    def failures(self, hash_ids: tuple[int, ...], slots: torch.Tensor) -> int:
        pool = self.cache.device_pool
        size = self.layout.page_size
        bad = 0
        for i, h in enumerate(hash_ids):
            want = page_kv(h, self.layout)
            page = slots[i * size : (i + 1) * size]
            for layer in range(self.layout.num_layers):
                got = pool.get_key_buffer(layer)[page]
                if not torch.equal(got.view(torch.uint8), want[layer, 0].view(torch.uint8)):
                    bad += 1
                    break
        return bad


async def _serve(
    cache: HiCache,
    request: TraceRequest,
    options: ReplayOptions,
    result: ReplayResult,
    verifier: _Verifier | None,
) -> None:
    tokens = request_tokens(request.hash_ids, options.page_tokens)
    size = options.page_tokens
    hit_pages = 0
    async with cache.session(tokens) as s:
        await s.prefetch()
        hit = await s.load()
        hit_pages = hit.length // size
        if verifier is not None:
            result.verify_failures += verifier.failures(
                request.hash_ids[:hit_pages], hit.device_indices
            )
        try:
            new = await s.allocate(tokens.numel() - hit.length)
        except CapacityError:
            result.refused += 1
        else:
            if verifier is not None:
                verifier.write(request.hash_ids[hit_pages:], new)
            await s.commit(new)
    result.requests += 1
    result.pages += len(request.hash_ids)
    result.hit_pages += hit_pages
    window = result._window
    window[0] += len(request.hash_ids)
    for i, tier in enumerate(Tier, start=1):
        window[i] += hit.tokens_by_tier.get(tier, 0) // size
    if result.requests % 200 == 0:
        result.timeline.append((result.requests, *window))  # type: ignore[arg-type]
        result._window = [0, 0, 0, 0]
    result.input_tokens += request.input_length
    result.hit_tokens += min(hit_pages * TRACE_BLOCK_TOKENS, request.input_length)


async def replay(options: ReplayOptions) -> ReplayResult:
    """Replay ``options.trace`` through a fresh cache; the hit ratios and per-tier hits."""
    requests = load_mooncake_trace(options.trace, limit=options.limit)
    result = ReplayResult()
    start = time.perf_counter()
    async with HiCache.open(_config(options)) as cache:
        verifier = _Verifier(cache) if options.verify else None
        send, receive = anyio.create_memory_object_stream[TraceRequest](
            max_buffer_size=max(1, options.concurrency)
        )

        async def worker(queue: MemoryObjectReceiveStream[TraceRequest]) -> None:
            async with queue:
                async for request in queue:
                    await _serve(cache, request, options, result, verifier)
                    if options.drain_each:  # as if the model's compute took longer than copies
                        await cache.drain()
                    if options.progress and result.requests % 500 == 0:
                        ratio = result.hit_pages / max(1, result.pages)
                        print(
                            f"\r{result.requests}/{len(requests)} requests, hit ratio {ratio:.3f}",
                            end="",
                            file=sys.stderr,
                            flush=True,
                        )

        async with anyio.create_task_group() as tg:
            with receive:
                for _ in range(max(1, options.concurrency)):
                    tg.start_soon(worker, receive.clone())
            async with send:
                for request in requests:
                    await send.send(request)
        await cache.drain()
        result.stats = cache.stats().model_dump(mode="json")
    if options.progress:
        print(file=sys.stderr)
    result.wall_s = time.perf_counter() - start
    return result
