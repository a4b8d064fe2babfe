"""One polling task that turns completion objects into awaitables.

CUDA events (``query()``), ``torch.distributed`` work handles (``is_completed()``) and
``concurrent.futures`` futures (``done()``) have no asyncio integration, and waiting on them
(``event.synchronize()``, ``work.wait()``) blocks the thread. :class:`EventPoller` checks every
pending object from one task on the loop:

* for ``spin_time`` after any activity (a new waiter, a completion) it re-checks on every
  loop iteration (a bare checkpoint: other tasks run in between), so completions that are
  microseconds away are seen within microseconds;
* then it sleeps, the interval doubling from ``min_interval`` up to ``max_interval`` (1 ms).
  Event loops round timers to their clock: asyncio on epoll sleeps at least 1 ms, so past the
  spin window a completion is seen within about a millisecond;
* a new waiter resets the back-off and wakes the poller at once;
* with nothing pending it parks on an event and costs nothing.

The poller runs in a task group its owner holds (``async with EventPoller.open() as p:`` or
``await tg.start(poller.run)``), so an error in it surfaces at the owner. A completion object
whose check raises (a CUDA error) delivers that error to its waiter instead.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, NoReturn, TypeAlias, cast

import anyio
import anyio.lowlevel
import torch
import torch.distributed

from hicache_async.errors import ClosedError

__all__ = ["Completion", "EventPoller", "is_complete"]

Completion: TypeAlias = (
    "torch.cuda.Event | torch.distributed.Work | concurrent.futures.Future[Any] "
    "| Callable[[], bool]"
)
"""What :meth:`EventPoller.wait` accepts: a CUDA event, a future, a distributed work handle
(``torch.distributed.Work``), or a plain callable that says whether the work is done."""


# torch builds without distributed support have no Work class.
_WORK: tuple[type, ...] = (torch.distributed.Work,) if torch.distributed.is_available() else ()


def _probe(obj: object) -> Callable[[], bool]:
    """The no-wait completion check of ``obj`` (a registry by type, not attribute probing)."""
    if isinstance(obj, torch.cuda.Event):
        return obj.query
    if isinstance(obj, concurrent.futures.Future):
        return obj.done
    if _WORK and isinstance(obj, _WORK):
        return cast("torch.distributed.Work", obj).is_completed
    if callable(obj):
        return cast("Callable[[], bool]", obj)
    raise TypeError(
        f"cannot poll a {type(obj).__name__}: pass a torch.cuda.Event, a torch.distributed "
        "Work, a concurrent.futures.Future or a callable returning bool"
    )


def raise_single(group: BaseExceptionGroup[BaseException]) -> NoReturn:
    """Re-raise the one exception a task group wrapped (the block's own), else the group.

    Context managers that run a helper task around their block would otherwise turn every
    error of the block into an ``ExceptionGroup`` their callers do not expect.
    """
    if len(group.exceptions) == 1:
        error = group.exceptions[0]
        raise error from error.__cause__  # keeps its own cause; hides the wrapping group
    raise group


def is_complete(obj: Completion) -> bool:
    """Whether ``obj`` has completed, without waiting."""
    return bool(_probe(obj)())


class _Waiter:
    __slots__ = ("error", "event", "probe")

    def __init__(self, probe: Callable[[], bool]) -> None:
        self.probe = probe
        self.event = anyio.Event()
        self.error: BaseException | None = None


class EventPoller:
    """Awaits completion objects for every task of one cache from a single polling task."""

    def __init__(
        self,
        *,
        spin_time: float = 200e-6,
        min_interval: float = 100e-6,
        max_interval: float = 1e-3,
    ) -> None:
        if spin_time < 0 or not 0 < min_interval <= max_interval:
            raise ValueError("need spin_time >= 0 and 0 < min_interval <= max_interval")
        self.spin_time = spin_time
        self.min_interval = min_interval
        self.max_interval = max_interval
        self._pending: dict[int, _Waiter] = {}
        self._ids = itertools.count()
        self._wakeup = anyio.Event()
        self._running = False
        self._closed = False
        self.polls = 0  # rounds over the pending set, for statistics and tests
        self.completions = 0

    @classmethod
    @asynccontextmanager
    async def open(cls, **options: Any) -> AsyncIterator[EventPoller]:
        """Run a poller for the block; leaving it stops the poller."""
        poller = cls(**options)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(poller.run)
                try:
                    yield poller
                finally:
                    poller.close()
        except BaseExceptionGroup as group:
            raise_single(group)

    @property
    def pending(self) -> int:
        """Completion objects being waited for right now."""
        return len(self._pending)

    def statistics(self) -> dict[str, int]:
        """Pending waits, polling rounds and completions seen so far (for metrics)."""
        return {"pending": self.pending, "polls": self.polls, "completions": self.completions}

    def close(self) -> None:
        """Stop accepting waits; :meth:`run` returns once the pending ones have completed."""
        self._closed = True
        self._wakeup.set()

    async def wait(self, obj: Completion) -> None:
        """Return once ``obj`` has completed. Cancelling the wait leaves ``obj`` running."""
        probe = _probe(obj)
        if probe():
            await anyio.lowlevel.checkpoint()
            return
        if self._closed or not self._running:
            raise ClosedError("the EventPoller is not running (start it with open() or run())")
        key = next(self._ids)
        waiter = self._pending[key] = _Waiter(probe)
        self._wakeup.set()
        try:
            await waiter.event.wait()
        finally:
            self._pending.pop(key, None)
        if waiter.error is not None:
            raise waiter.error

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """The polling task. Returns after :meth:`close` once nothing is pending."""
        if self._running:
            raise RuntimeError("this EventPoller is already running")
        self._running = True
        task_status.started()
        try:
            await self._poll_forever()
        finally:
            self._running = False
            self._closed = True
            for waiter in self._pending.values():  # the owner is going away: nobody hangs
                waiter.error = ClosedError("the EventPoller stopped")
                waiter.event.set()

    async def _poll_forever(self) -> None:
        interval = self.min_interval
        active_at = time.perf_counter()
        while True:
            if not self._pending:
                if self._closed:
                    return
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
                active_at, interval = time.perf_counter(), self.min_interval
                continue
            if self._poll_once():
                active_at, interval = time.perf_counter(), self.min_interval
            if time.perf_counter() - active_at < self.spin_time:
                await anyio.lowlevel.checkpoint()  # other tasks run between spins
                continue
            self._wakeup = anyio.Event()
            with anyio.move_on_after(interval):
                await self._wakeup.wait()
            if self._wakeup.is_set():  # a new waiter: poll eagerly again
                active_at, interval = time.perf_counter(), self.min_interval
            else:
                interval = min(self.max_interval, interval * 2)

    def _poll_once(self) -> bool:
        self.polls += 1
        done = False
        for key, waiter in list(self._pending.items()):
            try:
                finished = waiter.probe()
            except Exception as exc:  # e.g. a CUDA error: the waiter gets it, the poller lives
                waiter.error, finished = exc, True
            if finished:
                del self._pending[key]
                waiter.event.set()
                self.completions += 1
                done = True
        return done

    def __repr__(self) -> str:
        state = "closed" if self._closed else "running" if self._running else "idle"
        return f"EventPoller({state}, pending={self.pending})"
