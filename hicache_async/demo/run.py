"""The demo: multi-turn chats with shared system prompts, served by a small transformer through
the cache, every cached prefix and every generated token checked against recomputation.

Each turn is a whole request lifecycle: the prompt (the chat so far and a new user message) is
prefilled in chunks, each committed as it is written; then a few tokens are decoded greedily,
each fed back through ``s.extend`` / ``allocate`` / ``commit``. The next turn's prompt holds
the answer, so its whole pages are hit like the prompt's. Requests are admitted by their worst
case of L1 pages (:mod:`hicache_async.demo.budget`) and interleave step by step.

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
from hicache_async.demo.budget import PageBudget, worst_case_pages
from hicache_async.demo.model import TinyCausalLM
from hicache_async.metrics import CacheStats, Tier
from hicache_async.session import Hit

__all__ = ["DemoOptions", "DemoReport", "Turn", "default_demo_dir", "run_demo"]


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
    answer_tokens: tuple[int, int] = (8, 24)  # greedy decode steps per turn, at random in range
    chunk_tokens: int = 128  # chunked prefill: a commit per chunk
    page_size: int = 16
    device_pages: int = 160  # 2,560 tokens: room for the requests in flight, not for all chats
    host_pages: int = 400
    seed: int = 0
    model_name: str = "hicache-demo-tiny"  # namespaces the demo's pages in the L3 directory


@dataclass(eq=False)
class Turn:
    """One request: its prompt, the answer it generated, and what the cache gave it."""

    prompt: torch.Tensor
    answers: list[tuple[int, int]]  # where earlier answers lie in the prompt: [start, end)
    answer: list[int] = field(default_factory=list)
    hit: int = 0  # prompt tokens found cached
    answer_hits: dict[Tier, int] = field(default_factory=dict)  # of them, earlier answers'
    logits: torch.Tensor | None = None  # of prompt[hit:], then of each answer token fed

    @property
    def fed(self) -> torch.Tensor:
        """What the model ran on: the prompt, then the answer but its last token."""
        return torch.cat([self.prompt, torch.tensor(self.answer[:-1], dtype=torch.int64)])


@dataclass
class DemoReport:
    """What the demo measured."""

    requests: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0  # prefill tokens the model actually ran
    output_tokens: int = 0  # tokens generated
    answer_tokens_in_prompts: int = 0  # tokens of earlier answers that later prompts held
    answer_tokens_hit: int = 0  # of them, found cached
    admission_waits: int = 0  # requests that waited for their worst case of L1 pages
    verified: int = 0  # requests whose logits and tokens equalled recomputation
    max_abs_diff: float = 0.0
    wall_s: float = 0.0  # serving through the cache
    no_cache_s: float = 0.0  # the same requests computed from scratch
    stats: CacheStats | None = None
    turns: list[Turn] = field(default_factory=list)  # every request, in the order served

    def answer_hits(self, tier: Tier) -> int:
        return sum(turn.answer_hits.get(tier, 0) for turn in self.turns)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "computed_tokens": self.computed_tokens,
            "saved_tokens": self.prompt_tokens - self.computed_tokens,
            "output_tokens": self.output_tokens,
            "answer_tokens_in_prompts": self.answer_tokens_in_prompts,
            "answer_tokens_hit": self.answer_tokens_hit,
            "answer_tokens_hit_by_tier": {tier.value: self.answer_hits(tier) for tier in Tier},
            "admission_waits": self.admission_waits,
            "verified": self.verified,
            "max_abs_diff": self.max_abs_diff,
            "wall_s": self.wall_s,
            "no_cache_s": self.no_cache_s,
            "stats": self.stats.model_dump(mode="json") if self.stats else None,
        }


@dataclass
class _Chat:
    system: torch.Tensor
    users: list[torch.Tensor]  # one user message per turn
    answer_lengths: list[int]


def _chats(options: DemoOptions, vocab: int) -> list[_Chat]:
    """Each conversation's system prompt, user messages and answer lengths (the answers
    themselves are the model's)."""
    rng = random.Random(options.seed)
    gen = torch.Generator().manual_seed(options.seed)
    systems = [
        torch.randint(0, vocab, (rng.randint(150, 260),), generator=gen)
        for _ in range(options.system_prompts)
    ]
    low, high = options.answer_tokens
    return [
        _Chat(
            system=systems[rng.randrange(len(systems))],
            users=[
                torch.randint(0, vocab, (rng.randint(20, 90),), generator=gen)
                for _ in range(options.turns)
            ],
            answer_lengths=[rng.randint(low, high) for _ in range(options.turns)],
        )
        for _ in range(options.conversations)
    ]


def _answer_hits(hit: Hit, answers: list[tuple[int, int]]) -> dict[Tier, int]:
    """How many tokens of earlier answers the hit covers, by the tier each came from (the
    hit's tokens are in tier order: L1's, then L2's, then those L3 brought)."""
    counts, start = {}, 0
    for tier in Tier:
        end = start + hit.tokens_by_tier.get(tier, 0)
        counts[tier] = sum(max(0, min(end, b) - max(start, a)) for a, b in answers)
        start = end
    return counts


