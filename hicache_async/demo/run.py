"""The demo: multi-turn chats with shared system prompts, served by a small transformer through
the cache, every cached prefix checked against recomputation.

L1 is kept small so that L2 and the file L3 come into play; the L3 directory persists between
runs (``~/.cache/hicache-async/demo`` unless told otherwise), so a second run starts with L3 hits.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import torch

from hicache_async.cache import HiCache
from hicache_async.config import HiCacheConfig
from hicache_async.demo.model import TinyCausalLM
from hicache_async.metrics import CacheStats, Tier

__all__ = ["DemoOptions", "DemoReport", "default_demo_dir", "run_demo"]


def default_demo_dir() -> Path:
    """Where the demo keeps its L3 pages between runs."""
    return Path.home() / ".cache" / "hicache-async" / "demo"


@dataclass
class DemoOptions:
    """What the demo serves and where its L3 lives."""

    directory: Path = field(default_factory=default_demo_dir)
    conversations: int = 24
    turns: int = 4
    concurrency: int = 8
    system_prompts: int = 3
    page_size: int = 16
    device_pages: int = 160  # 2,560 tokens: room for the requests in flight, not for all chats
    host_pages: int = 400
    seed: int = 0
    model_name: str = "hicache-demo-tiny"  # namespaces the demo's pages in the L3 directory


@dataclass
class DemoReport:
    """What the demo measured."""

    requests: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0  # prefill tokens the model actually ran
    verified: int = 0  # requests whose logits equalled recomputation
    max_abs_diff: float = 0.0
    wall_s: float = 0.0  # serving through the cache
    no_cache_s: float = 0.0  # the same prompts computed from scratch
    stats: CacheStats | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "computed_tokens": self.computed_tokens,
            "saved_tokens": self.prompt_tokens - self.computed_tokens,
            "verified": self.verified,
            "max_abs_diff": self.max_abs_diff,
            "wall_s": self.wall_s,
            "no_cache_s": self.no_cache_s,
            "stats": self.stats.model_dump(mode="json") if self.stats else None,
        }


def _conversations(options: DemoOptions, vocab: int) -> list[list[torch.Tensor]]:
    """Each conversation's prompts, turn by turn: system prompt, then user and reply turns."""
    rng = random.Random(options.seed)
    gen = torch.Generator().manual_seed(options.seed)
    systems = [
        torch.randint(0, vocab, (rng.randint(150, 260),), generator=gen)
        for _ in range(options.system_prompts)
    ]
    chats = []
    for _ in range(options.conversations):
        prompt = systems[rng.randrange(len(systems))]
        turns = []
        for _ in range(options.turns):
            user = torch.randint(0, vocab, (rng.randint(20, 90),), generator=gen)
            prompt = torch.cat([prompt, user])
            turns.append(prompt)
            reply = torch.randint(0, vocab, (rng.randint(10, 40),), generator=gen)
            prompt = torch.cat([prompt, reply])  # the next turn repeats the whole history
        chats.append(turns)
    return chats


async def _serve(
    cache: HiCache, model: TinyCausalLM, tokens: torch.Tensor, served: list[_Served]
) -> None:
    async with cache.session(tokens) as s:
        await s.prefetch()
        hit = await s.load(limit=tokens.numel() - 1)  # the last token is computed for logits
        new = await s.allocate(tokens.numel() - hit.length)
        logits = model.forward_cached(
            tokens[hit.length :],
            hit.device_indices,
            new.to(cache.device_pool.device),
            cache.device_pool,
        )
        await s.commit(new)
    served.append(_Served(tokens, hit.length, logits))
    await (
        anyio.lowlevel.checkpoint()
    )  # let the background copies run between requests, as a scheduler would


@dataclass
class _Served:
    tokens: torch.Tensor
    hit: int
    logits: torch.Tensor


async def run_demo(options: DemoOptions) -> DemoReport:
    """Serve the demo's chats through a fresh cache on ``options.directory``."""
    model = TinyCausalLM(seed=options.seed)
    layout = model.kv_layout(options.page_size)
    options.directory.mkdir(parents=True, exist_ok=True)
    config = HiCacheConfig(
        layout=layout,
        model_name=options.model_name,
        device="cpu",
        device_pages=options.device_pages,
        host_pages=options.host_pages,
        storage_backend="file",
        storage_backend_extra_config=json.dumps({"path": str(options.directory)}),
        prefetch_policy="wait_complete",
        prefetch_threshold=options.page_size,
    )
    chats = _conversations(options, vocab=model.embed.num_embeddings)
    report = DemoReport()
    served: list[_Served] = []
    start = time.perf_counter()
    async with HiCache.open(config) as cache:
        limiter = anyio.CapacityLimiter(options.concurrency)

        async def chat(turns: list[torch.Tensor]) -> None:
            for tokens in turns:  # the turns of one chat are sequential, chats concurrent
                async with limiter:
                    await _serve(cache, model, tokens, served)

        async with anyio.create_task_group() as tg:
            for turns in chats:
                tg.start_soon(chat, turns)
        report.wall_s = time.perf_counter() - start
        await cache.drain()
        report.stats = cache.stats()
    start = time.perf_counter()
    expected = [model.forward_full(item.tokens) for item in served]
    report.no_cache_s = time.perf_counter() - start
    for item, full in zip(served, expected, strict=True):
        got, want = item.logits, full[item.hit :]
        if got.numel():
            report.max_abs_diff = max(report.max_abs_diff, float((got - want).abs().max()))
        report.verified += bool(torch.allclose(got, want, atol=1e-4, rtol=1e-4))
        report.requests += 1
        report.prompt_tokens += item.tokens.numel()
        report.computed_tokens += item.tokens.numel() - item.hit
    return report


def format_report(report: DemoReport, directory: Path) -> str:
    """The per-tier table the demo prints."""
    stats = report.stats
    assert stats is not None
    lines = [
        f"hicache-async demo: {report.requests} requests, L3 in {directory}",
        "",
        f"{'tier':<10}{'hit tokens':>12}{'hit pages':>11}{'used pages':>12}{'capacity':>10}",
    ]
    for tier in Tier:
        t = stats.tiers[tier]
        capacity = "-" if t.capacity_pages is None else str(t.capacity_pages)
        lines.append(
            f"{tier.value:<10}{t.hit_tokens:>12}{t.hit_pages:>11}{t.used_pages:>12}{capacity:>10}"
        )
    saved = report.prompt_tokens - report.computed_tokens
    lines += [
        "",
        f"prefill tokens: {report.prompt_tokens} in prompts, {report.computed_tokens} computed, "
        f"{saved} saved ({saved / max(1, report.prompt_tokens):.0%})",
        "",
        f"{'transition':<12}{'moves':>7}{'pages':>8}{'MB':>9}{'MB/s':>10}",
    ]
    for name, moved in stats.transitions.items():
        lines.append(
            f"{name.value:<12}{moved.count:>7}{moved.pages:>8}{moved.bytes / 1e6:>9.2f}"
            f"{moved.bandwidth_bytes_per_s / 1e6:>10.1f}"
        )
    lines += [
        "",
        f"logits equal to recomputation: {report.verified}/{report.requests} requests "
        f"(max |diff| {report.max_abs_diff:.2e})",
        f"wall time: {report.wall_s:.2f} s serving through the cache, "
        f"{report.no_cache_s:.2f} s to prefill every prompt from scratch",
    ]
    return "\n".join(lines)
