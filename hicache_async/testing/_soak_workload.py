"""The soak's traffic: multi-turn conversations of a few tenants over shared system prompts.

Each worker (one concurrent session at a time) has its own ``random.Random``, derived from the
run's seed and its index, so the prompts it sends do not depend on how the loop interleaves
the workers. A worker keeps its conversations across the run's segments (one cache instance
each, over the same L3), and now and then resumes an old one, whose prefix L1 and L2 have
long evicted: those come back from L3.

Each request also draws its lifecycle (:class:`RequestPlan`): a prefill in one commit or in
chunks of random sizes, a few decode steps (the answer, :func:`decode_tokens`, which the next
turn's prompt contains, so later requests hit decoded pages), how long it may wait for L1 room
in all, and whether it goes through ``async with`` or the scheduler-level API (``enter``,
``try_allocate``, ``commit_nowait``, ``finish`` / ``abort``).
"""

from __future__ import annotations

import collections
import dataclasses
import random
from dataclasses import dataclass, field

import anyio

from hicache_async.testing._soak_kv import decode_tokens

__all__ = [
    "APIS",
    "BAD_KINDS",
    "WAIT_S",
    "Conversation",
    "Prompts",
    "RequestPlan",
    "Waves",
    "Workload",
]

VOCAB = 50_000
TENANTS: tuple[str | None, ...] = (None, "tenant-a", "tenant-b")

# Bad requests, and the call that must refuse each with a HiCacheError.
BAD_KINDS: dict[str, str] = {
    "token_id_too_large": "enter",  # an id >= 2**31
    "negative_token_id": "enter",
    "lone_surrogate_key": "enter",  # extra_key="\ud800"
    "too_many_slots": "commit",  # more slots than the prompt has tokens
    "foreign_slots": "commit",  # commit of another session's slots
    "load_after_exit": "load_after_exit",
    "negative_allocate": "allocate",
}


@dataclass(frozen=True)
class Prompts:
    """The shared system prompts (every tenant uses the same tokens; keys differ)."""

    system: tuple[tuple[int, ...], ...]

    @classmethod
    def make(cls, seed: int, count: int = 4, lengths: tuple[int, int] = (64, 192)) -> Prompts:
        rng = random.Random(f"soak:{seed}:system-prompts")
        return cls(
            tuple(
                tuple(rng.randrange(1, VOCAB) for _ in range(rng.randint(*lengths)))
                for _ in range(count)
            )
        )


WAIT_S = 2.0  # how long a request may wait for L1 room in all (most requests)
SHORT_WAIT_S = (0.02, 0.3)  # the range of the others' (their waits time out more often)
APIS = ("session", "scheduler")


@dataclass
class Conversation:
    tenant: str | None
    tokens: list[int]
    turns_left: int
    outputs: list[tuple[int, int]] = field(default_factory=list)  # decoded spans of tokens


@dataclass(frozen=True)
class RequestPlan:
    """What one request does: ``mode`` is ``normal``, ``cancel_delay``, ``cancel_at`` or
    ``bad``; ``bad_kind`` one of :data:`BAD_KINDS`; ``api`` one of :data:`APIS`."""

    tokens: list[int]
    extra_key: str | None
    mode: str = "normal"
    delay: float = 0.0  # cancel_delay: seconds before the cancellation
    at: int = 0  # cancel_at: the suspension that is cancelled
    bad_kind: str = ""
    think_s: float = 0.0  # pause before the request
    chunks: tuple[int, ...] = ()  # prefill chunk sizes, used in turn (empty: one commit)
    decode: int = 0  # decode steps after the prefill (one token each)
    api: str = "session"
    wait_s: float = WAIT_S  # the most it waits for L1 room, all its allocations together
    abort_after: int = 0  # scheduler: abort after this many commits (0: finish)
    outputs: tuple[tuple[int, int], ...] = ()  # spans of ``tokens`` decoded by earlier turns


