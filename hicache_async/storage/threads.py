"""Blocking page I/O in worker threads, safe to cancel.

Dispatching one thread job per page costs tens of microseconds on the loop, as much as the copy
of a hot 256 KiB page; so a batch runs as a few thread jobs ("workers"), each holding a token of
a :class:`anyio.CapacityLimiter` (house rule 4: bounded thread use), that take the batch's items
one by one from a shared counter: no worker idles while another still has a long tail.

Cancellation (trio's rule: never abandon a thread that writes into memory you own): workers not
yet started never start; a running worker sees ``stop`` set at once and returns after its current
item; the caller's cancellation is delivered only once every started worker has returned, so
when this coroutine exits no thread is still reading into or writing from a host page.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio

__all__ = ["ItemFn", "run_in_threads"]

ItemFn = Callable[[int], None]
"""``fn(i)``: handle item ``i`` (blocking; runs in a worker thread)."""

# How often a cancelled worker checks whether its thread has returned (only when cancelled).
_POLL_S = 0.0005


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

    def work() -> None:
        while not stop.is_set():
            with lock:
                i = next(items, None)
            if i is None:
                return
            fn(i)

    if workers == 1:  # the common small batch: no task group to pay for
        await _run_one(work, stop, limiter)
        return
    async with anyio.create_task_group() as group:
        for _ in range(workers):
            group.start_soon(_run_one, work, stop, limiter)


class _Job:
    """One worker's thread job: whether it started, and when it is done."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.lock = threading.Lock()
        self.started = False
        self.withdrawn = False
        self.done = threading.Event()

    def run(self) -> None:
        with self.lock:
            if self.withdrawn:  # cancelled before a thread picked it up: never start
                return
            self.started = True
        try:
            self.fn()
        finally:
            self.done.set()

    def withdraw(self) -> bool:
        """Make sure the job never starts; ``True`` when it had started already."""
        with self.lock:
            self.withdrawn = True
            return self.started


async def _run_one(
    fn: Callable[[], None], stop: threading.Event, limiter: anyio.CapacityLimiter
) -> None:
    chunk = _Job(fn)
    # The token is ours until the thread has returned, even when the wait below is cancelled.
    async with limiter:
        try:
            # abandon_on_cancel=True lets the cancellation arrive now, so that ``stop`` is set
            # at once; a started thread is then awaited below, never abandoned.
            await anyio.to_thread.run_sync(chunk.run, abandon_on_cancel=True)
        except BaseException:
            stop.set()
            if chunk.withdraw():
                with anyio.CancelScope(shield=True):
                    # Polled, and only on this cancelled path: the thread cannot be awaited
                    # otherwise once its run_sync call was abandoned.
                    while not chunk.done.is_set():  # noqa: ASYNC110
                        await anyio.sleep(_POLL_S)
            raise
