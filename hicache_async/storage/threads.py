"""Blocking page I/O in worker threads, split into chunks, safe to cancel.

Dispatching one thread job per page costs tens of microseconds on the loop, as much as the copy
of a hot 256 KiB page; so a batch is split into a few contiguous chunks, one thread job each,
through a :class:`anyio.CapacityLimiter` (house rule 4: bounded thread use).

Cancellation (trio's rule: never abandon a thread that writes into memory you own): chunks not
yet started never start; a running chunk sees ``stop`` set and returns after its current page;
the caller's cancellation is delivered only once every running chunk has returned, so when this
coroutine exits no thread is still reading into or writing from a host page.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import anyio

__all__ = ["ChunkFn", "run_chunked"]

ChunkFn = Callable[[int, int, threading.Event], None]
"""``fn(start, stop_index, stop_event)``: handle items ``[start, stop_index)``, checking
``stop_event`` between items."""


async def _set_when_cancelled(stop: threading.Event) -> None:
    try:
        await anyio.sleep_forever()
    finally:
        stop.set()


async def run_chunked(
    fn: ChunkFn,
    count: int,
    *,
    limiter: anyio.CapacityLimiter,
    chunks: int,
) -> None:
    """Run ``fn`` over ``count`` items in at most ``chunks`` contiguous chunks of threads."""
    if count <= 0:
        return
    chunks = max(1, min(chunks, count))
    bounds = [count * i // chunks for i in range(chunks + 1)]
    stop = threading.Event()
    async with anyio.create_task_group() as group:
        # The watcher and the chunks are siblings: cancelling the caller cancels the group,
        # so the watcher sets ``stop`` at once while the chunks' threads run to their next page.
        group.start_soon(_set_when_cancelled, stop)
        group.start_soon(_run_all, fn, bounds, stop, limiter, group.cancel_scope)


async def _run_all(
    fn: ChunkFn,
    bounds: list[int],
    stop: threading.Event,
    limiter: anyio.CapacityLimiter,
    done: anyio.CancelScope,
) -> None:
    async with anyio.create_task_group() as workers:
        for lo, hi in itertools.pairwise(bounds):
            # abandon_on_cancel=False: a started thread is always awaited to its end.
            workers.start_soon(_run_one, fn, lo, hi, stop, limiter)
    done.cancel()  # every chunk finished: stop the watcher


async def _run_one(
    fn: ChunkFn, lo: int, hi: int, stop: threading.Event, limiter: anyio.CapacityLimiter
) -> None:
    await anyio.to_thread.run_sync(fn, lo, hi, stop, limiter=limiter)
