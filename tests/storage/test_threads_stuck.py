"""A worker thread stuck in a blocking call: left behind (counted, its memory kept by its owner
until it returns) instead of hanging the cancelled caller; never abandoned without an owner."""

from __future__ import annotations

import threading
from collections.abc import Callable

import anyio
import pytest

from hicache_async.storage import StorageStats
from hicache_async.storage.threads import Straggler, leave_stuck_threads, run_in_threads

# Only a guard that turns a hang (the defect) into a failure; nothing asserts a duration.
LIVENESS_S = 10.0


def blocking(stuck: set[int], release: threading.Event) -> tuple[Callable[[int], None], list[int]]:
    """An item function whose items in ``stuck`` block until ``release`` (a thread in the
    kernel, as far as the caller can tell); the others return at once."""
    started: list[int] = []

    def fn(i: int) -> None:
        started.append(i)
        if i in stuck:
            release.wait()

    return fn, started


async def until_started(started: list[int], n: int) -> None:
    while len(started) < n:  # noqa: ASYNC110 (the thread gives no event of its own)
        await anyio.sleep(0.001)


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_stuck_thread_is_left_behind_and_its_owner_told(workers: int) -> None:
    await left_behind_then_back(workers)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_stuck_thread_is_left_behind_on_trio(workers: int) -> None:
    """The thread's return reaches the loop through trio's token too."""
    anyio.run(left_behind_then_back, workers, backend="trio")


async def left_behind_then_back(workers: int) -> None:
    release = threading.Event()
    fn, started = blocking(set(range(workers)), release)
    limiter = anyio.CapacityLimiter(4)
    stats = StorageStats(backend="test")
    kept: list[Straggler] = []
    ended = anyio.Event()
    try:
        async with anyio.create_task_group() as tg:

            async def call() -> None:
                with leave_stuck_threads(kept.append, stats):
                    await run_in_threads(fn, 8, limiter=limiter, workers=workers)
                ended.set()

            tg.start_soon(call)
            await until_started(started, workers)
            tg.cancel_scope.cancel()
        # The call ended (cancelled) while its threads are still blocked.
        assert not release.is_set()
        assert not ended.is_set()  # cancelled, not completed
        (straggler,) = kept  # one per call, however many of its threads were left
        assert straggler.threads == workers
        assert not straggler.returned
        assert (stats.threads_left_behind, stats.threads_stuck) == (workers, workers)
        assert limiter.borrowed_tokens == workers  # a stuck thread is a real thread
        assert sorted(started) == list(range(workers))  # no further item was started
    finally:
        release.set()
    back = anyio.Event()
    straggler.on_return(back.set)
    await back.wait()  # on the loop, once every thread of the call returned
    assert (stats.threads_left_behind, stats.threads_stuck) == (workers, 0)
    assert limiter.borrowed_tokens == 0
    assert sorted(started) == list(range(workers))


async def test_without_an_owner_a_cancelled_call_still_waits_for_its_thread() -> None:
    """The house rule stands where nobody keeps the memory: the thread is awaited."""
    release = threading.Event()
    fn, started = blocking({0}, release)
    limiter = anyio.CapacityLimiter(1)
    returned = anyio.Event()
    async with anyio.create_task_group() as tg:

        async def call() -> None:
            try:
                await run_in_threads(fn, 2, limiter=limiter, workers=1)
            finally:
                returned.set()

        tg.start_soon(call)
        await until_started(started, 1)
        tg.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await anyio.sleep(0.2)  # twice the grace an owner would get
            assert not returned.is_set()  # still waiting for the thread
            release.set()
            await returned.wait()
    assert started == [0]
    assert limiter.borrowed_tokens == 0


async def test_a_thread_that_returns_within_the_grace_is_not_left_behind() -> None:
    release = threading.Event()
    fn, started = blocking({0}, release)
    stats = StorageStats(backend="test")
    kept: list[Straggler] = []
    limiter = anyio.CapacityLimiter(1)
    async with anyio.create_task_group() as tg:

        async def call() -> None:
            with leave_stuck_threads(kept.append, stats):
                await run_in_threads(fn, 2, limiter=limiter, workers=1)

        tg.start_soon(call)
        await until_started(started, 1)
        tg.cancel_scope.cancel()
        release.set()  # returns at once: well within the grace
    assert kept == []
    assert (stats.threads_left_behind, stats.threads_stuck) == (0, 0)
    assert limiter.borrowed_tokens == 0


async def test_stuck_threads_are_in_the_backend_stats() -> None:
    stats = StorageStats(backend="test")
    assert stats.to_dict()["threads_stuck"] == 0
    assert stats.to_dict()["threads_left_behind"] == 0
