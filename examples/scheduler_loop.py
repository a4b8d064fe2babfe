"""A scheduler loop in SGLang's style, on the scheduler-level API: one session per request,
driven by the loop's own steps instead of ``async with``.

Each step admits waiting requests (match and lock the prefix, load its host part back to L1),
then runs every admitted request one chunk further: a prefill chunk of at most
``chunk_tokens`` tokens, or one decode step. After each chunk the request commits (its whole
pages enter the tree at once, where later requests hit them); after its last decode step it
finishes. A request that finds no L1 room waits for the next step; when no request could move
in a step, the newest one is retracted (aborted, back to the queue) so the others can go on, as
SGLang's scheduler retracts decode requests under memory pressure, and no request is admitted
until one has moved again (readmitting it at once would lock its pages again: a livelock).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from hicache_async import HiCache, Session
from hicache_async.demo.model import TinyCausalLM


@dataclass(eq=False)  # a request is itself: list.remove must not compare tensors
class Request:
    prompt: torch.Tensor
    max_new_tokens: int = 4
    output: list[int] = field(default_factory=list)
    cached: int = 0  # prompt tokens the cache held when it was admitted (the last time)
    logits: list[torch.Tensor] = field(default_factory=list)  # of each token it generated
    retracted: int = 0
    session: Session | None = None
    done_tokens: int = 0  # tokens with KV in place (hit + committed)


class Scheduler:
    """Chunked prefill and decode through one cache, one step at a time."""

    def __init__(
        self,
        cache: HiCache,
        model: TinyCausalLM,
        *,
        max_batch: int = 8,
        chunk_tokens: int = 32,
    ) -> None:
        self.cache = cache
        self.model = model
        self.max_batch = max_batch
        self.chunk_tokens = chunk_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.done: list[Request] = []
        self._pressure = False  # a request was retracted and none has moved since

    def add(self, prompt: torch.Tensor, max_new_tokens: int = 4) -> Request:
        request = Request(prompt, max_new_tokens)
        self.waiting.append(request)
        return request

    async def _admit(self, request: Request) -> None:
        session = self.cache.session(request.prompt).enter()  # match; lock the prefix
        # The model computes at least the prompt's last token: its logits give the first
        # output token.
        hit = await session.load(limit=request.prompt.numel() - 1)  # L2 -> L1
        request.session, request.cached, request.done_tokens = session, hit.length, hit.length
        request.output.clear()
        request.logits.clear()

    def _advance(self, request: Request) -> bool:
        """One chunk of prefill or one decode step; False when L1 had no room for it."""
        session = request.session
        assert session is not None
        prompt = request.prompt
        if request.done_tokens < prompt.numel():  # prefill, a chunk at a time
            n = min(self.chunk_tokens, prompt.numel() - request.done_tokens)
            tokens = prompt[request.done_tokens : request.done_tokens + n]
        else:  # decode: feed the last generated token (once: a step may find no room)
            tokens = torch.tensor(request.output[-1:])
            if len(session.key) == request.done_tokens:
                session.extend(tokens)
        slots = session.try_allocate(tokens.numel())
        if slots is None:
            return False
        logits = self.model.forward_cached(
            tokens, session.device_indices, slots, self.cache.device_pool
        )
        session.commit_nowait(slots)  # whole pages into the tree now
        request.done_tokens += tokens.numel()
        if request.done_tokens >= prompt.numel():  # its last position predicts a token
            request.logits.append(logits[-1])
            request.output.append(int(logits[-1].argmax()))
        if len(request.output) == request.max_new_tokens:
            session.finish()
            request.session = None
        return True

    def _retract(self, request: Request) -> None:
        assert request.session is not None
        request.session.abort()  # its committed pages stay cached: readmission hits them
        request.session = None
        request.retracted += 1
        self.running.remove(request)
        self.waiting.appendleft(request)

    async def step(self) -> int:
        """Admit, then advance every running request by one chunk; how many moved."""
        while self.waiting and len(self.running) < self.max_batch and not self._pressure:
            request = self.waiting.popleft()
            await self._admit(request)
            self.running.append(request)
        moved = [request for request in list(self.running) if self._advance(request)]
        for request in [r for r in self.running if r.session is None]:
            self.running.remove(request)
            self.done.append(request)
        if moved or not self.running:
            self._pressure = False
        elif len(self.running) > 1:
            self._retract(self.running[-1])
            self._pressure = True
        return len(moved)

    async def run_until_idle(self) -> None:
        stuck = 0
        while self.waiting or self.running:
            if await self.step():
                stuck = 0
                continue
            await self.cache.drain()  # backups in flight pin L1 pages
            stuck += 1
            if stuck > 2 and len(self.running) == 1:  # alone, drained, and still no room
                raise RuntimeError("a request needs more L1 pages than the cache has")
