"""The soak's requests: a served one through the public session API, checked bit for bit,
and the bad ones, each of which must be refused with a ``HiCacheError`` at its call.

A served request goes through the whole lifecycle its plan draws: enter, prefetch, load, check
every byte of the hit against the oracle; prefill the rest in one commit or in chunks (allocate,
write its KV as a model would, yield to the loop as its forward pass would, commit, per chunk);
decode a few tokens (extend, allocate one, write, yield, commit, per token); check that the
session's page table (``device_indices``) holds the oracle's bytes for every token; exit.
Through ``async with`` it waits for room with ``allocate(n, timeout=...)``; through the
scheduler-level API (``enter``, ``try_allocate``, ``commit_nowait``, ``finish`` / ``abort``)
it polls for room each "step" as a scheduler would, and is retracted when none comes. Counts
go to a :class:`Tally` (``lifecycle`` for the steps).
"""

from __future__ import annotations

import dataclasses
import itertools
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import torch

from hicache_async.cache import HiCache
from hicache_async.config import PrefetchPolicy
from hicache_async.errors import CapacityError, HiCacheError
from hicache_async.session import Session
from hicache_async.testing._soak_kv import (
    decode_tokens,
    expected_kv,
    prefix_hashes,
    write_kv,
    wrong_bytes,
)
from hicache_async.testing._soak_watch import CancelAtSuspension, InFlight
from hicache_async.testing._soak_workload import BAD_KINDS, RequestPlan

__all__ = ["LIFECYCLE_COUNTS", "MAX_ERRORS", "Tally", "run_bad", "serve"]

MAX_ERRORS = 10  # errors kept with their tracebacks (the rest are only counted)
DEADLINE_SLACK_S = 1.0  # a timed prefetch may end this long after its deadline
ALLOCATE_TIMEOUT_S = 2.0  # a bad request waits this long for L1 room, then gives up (counted)
SCHEDULER_STEP_S = 0.005  # a scheduler-level request tries for room again after this long

# The lifecycle counters (Tally.lifecycle), each a count of events over the run.
LIFECYCLE_COUNTS = (
    "prefill_commits",  # commits of a prompt's part (one per chunk; one for a whole prompt)
    "chunked_prefills",  # served requests whose prefill took two commits or more
    "duplicate_tokens",  # tokens a commit found inserted by another request first
    "decode_requests",  # served requests that decoded
    "decode_steps",  # extend + allocate 1 + write + commit
    "output_hit_tokens",  # hit tokens that an earlier turn decoded
    "tables_checked",  # device_indices checked against the oracle at the end of a request
    "allocations",  # allocate() calls that gave slots
    "allocate_waits",  # allocate() calls that waited for room (suspended)
    "allocate_waits_served",  # of those, the ones that got their slots
    "allocate_wait_timeouts",  # CapacityError after the request's waiting budget
    "allocate_no_room",  # CapacityError before it (no room can ever come, or > L1)
    "scheduler_requests",  # entered through the scheduler-level API
    "scheduler_finished",  # finish()
    "scheduler_aborted",  # abort() as the plan said, after some commits
    "scheduler_waits",  # try_allocate() gave None: waited for a later step
    "scheduler_waits_served",  # of those, the ones that got room at a later step
    "scheduler_retracted",  # no room within the waiting budget: abort()
)


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
    wrong_tables: int = 0  # requests whose device_indices held other bytes than the oracle's
    lifecycle: Counter[str] = field(
        default_factory=lambda: Counter(dict.fromkeys(LIFECYCLE_COUNTS, 0))
    )
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
                {
                    "policy": policy.value,
                    "write_policy": config.write_policy.value,
                    "device_pages": config.device_pages,
                    "step": step,
                    "took_s": round(took, 3),
                    "tokens": tokens,
                }
            )


def _chunks(rest: int, sizes: Sequence[int]) -> Iterator[int]:
    """The prefill's chunks: ``sizes`` in turn until ``rest`` tokens are covered (no sizes:
    one commit of the whole rest, even of nothing)."""
    if not sizes:
        yield rest
        return
    for size in itertools.cycle(sizes):
        if rest <= 0:
            return
        n = min(size, rest)
        rest -= n
        yield n