@dataclass
class Workload:
    """One worker's stream of requests."""

    worker: int
    seed: int
    prompts: Prompts
    max_tokens: int = 320
    cancel_rate: float = 0.0
    bad_rate: float = 0.0
    bad_kinds: tuple[str, ...] = tuple(sorted(BAD_KINDS))
    chunk_rate: float = 0.5  # of the requests, prefilled in chunks
    decode_rate: float = 0.5  # decoding a few tokens
    scheduler_rate: float = 0.2  # through the scheduler-level API
    rng: random.Random = field(init=False)
    current: Conversation | None = None
    archive: collections.deque[Conversation] = field(
        default_factory=lambda: collections.deque(maxlen=8)
    )

    def __post_init__(self) -> None:
        self.rng = random.Random(f"soak:{self.seed}:worker:{self.worker}")

    def next(self) -> RequestPlan:
        """The next request: the current conversation's next turn, with its fault mode."""
        rng = self.rng
        conversation = self._conversation()
        user = [rng.randrange(1, VOCAB) for _ in range(rng.randint(8, 32))]
        tokens = conversation.tokens + user
        think = rng.random() * 0.002
        draw = rng.random()
        if draw < self.bad_rate:
            kind = rng.choice(self.bad_kinds)
            return RequestPlan(tokens, conversation.tenant, "bad", bad_kind=kind, think_s=think)
        base = RequestPlan(
            tokens, conversation.tenant, think_s=think, outputs=tuple(conversation.outputs)
        )
        plan = self._lifecycle(base)
        if draw < self.bad_rate + self.cancel_rate / 2:
            return dataclasses.replace(plan, mode="cancel_delay", delay=rng.random() * 0.02)
        if draw < self.bad_rate + self.cancel_rate:
            return dataclasses.replace(plan, mode="cancel_at", at=rng.randint(1, 12))
        return plan

    def _lifecycle(self, plan: RequestPlan) -> RequestPlan:
        """Draw how the request prefills, decodes, waits for room, and which API it uses."""
        rng = self.rng
        chunks: tuple[int, ...] = ()
        if rng.random() < self.chunk_rate:
            chunks = tuple(rng.randint(1, 48) for _ in range(rng.randint(2, 4)))
        decode = rng.randint(1, 12) if rng.random() < self.decode_rate else 0
        wait = round(rng.uniform(*SHORT_WAIT_S), 3) if rng.random() < 0.25 else WAIT_S
        api, abort_after = "session", 0
        if rng.random() < self.scheduler_rate:
            api = "scheduler"
            abort_after = rng.randint(1, 3) if rng.random() < 0.15 else 0
        return dataclasses.replace(
            plan, chunks=chunks, decode=decode, api=api, wait_s=wait, abort_after=abort_after
        )

    def served(self, plan: RequestPlan) -> None:
        """The request was served: the conversation goes on with the model's reply (the
        tokens it decoded, else a reply of random tokens, which the next turn prefills)."""
        conversation = self.current
        if conversation is None or plan.mode != "normal":
            return
        if plan.decode:
            reply = decode_tokens(plan.tokens, plan.extra_key, plan.decode)
            conversation.outputs = [
                *plan.outputs,
                (len(plan.tokens), len(plan.tokens) + plan.decode),
            ]
        else:
            reply = [self.rng.randrange(1, VOCAB) for _ in range(self.rng.randint(4, 32))]
            conversation.outputs = list(plan.outputs)
        conversation.tokens = plan.tokens + reply
        conversation.turns_left -= 1

    def _conversation(self) -> Conversation:
        rng = self.rng
        now = self.current
        if now is not None and now.turns_left > 0 and len(now.tokens) < self.max_tokens - 64:
            return now
        if now is not None:
            self.archive.append(now)
        if self.archive and rng.random() < 0.3:  # resume an old conversation (L3 has it)
            old = self.archive[rng.randrange(len(self.archive))]
            now = Conversation(old.tenant, list(old.tokens), rng.randint(1, 3), list(old.outputs))
        else:
            system = self.prompts.system[rng.randrange(len(self.prompts.system))]
            now = Conversation(rng.choice(TENANTS), list(system), rng.randint(1, 6))
        self.current = now
        return now


class Waves:
    """Bursts: every worker sends its next request at once, and the next wave starts only
    when every worker is back (a reusable barrier; a worker that stops leaves it). Bursts
    put many sessions on the same prefixes at the same moment, and a request that waits for
    another's event which never comes stalls its wave for good: a hang, not a blip that the
    next request's event hides."""

    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.count = 0  # waves started
        self._start = anyio.Event()

    async def wait(self) -> None:
        """Arrive; return when every worker still here has arrived."""
        self.arrived += 1
        start = self._start
        if not self._release():
            await start.wait()

    def leave(self) -> None:
        """A worker stops for good."""
        self.parties -= 1
        self._release()

    def _release(self) -> bool:
        if self.arrived < self.parties or not self.arrived:
            return False
        self.arrived = 0
        self.count += 1
        start, self._start = self._start, anyio.Event()
        start.set()
        return True
