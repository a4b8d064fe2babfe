"""Blocking page I/O in worker threads, safe to cancel, never hung by a stuck thread.

Dispatching one thread job per page costs tens of microseconds on the loop, as much as the copy
of a hot 256 KiB page; so a batch runs as a few thread jobs ("workers"), each holding a token of
a :class:`anyio.CapacityLimiter` (house rule 4: bounded thread use), that take the batch's items
one by one from a shared counter: no worker idles while another still has a long tail.

Cancellation (trio's rule: never abandon a thread that writes into memory you own): workers not
yet started never start; a running worker sees ``stop`` set at once and returns after its current
item; the caller's cancellation is delivered once every started worker has returned, so when
this coroutine exits no thread is still reading into or writing from a host page.

Except when the memory's owner says it will keep that memory (:func:`leave_stuck_threads`): a
worker still running :data:`GRACE_S` after the cancellation (stuck in the kernel: a FIFO, a hung
mount) is then left behind, so neither the request nor ``aclose()`` waits for it. The owner is
told (a :class:`Straggler`) and keeps the pages that thread may still write reserved until its
``on_return`` callbacks run, on the loop, when the thread finally returns. Until then the thread
keeps its limiter token (a stuck thread is a real thread) and is counted in the backend's
:class:`~hicache_async.storage.StorageStats` (``threads_stuck``, ``threads_left_behind``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import anyio
import anyio.lowlevel

from hicache_async.storage._stats import StorageStats

__all__ = ["GRACE_S", "ItemFn", "Straggler", "leave_stuck_threads", "run_in_threads"]

logger = logging.getLogger("hicache_async.storage")

ItemFn = Callable[[int], None]
"""``fn(i)``: handle item ``i`` (blocking; runs in a worker thread)."""

GRACE_S = 0.1
"""How long a cancelled call waits for a started worker before leaving it behind (only inside
:func:`leave_stuck_threads`). An item in progress normally ends within microseconds (a page
read); waiting this long first keeps ordinary cancellations from quarantining pages at all."""


class Straggler:
    """The worker threads one cancelled call left running. ``on_return`` callbacks run on the
    event loop once every one of them has returned (never, if the loop has finished by then)."""

    def __init__(self) -> None:
        self.threads = 0  # left behind by the call
        self.returned = False
        self._running = 0
        self._sealed = False  # every worker of the call has been accounted for
        self._callbacks: list[Callable[[], None]] = []

    def on_return(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` on the loop when the threads have returned (at once if they have)."""
        if self.returned:
            fn()
        else:
            self._callbacks.append(fn)

    def _left(self) -> None:
        self.threads += 1
        self._running += 1

    def _one_returned(self) -> None:  # on the loop
        self._running -= 1
        self._maybe_done()

    def _seal(self) -> None:
        self._sealed = True
        self._maybe_done()

    def _maybe_done(self) -> None:
        if not self._sealed or self._running or self.returned:
            return
        self.returned = True
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            try:
                fn()
            except Exception:  # one owner's bug must not keep the others' pages
                logger.exception("a callback for returned worker threads failed")


@dataclass(frozen=True, slots=True)
class _Owner:
    keep: Callable[[Straggler], None]
    stats: StorageStats


_owner: ContextVar[_Owner | None] = ContextVar("hicache_async_thread_memory_owner", default=None)


@contextmanager
def leave_stuck_threads(keep: Callable[[Straggler], None], stats: StorageStats) -> Iterator[None]:
    """Within this block, a cancelled :func:`run_in_threads` leaves a stuck worker behind.

    ``keep(straggler)`` is called on the loop, once per call that left threads behind, before
    the cancellation (or error) reaches the caller: the caller must keep every page the call was
    given reserved (not freed, not handed to anyone) until ``straggler.on_return`` fires, once
    all of them returned. ``stats`` (the backend's) counts each thread until it returns.
    """
    token = _owner.set(_Owner(keep, stats))
    try:
        yield
    finally:
        _owner.reset(token)