class _Room:
    """A request's waiting for L1 room: all its allocations share one budget (``wait_s``),
    so a request of many chunks and decode steps still ends within a bound."""

    def __init__(self, ctx: Ctx, budget_s: float) -> None:
        self.ctx = ctx
        self.deadline = anyio.current_time() + budget_s

    async def allocate(self, s: Session, n: int) -> torch.Tensor:
        """``await s.allocate(n, timeout=...)`` with what is left of the budget; counts
        whether it waited, and how a CapacityError came."""
        counts = self.ctx.tally.lifecycle
        started = anyio.current_time()
        timeout = max(0.0, self.deadline - started)
        call = CancelAtSuspension(s.allocate(n, timeout=timeout))  # at=0: counts suspensions
        try:
            slots: torch.Tensor = await call
        except CapacityError:
            if call.suspensions:
                counts["allocate_waits"] += 1
            timed_out = anyio.current_time() - started >= timeout
            counts["allocate_wait_timeouts" if timed_out else "allocate_no_room"] += 1
            raise
        if call.suspensions:
            counts["allocate_waits"] += 1
            counts["allocate_waits_served"] += 1
        counts["allocations"] += 1
        return slots

    async def try_allocate(self, s: Session, n: int) -> torch.Tensor | None:
        """The scheduler-level way: ``s.try_allocate(n)`` now, else at each later "step"
        until the budget is spent (None: the scheduler retracts the request)."""
        counts = self.ctx.tally.lifecycle
        slots = s.try_allocate(n)
        if slots is not None:
            counts["allocations"] += 1
            return slots
        counts["scheduler_waits"] += 1
        while anyio.current_time() < self.deadline:
            await anyio.sleep(SCHEDULER_STEP_S)
            slots = s.try_allocate(n)
            if slots is not None:
                counts["allocations"] += 1
                counts["scheduler_waits_served"] += 1
                return slots
        return None


async def _forward(ctx: Ctx) -> None:
    """The model's forward pass over the KV just written: it awaits the device, so other
    requests run between a request's chunks and decode steps (their commits interleave)."""
    ctx.flight.step = "forward"
    await anyio.lowlevel.checkpoint()


def _check_table(ctx: Ctx, s: Session, kv: torch.Tensor) -> None:
    """The session's slots of every token so far (hit, committed chunks and decode steps,
    where the tree's pages may have replaced its own) hold the oracle's bytes."""
    tally = ctx.tally
    tally.lifecycle["tables_checked"] += 1
    slots = s.device_indices
    if slots.numel() != kv.shape[0]:
        tally.wrong_tables += 1
        detail = f"device_indices has {slots.numel()} slots for {kv.shape[0]} tokens in place"
        tally.error("table", AssertionError(detail), step=ctx.flight.step)
        return
    wrong = wrong_bytes(ctx.cache.device_pool, slots, kv)
    if wrong:
        tally.wrong_tables += 1
        tally.wrong_bytes += wrong


def _served(ctx: Ctx, plan: RequestPlan, hit_length: int, commits: int) -> None:
    tally = ctx.tally
    tally.prompt_tokens += len(plan.tokens)
    tally.hit_tokens += hit_length
    if commits > 1:
        tally.lifecycle["chunked_prefills"] += 1
    if plan.decode:
        tally.lifecycle["decode_requests"] += 1


async def serve(ctx: Ctx, plan: RequestPlan) -> bool:
    """Serve one request as ``plan`` says (its API, chunks, decode steps, waiting budget);
    True when it ran to its end (False: aborted or retracted, as a scheduler may)."""
    if plan.api == "scheduler":
        return await _serve_scheduled(ctx, plan)
    cache, tally, flight = ctx.cache, ctx.tally, ctx.flight
    tokens, pool = plan.tokens, cache.device_pool
    output = decode_tokens(tokens, plan.extra_key, plan.decode)
    kv = expected_kv(cache.layout, prefix_hashes([*tokens, *output], plan.extra_key))
    room = _Room(ctx, plan.wait_s)
    commits = 0
    flight.step = "enter"
    async with cache.session(tokens, extra_key=plan.extra_key) as s:
        hit_length = done = await _prefetch_and_load(ctx, s, kv, plan)
        for n in _chunks(len(tokens) - hit_length, plan.chunks):
            flight.step = "allocate"
            slots = await room.allocate(s, n)
            write_kv(pool, slots, kv[done : done + n])
            await _forward(ctx)
            flight.step = "commit"
            tally.lifecycle["duplicate_tokens"] += await s.commit(slots)
            tally.lifecycle["prefill_commits"] += 1
            commits += 1
            done += n
        for token in output:
            flight.step = "decode"
            s.extend([token])
            slot = await room.allocate(s, 1)
            write_kv(pool, slot, kv[done : done + 1])
            await _forward(ctx)
            flight.step = "decode_commit"
            tally.lifecycle["duplicate_tokens"] += await s.commit(slot)
            tally.lifecycle["decode_steps"] += 1
            done += 1
        _check_table(ctx, s, kv[:done])
        flight.step = "exit"
    _served(ctx, plan, hit_length, commits)
    return True