async def _serve(
    cache: HiCache, model: TinyCausalLM, turn: Turn, n_new: int, chunk_tokens: int
) -> None:
    """One turn: chunked prefill of the prompt, then ``n_new`` greedy tokens."""
    pool, prompt = cache.device_pool, turn.prompt
    logits: list[torch.Tensor] = []
    async with cache.session(prompt) as s:
        await s.prefetch()
        hit = await s.load(limit=prompt.numel() - 1)  # the last token is computed for logits
        turn.hit, turn.answer_hits = hit.length, _answer_hits(hit, turn.answers)
        done = hit.length
        while done < prompt.numel():  # chunked prefill: whole pages enter the tree per chunk
            chunk = prompt[done : done + chunk_tokens]
            slots = await s.allocate(chunk.numel())
            logits.append(model.forward_cached(chunk, s.device_indices, slots, pool))
            await s.commit(slots)
            done += chunk.numel()
            await anyio.lowlevel.checkpoint()  # other requests' steps run between ours
        turn.answer.append(int(logits[-1][-1].argmax()))
        while len(turn.answer) < n_new:  # decode: feed the last token generated
            fed = torch.tensor(turn.answer[-1:], dtype=torch.int64)
            s.extend(fed)
            slot = await s.allocate(1)  # a new page only when the last one is full
            logits.append(model.forward_cached(fed, s.device_indices, slot, pool))
            await s.commit(slot)
            turn.answer.append(int(logits[-1][-1].argmax()))
            await anyio.lowlevel.checkpoint()
    turn.logits = torch.cat(logits)


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
    chats = _chats(options, vocab=model.embed.num_embeddings)
    report = DemoReport()
    start = time.perf_counter()
    async with HiCache.open(config) as cache:
        limiter = anyio.CapacityLimiter(options.concurrency)
        budget = PageBudget(options.device_pages)

        async def chat(spec: _Chat) -> None:
            history, answers = spec.system, list[tuple[int, int]]()
            for user, n_new in zip(spec.users, spec.answer_lengths, strict=True):
                turn = Turn(torch.cat([history, user]), list(answers))
                pages = worst_case_pages(turn.prompt.numel() + n_new - 1, options.page_size)
                async with limiter, budget.reserve(pages):
                    await _serve(cache, model, turn, n_new, options.chunk_tokens)
                report.turns.append(turn)
                # The next turn repeats the whole chat: this prompt, the answer, a new message.
                answers.append((turn.prompt.numel(), turn.prompt.numel() + n_new))
                history = torch.cat([turn.prompt, torch.tensor(turn.answer, dtype=torch.int64)])

        async with anyio.create_task_group() as tg:
            for spec in chats:
                tg.start_soon(chat, spec)
        report.wall_s = time.perf_counter() - start
        report.admission_waits = budget.waited
        await cache.drain()
        report.stats = cache.stats()
    start = time.perf_counter()
    expected = [model.forward_full(turn.fed) for turn in report.turns]
    report.no_cache_s = time.perf_counter() - start
    for turn, full in zip(report.turns, expected, strict=True):
        _check(report, turn, full)
    return report


def _check(report: DemoReport, turn: Turn, full: torch.Tensor) -> None:
    """Compare one request with its recomputation: the logits of everything it computed
    (prefill after the hit, every decode step) and its greedy tokens."""
    got, want = turn.logits, full[turn.hit :]
    assert got is not None
    if got.numel():
        report.max_abs_diff = max(report.max_abs_diff, float((got - want).abs().max()))
    greedy = full[turn.prompt.numel() - 1 :].argmax(-1).tolist()
    exact = got.shape == want.shape and torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    report.verified += bool(exact and greedy == turn.answer)
    report.requests += 1
    report.prompt_tokens += turn.prompt.numel()
    report.computed_tokens += turn.prompt.numel() - turn.hit
    report.output_tokens += len(turn.answer)
    report.answer_tokens_in_prompts += sum(b - a for a, b in turn.answers)
    report.answer_tokens_hit += sum(turn.answer_hits.values())


def format_report(report: DemoReport, directory: Path) -> str:
    """The per-tier table the demo prints."""
    stats = report.stats
    assert stats is not None
    lines = [
        f"hicache-async demo: {report.requests} requests, L3 in {directory}",
        "",
        f"{'tier':<10}{'hit tokens':>12}{'of answers':>12}{'hit pages':>11}{'used pages':>12}"
        f"{'capacity':>10}",
    ]
    for tier in Tier:
        t = stats.tiers[tier]
        capacity = "-" if t.capacity_pages is None else str(t.capacity_pages)
        lines.append(
            f"{tier.value:<10}{t.hit_tokens:>12}{report.answer_hits(tier):>12}{t.hit_pages:>11}"
            f"{t.used_pages:>12}{capacity:>10}"
        )
    saved = report.prompt_tokens - report.computed_tokens
    repeated, hit = report.answer_tokens_in_prompts, report.answer_tokens_hit
    lines += [
        "",
        f"prefill tokens: {report.prompt_tokens} in prompts, {report.computed_tokens} computed, "
        f"{saved} saved ({saved / max(1, report.prompt_tokens):.0%})",
        f"answers: {report.output_tokens} tokens decoded; later prompts repeated {repeated}, "
        f"{hit} of them hit ({hit / max(1, repeated):.0%})",
        f"admission: {report.admission_waits} of {report.requests} requests waited for their "
        f"most L1 pages to be free",
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
        f"(prefill, decode steps, tokens; max |diff| {report.max_abs_diff:.2e})",
        f"wall time: {report.wall_s:.2f} s serving through the cache (decoding one token a "
        f"step), {report.no_cache_s:.2f} s to recompute every request in one pass (the check)",
    ]
    return "\n".join(lines)