async def run_in_threads(
    fn: ItemFn,
    count: int,
    *,
    limiter: anyio.CapacityLimiter,
    workers: int,
) -> None:
    """Run ``fn(i)`` for ``i`` in ``range(count)`` on at most ``workers`` threads."""
    if count <= 0:
        return
    workers = max(1, min(workers, count))
    stop = threading.Event()
    items = iter(range(count))
    lock = threading.Lock()
    owner = _owner.get()  # read in the caller's task (the workers below get it passed)
    straggler = Straggler()

    def work() -> None:
        while not stop.is_set():
            with lock:
                i = next(items, None)
            if i is None:
                return
            fn(i)

    try:
        if workers == 1:  # the common small batch: no task group to pay for
            await _run_one(work, stop, limiter, owner, straggler)
            return
        async with anyio.create_task_group() as group:
            for _ in range(workers):
                group.start_soon(_run_one, work, stop, limiter, owner, straggler)
    finally:
        if straggler.threads:  # every worker's wait is over: hand the left-behind ones over
            assert owner is not None
            straggler._seal()
            owner.keep(straggler)


class _Job:
    """One worker's thread job: whether it started, whether it finished, and (once a
    cancelled caller watches it) how to tell the loop that it finished."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.lock = threading.Lock()
        self.started = False
        self.withdrawn = False
        self.finished = False
        self.token: anyio.lowlevel.EventLoopToken | None = None
        self.returned: anyio.Event | None = None
        self.on_return: Callable[[], None] | None = None  # set once it is left behind

    def run(self) -> None:  # in a worker thread
        with self.lock:
            if self.withdrawn:  # cancelled before a thread picked it up: never start
                return
            self.started = True
        try:
            self.fn()
        finally:
            with self.lock:
                self.finished = True
                token = self.token
            if token is not None:  # a cancelled caller watches: tell it on its loop
                # RunFinishedError (or a loop closing just now): gone, with whoever held the pages
                with contextlib.suppress(RuntimeError):
                    token.backend_class.run_sync_soon(self._on_loop, (), token.native_token)

    def _on_loop(self) -> None:
        assert self.returned is not None
        self.returned.set()
        if self.on_return is not None:
            self.on_return()

    def withdraw(self) -> bool:
        """Make sure the job never starts (on the loop, once cancelled); ``True`` when a thread
        runs it now, which then sets :attr:`returned` on this loop when it returns."""
        returned = anyio.Event()
        token = anyio.lowlevel.current_token()
        with self.lock:
            self.withdrawn = True
            if not self.started or self.finished:
                return False
            self.returned, self.token = returned, token
            return True


async def _run_one(
    fn: Callable[[], None],
    stop: threading.Event,
    limiter: anyio.CapacityLimiter,
    owner: _Owner | None,
    straggler: Straggler,
) -> None:
    job = _Job(fn)
    # The token is the job's until its thread has returned, even when the caller moves on.
    await limiter.acquire_on_behalf_of(job)
    release = True
    try:
        # abandon_on_cancel=True lets the cancellation arrive now, so that ``stop`` is set at
        # once; a started thread is then awaited below (or, with an owner, left behind).
        await anyio.to_thread.run_sync(job.run, abandon_on_cancel=True)
    except BaseException:
        stop.set()
        if job.withdraw():
            assert job.returned is not None
            with anyio.CancelScope(shield=True):
                with anyio.move_on_after(GRACE_S if owner is not None else None):
                    await job.returned.wait()
            if owner is not None and not job.returned.is_set():
                release = False  # handed over: given back by the thread's return
                stats = owner.stats

                def returned() -> None:
                    limiter.release_on_behalf_of(job)
                    stats.thread_returned()
                    straggler._one_returned()

                job.on_return = returned
                stats.thread_left_behind()
                straggler._left()
        raise
    finally:
        if release:
            limiter.release_on_behalf_of(job)
