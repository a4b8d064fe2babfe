"""The soak's traffic: multi-turn conversations of a few tenants over shared system prompts.

Each worker (one concurrent session at a time) has its own ``random.Random``, derived from the
run's seed and its index, so the prompts it sends do not depend on how the loop interleaves
the workers. A worker keeps its conversations across the run's segments (one cache instance
each, over the same L3), and now and then resumes an old one, whose prefix L1 and L2 have
long evicted: those come back from L3.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field

import anyio

__all__ = ["BAD_KINDS", "Conversation", "Prompts", "RequestPlan", "Waves", "Workload"]

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


@dataclass
class Conversation:
    tenant: str | None
    tokens: list[int]
    turns_left: int


@dataclass(frozen=True)
class RequestPlan:
    """What one request does: ``mode`` is ``normal``, ``cancel_delay``, ``cancel_at`` or
    ``bad``; ``bad_kind`` one of :data:`BAD_KINDS`."""

    tokens: list[int]
    extra_key: str | None
    mode: str = "normal"
    delay: float = 0.0  # cancel_delay: seconds before the cancellation
    at: int = 0  # cancel_at: the suspension that is cancelled
    bad_kind: str = ""
    think_s: float = 0.0  # pause before the request


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
        if draw < self.bad_rate + self.cancel_rate / 2:
            delay = rng.random() * 0.02
            return RequestPlan(tokens, conversation.tenant, "cancel_delay", delay, think_s=think)
        if draw < self.bad_rate + self.cancel_rate:
            at = rng.randint(1, 12)
            return RequestPlan(tokens, conversation.tenant, "cancel_at", at=at, think_s=think)
        return RequestPlan(tokens, conversation.tenant, think_s=think)

    def served(self, plan: RequestPlan) -> None:
        """The request was served: the conversation goes on with the model's reply."""
        conversation = self.current
        if conversation is None or plan.mode != "normal":
            return
        reply = [self.rng.randrange(1, VOCAB) for _ in range(self.rng.randint(4, 32))]
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
            now = Conversation(old.tenant, list(old.tokens), rng.randint(1, 3))
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
