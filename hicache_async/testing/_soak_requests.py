"""The soak's requests: a served one through the public session API, checked bit for bit,
and the bad ones, each of which must be refused with a ``HiCacheError`` at its call.

A served request: enter, prefetch, load, check every byte of the hit against the oracle,
allocate the rest, write its KV as a model would, commit, exit. Counts go to a :class:`Tally`.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import torch

from hicache_async.cache import HiCache
from hicache_async.config import PrefetchPolicy
from hicache_async.errors import CapacityError, HiCacheError
from hicache_async.session import Session
from hicache_async.testing._soak_kv import expected_kv, prefix_hashes, write_kv, wrong_bytes
from hicache_async.testing._soak_watch import InFlight
from hicache_async.testing._soak_workload import BAD_KINDS, RequestPlan

__all__ = ["MAX_ERRORS", "Tally", "run_bad", "serve"]

MAX_ERRORS = 10  # errors kept with their tracebacks (the rest are only counted)
DEADLINE_SLACK_S = 1.0  # a timed prefetch may end this long after its deadline
ALLOCATE_TIMEOUT_S = 2.0  # a request waits this long for L1 room, then gives up (counted)


@dataclass
class Tally:
    """What the soak counted (the JSON report is built from it)."""

    requests: int = 0
    ended: int = 0
    served: int = 0
    cancelled: int = 0  # cancelled before they ended (of ``cancels`` planned)
    cancels: int = 0  # requests sent with a cancellation planned
    capacity_refusals: int = 0
    killed: int = 0  # in flight when their cache died
    prompt_tokens: int = 0
    hit_tokens: int = 0
    hits_by_tier: Counter[str] = field(default_factory=Counter)
    hits_checked: int = 0
    wrong_hits: int = 0
    wrong_bytes: int = 0
    request_errors: Counter[str] = field(default_factory=Counter)  # HiCacheError of a request
    unexpected_errors: Counter[str] = field(default_factory=Counter)  # any other exception
    bad: dict[str, Counter[str]] = field(default_factory=dict)
    late: int = 0  # timed prefetches and best_effort loads past their deadline (+ slack)
    over_deadline: list[dict[str, Any]] = field(default_factory=list)  # the first few
    slowest_s: dict[str, float] = field(default_factory=dict)  # per policy, prefetch + load
    errors: list[dict[str, Any]] = field(default_factory=list)
    errors_seen: int = 0

    def error(self, where: str, exc: BaseException, **context: Any) -> None:
        """Keep the first few errors with their tracebacks."""
        self.errors_seen += 1
        if len(self.errors) < MAX_ERRORS:
            lines = traceback.format_exception(type(exc), exc, exc.__traceback__)
            self.errors.append(
                {
                    "where": where,
                    "type": type(exc).__name__,
                    "message": str(exc)[:500],
                    "traceback": "".join(lines)[-4000:],
                    **context,
                }
            )

    def bad_outcome(self, kind: str, outcome: str) -> None:
        self.bad.setdefault(kind, Counter())[outcome] += 1


@dataclass(frozen=True)
class Ctx:
    """What a request needs: the cache, the tally, its in-flight record."""

    cache: HiCache
    tally: Tally
    flight: InFlight


async def _allocate(session: Session, n: int) -> torch.Tensor:
    """``session.allocate(n)``: waits for room (bounded, so that a full L1 is a counted
    CapacityError, never a stuck request)."""
    return await session.allocate(n, timeout=ALLOCATE_TIMEOUT_S)


def _timed(ctx: Ctx, step: str, started: float, tokens: int) -> None:
    """Record a prefetch or load that ran past its policy's deadline (plus slack)."""
    config = ctx.cache.config
    took = anyio.current_time() - started
    policy = config.prefetch_policy
    key = f"{policy.value}.{step}"
    ctx.tally.slowest_s[key] = round(max(ctx.tally.slowest_s.get(key, 0.0), took), 3)
    timed = policy is PrefetchPolicy.TIMEOUT and step == "prefetch"
    collected = policy is PrefetchPolicy.BEST_EFFORT and step == "load"
    late = took > config.prefetch_timeout(tokens) + DEADLINE_SLACK_S
    if (timed or collected) and late:
        ctx.tally.late += 1
        if len(ctx.tally.over_deadline) < MAX_ERRORS:
            ctx.tally.over_deadline.append(
                {"policy": policy.value, "step": step, "took_s": round(took, 3), "tokens": tokens}
            )


async def serve(ctx: Ctx, tokens: list[int], extra_key: str | None) -> int:
    """Serve one prompt through a session; returns the hit length."""
    cache, tally, flight = ctx.cache, ctx.tally, ctx.flight
    kv = expected_kv(cache.layout, prefix_hashes(tokens, extra_key))
    flight.step = "enter"
    async with cache.session(tokens, extra_key=extra_key) as s:
        hit_length = await _prefetch_and_load(ctx, s, kv, len(tokens))
        flight.step = "allocate"
        slots = await _allocate(s, len(tokens) - hit_length)
        write_kv(cache.device_pool, slots, kv[hit_length:])
        flight.step = "commit"
        await s.commit(slots)
        flight.step = "exit"
    tally.prompt_tokens += len(tokens)
    tally.hit_tokens += hit_length
    return hit_length