async def _serve_scheduled(ctx: Ctx, plan: RequestPlan) -> bool:
    """The request through the scheduler-level API: enter, load (the hit capped so that the
    last prompt token is computed), then per step try_allocate, write, commit_nowait; finish,
    or abort (retract) when the plan says or no room came within the budget."""
    cache, tally, flight = ctx.cache, ctx.tally, ctx.flight
    counts = tally.lifecycle
    tokens, pool = plan.tokens, cache.device_pool
    output = decode_tokens(tokens, plan.extra_key, plan.decode)
    kv = expected_kv(cache.layout, prefix_hashes([*tokens, *output], plan.extra_key))
    room = _Room(ctx, plan.wait_s)
    flight.step = "enter"
    s = cache.session(tokens, extra_key=plan.extra_key).enter()
    counts["scheduler_requests"] += 1
    try:
        hit_length = done = await _prefetch_and_load(ctx, s, kv, plan, limit=len(tokens) - 1)
        steps: list[tuple[int, int | None]] = [
            (n, None) for n in _chunks(len(tokens) - hit_length, plan.chunks)
        ]
        steps += [(1, token) for token in output]
        commits = 0
        for step, (n, token) in enumerate(steps):
            if token is not None:
                flight.step = "decode"
                s.extend([token])
            flight.step = "try_allocate"
            slots = await room.try_allocate(s, n)
            if slots is None:
                counts["scheduler_retracted"] += 1
                s.abort()
                return False
            write_kv(pool, slots, kv[done : done + n])
            await _forward(ctx)
            flight.step = "commit_nowait"
            counts["duplicate_tokens"] += s.commit_nowait(slots)
            counts["decode_steps" if token is not None else "prefill_commits"] += 1
            commits += token is None
            done += n
            if plan.abort_after and step + 1 == plan.abort_after:
                counts["scheduler_aborted"] += 1
                s.abort()
                return False
        _check_table(ctx, s, kv[:done])
        flight.step = "finish"
        s.finish()
    except BaseException:
        s.abort()
        raise
    counts["scheduler_finished"] += 1
    _served(ctx, plan, hit_length, commits)
    return True


async def _prefetch_and_load(
    ctx: Ctx, s: Session, kv: torch.Tensor, plan: RequestPlan, limit: int | None = None
) -> int:
    """Prefetch and load; check the hit bit for bit; returns its length."""
    flight, tally = ctx.flight, ctx.tally
    tokens = len(plan.tokens)
    flight.step = "prefetch"
    started = anyio.current_time()
    await s.prefetch()
    _timed(ctx, "prefetch", started, tokens)
    flight.step = "load"
    started = anyio.current_time()
    hit = await s.load(limit)
    _timed(ctx, "load", started, tokens)
    tally.hits_checked += 1
    length = int(hit.length)
    wrong = wrong_bytes(ctx.cache.device_pool, hit.device_indices, kv[:length])
    if wrong:
        tally.wrong_hits += 1
        tally.wrong_bytes += wrong
    for tier, n in hit.tokens_by_tier.items():
        tally.hits_by_tier[tier.value] += n
    for start, end in plan.outputs:
        tally.lifecycle["output_hit_tokens"] += max(0, min(end, length) - start)
    return length


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
    await serve(ctx, dataclasses.replace(plan, tokens=tokens))


async def _too_large(ctx: Ctx, plan: RequestPlan) -> None:
    await _bad_tokens(ctx, plan, 2**31 + len(plan.tokens))


async def _negative(ctx: Ctx, plan: RequestPlan) -> None:
    await _bad_tokens(ctx, plan, -1 - len(plan.tokens))


async def _surrogate(ctx: Ctx, plan: RequestPlan) -> None:
    await serve(ctx, dataclasses.replace(plan, extra_key="\ud800"))


async def _too_many_slots(ctx: Ctx, plan: RequestPlan) -> None:
    cache, flight = ctx.cache, ctx.flight
    kv = expected_kv(cache.layout, prefix_hashes(plan.tokens, plan.extra_key))
    flight.step = "enter"
    async with cache.session(plan.tokens, extra_key=plan.extra_key) as s:
        hit_length = await _prefetch_and_load(ctx, s, kv, plan)
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
        hit_length = await _prefetch_and_load(ctx, a, kv, plan)
        flight.step = "allocate"
        slots = await _allocate(a, len(mine) - hit_length)
        write_kv(cache.device_pool, slots, kv[hit_length:])
        flight.step = "enter"
        refused: HiCacheError | None = None
        async with cache.session(other, extra_key=plan.extra_key) as b:
            hit_other = await _prefetch_and_load(ctx, b, kv_other, plan)
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
        await _prefetch_and_load(ctx, s, kv, plan)
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
