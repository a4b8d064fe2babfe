"""The soak's liveness watch: every request in flight, its step, and where it waits.

A request registers when it starts and leaves when it ends (served, refused, cancelled). The
watchdog looks at the requests in flight a few times a second and names every one older than
the bound, with the step it is at and the stack of its coroutine (walked through ``cr_await``,
so it works on asyncio and on trio alike).
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Coroutine, Generator
from dataclasses import dataclass, field
from typing import Any

import anyio

__all__ = ["CancelAtSuspension", "InFlight", "Watch", "coroutine_stack"]


@dataclass
class InFlight:
    """One request in flight."""

    id: int
    worker: int
    kind: str
    policy: str
    started: float
    step: str = "created"
    coro: Coroutine[Any, Any, Any] | None = None
    reported: bool = False  # named as a hang already


@dataclass
class Watch:
    """The requests in flight and the hangs found so far."""

    hang_after_s: float
    inflight: dict[int, InFlight] = field(default_factory=dict)
    hangs: list[dict[str, Any]] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _changed: anyio.Event | None = None  # set when a request ends or is named a hang

    async def settled(self) -> None:
        """Return once every request in flight has ended or been named a hang."""
        while self.unreported():
            self._changed = anyio.Event()
            await self._changed.wait()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def start(self, worker: int, kind: str, policy: str) -> InFlight:
        request = InFlight(next(self._ids), worker, kind, policy, anyio.current_time())
        self.inflight[request.id] = request
        return request

    def end(self, request: InFlight) -> None:
        self.inflight.pop(request.id, None)
        self._notify()

    def unreported(self) -> list[InFlight]:
        """The requests in flight not yet named as hangs."""
        return [r for r in self.inflight.values() if not r.reported]

    def check(self, *, now: float | None = None, all_left: bool = False) -> None:
        """Name every request in flight past the bound (``all_left``: every one left)."""
        now = anyio.current_time() if now is None else now
        for request in self.unreported():
            age = now - request.started
            if all_left or age > self.hang_after_s:
                request.reported = True
                self.hangs.append(
                    {
                        "request": request.id,
                        "worker": request.worker,
                        "kind": request.kind,
                        "policy": request.policy,
                        "step": request.step,
                        "waited_s": round(age, 3),
                        "stack": coroutine_stack(request.coro),
                    }
                )
                self._notify()

    async def run(self, interval: float = 0.2) -> None:
        """The watchdog: check for hangs every ``interval`` seconds, until cancelled."""
        while True:
            await anyio.sleep(interval)
            self.check()


def coroutine_stack(coro: object, limit: int = 40) -> list[str]:
    """Where a suspended coroutine waits: ``file:line in function`` per frame, outermost
    first, following what each frame awaits."""
    frames: list[str] = []
    while coro is not None and len(frames) < limit:
        frame: types.FrameType | None
        if isinstance(coro, types.CoroutineType):
            frame, coro = coro.cr_frame, coro.cr_await
        elif isinstance(coro, types.GeneratorType):
            frame, coro = coro.gi_frame, coro.gi_yieldfrom
        elif isinstance(coro, types.AsyncGeneratorType):
            frame, coro = coro.ag_frame, coro.ag_await
        else:
            frames.append(f"<awaiting {type(coro).__name__}>")
            break
        if frame is not None:
            code = frame.f_code
            frames.append(f"{code.co_filename}:{frame.f_lineno} in {code.co_name}")
    return frames


class CancelAtSuspension:
    """Awaits ``coro`` as ``yield from`` would; at its ``at``-th suspension it cancels
    ``scope`` before handing the awaited object to the loop, so the cancellation lands at
    exactly that await (or at the first checkpoint after a shielded part), as a client that
    goes away mid-request. ``at=0`` never cancels: it counts the suspensions of a whole
    request (``scope`` may then be left out). Works on asyncio and trio."""

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        scope: anyio.CancelScope | None = None,
        at: int = 0,
    ) -> None:
        self.coro, self.scope, self.at = coro, scope, at
        self.suspensions = 0

    def __await__(self) -> Generator[Any, Any, Any]:
        inner = self.coro.__await__()
        sent: Any = None
        thrown: BaseException | None = None
        while True:
            try:
                awaited = inner.throw(thrown) if thrown is not None else inner.send(sent)
            except StopIteration as stop:
                return stop.value
            self.suspensions += 1
            if self.suspensions == self.at and self.scope is not None:
                self.scope.cancel()
            try:
                sent, thrown = (yield awaited), None
            except BaseException as exc:
                sent, thrown = None, exc