async def _prefetch_and_load(ctx: Ctx, s: Session, kv: torch.Tensor, tokens: int) -> int:
    """Prefetch and load; check the hit bit for bit; returns its length."""
    flight, tally = ctx.flight, ctx.tally
    flight.step = "prefetch"
    started = anyio.current_time()
    await s.prefetch()
    _timed(ctx, "prefetch", started, tokens)
    flight.step = "load"
    started = anyio.current_time()
    hit = await s.load()
    _timed(ctx, "load", started, tokens)
    tally.hits_checked += 1
    wrong = wrong_bytes(ctx.cache.device_pool, hit.device_indices, kv[: hit.length])
    if wrong:
        tally.wrong_hits += 1
        tally.wrong_bytes += wrong
    for tier, n in hit.tokens_by_tier.items():
        tally.hits_by_tier[tier.value] += n
    return int(hit.length)


async def run_bad(ctx: Ctx, plan: RequestPlan) -> str:
    """One bad request; returns ``refused`` (a HiCacheError at the call that must refuse),
    ``refused_late`` (at another call), ``accepted`` or ``capacity``. Another exception type
    propagates (the caller counts it as a wrong error)."""
    expected = BAD_KINDS[plan.bad_kind]
    try:
        await _BAD[plan.bad_kind](ctx, plan)
    except CapacityError:
        return "capacity"
    except HiCacheError:
        return "refused" if ctx.flight.step == expected else "refused_late"
    return "accepted"


async def _bad_tokens(ctx: Ctx, plan: RequestPlan, token: int) -> None:
    tokens = list(plan.tokens)
    tokens[len(tokens) // 2] = token
    await serve(ctx, tokens, plan.extra_key)


async def _too_large(ctx: Ctx, plan: RequestPlan) -> None:
    await _bad_tokens(ctx, plan, 2**31 + len(plan.tokens))


async def _negative(ctx: Ctx, plan: RequestPlan) -> None:
    await _bad_tokens(ctx, plan, -1 - len(plan.tokens))


async def _surrogate(ctx: Ctx, plan: RequestPlan) -> None:
    await serve(ctx, plan.tokens, "\ud800")


async def _too_many_slots(ctx: Ctx, plan: RequestPlan) -> None:
    cache, flight = ctx.cache, ctx.flight
    kv = expected_kv(cache.layout, prefix_hashes(plan.tokens, plan.extra_key))
    flight.step = "enter"
    async with cache.session(plan.tokens, extra_key=plan.extra_key) as s:
        hit_length = await _prefetch_and_load(ctx, s, kv, len(plan.tokens))
        flight.step = "allocate"
        slots = await _allocate(s, len(plan.tokens) - hit_length + cache.page_size)
        flight.step = "commit"
        await s.commit(slots)


async def _foreign_slots(ctx: Ctx, plan: RequestPlan) -> None:
    """B commits A's slots (must be refused); A then commits its own, which must work."""
    cache, flight = ctx.cache, ctx.flight
    mine = plan.tokens
    other = [*plan.tokens[:-1], (plan.tokens[-1] + 1) % 50_000 + 1]
    kv = expected_kv(cache.layout, prefix_hashes(mine, plan.extra_key))
    kv_other = expected_kv(cache.layout, prefix_hashes(other, plan.extra_key))
    flight.step = "enter"
    async with cache.session(mine, extra_key=plan.extra_key) as a:
        hit_length = await _prefetch_and_load(ctx, a, kv, len(mine))
        flight.step = "allocate"
        slots = await _allocate(a, len(mine) - hit_length)
        write_kv(cache.device_pool, slots, kv[hit_length:])
        flight.step = "enter"
        refused: HiCacheError | None = None
        async with cache.session(other, extra_key=plan.extra_key) as b:
            hit_other = await _prefetch_and_load(ctx, b, kv_other, len(other))
            theirs = slots[: max(0, len(other) - hit_other)]  # the count B's commit may take
            flight.step = "commit"
            try:
                await b.commit(theirs)
            except HiCacheError as exc:
                refused = exc
        flight.step = "own_commit"
        await a.commit(slots)
    if refused is not None:
        flight.step = "commit"
        raise refused


async def _load_after_exit(ctx: Ctx, plan: RequestPlan) -> None:
    cache, flight = ctx.cache, ctx.flight
    kv = expected_kv(cache.layout, prefix_hashes(plan.tokens, plan.extra_key))
    flight.step = "enter"
    async with cache.session(plan.tokens, extra_key=plan.extra_key) as s:
        await _prefetch_and_load(ctx, s, kv, len(plan.tokens))
    flight.step = "load_after_exit"
    await s.load()


async def _negative_allocate(ctx: Ctx, plan: RequestPlan) -> None:
    flight = ctx.flight
    flight.step = "enter"
    async with ctx.cache.session(plan.tokens, extra_key=plan.extra_key) as s:
        flight.step = "allocate"
        await _allocate(s, -1)


_BAD: dict[str, Callable[[Ctx, RequestPlan], Awaitable[None]]] = {
    "token_id_too_large": _too_large,
    "negative_token_id": _negative,
    "lone_surrogate_key": _surrogate,
    "too_many_slots": _too_many_slots,
    "foreign_slots": _foreign_slots,
    "load_after_exit": _load_after_exit,
    "negative_allocate": _negative_allocate,
}
assert set(_BAD) == set(BAD_KINDS)
