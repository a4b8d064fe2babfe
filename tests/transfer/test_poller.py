from __future__ import annotations

import concurrent.futures
import threading
import time

import anyio
import pytest

from hicache_async.errors import ClosedError
from hicache_async.transfer import EventPoller, is_complete


class Deadline:
    """A completion object that is done once a time has passed."""

    def __init__(self, seconds: float) -> None:
        self.at = time.perf_counter() + seconds

    def __call__(self) -> bool:
        return time.perf_counter() >= self.at


async def test_waits_for_a_future_finished_by_a_thread() -> None:
    future: concurrent.futures.Future[int] = concurrent.futures.Future()
    timer = threading.Timer(0.02, future.set_result, args=(1,))
    async with EventPoller.open() as poller:
        timer.start()
        try:
            await poller.wait(future)
        finally:
            timer.join()
        assert future.done()
        assert is_complete(future)
        assert poller.pending == 0


async def test_many_waiters_share_one_poller() -> None:
    async with EventPoller.open() as poller:
        done: list[int] = []

        async def one(i: int) -> None:
            await poller.wait(Deadline(0.001 * (i % 10)))
            done.append(i)

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(one, i)
        assert sorted(done) == list(range(200))
        stats = poller.statistics()
        assert stats["completions"] >= 1
        assert stats["pending"] == 0


async def test_parks_when_idle_and_backs_off_while_pending() -> None:
    async with EventPoller.open(spin_time=100e-6, min_interval=50e-6, max_interval=1e-3) as poller:
        await poller.wait(Deadline(0.001))
        polls = poller.polls
        await anyio.sleep(0.05)
        assert poller.polls == polls  # nothing pending: no polling at all
        start = poller.polls
        await poller.wait(Deadline(0.1))
        rounds = poller.polls - start
        # ~100 ms at about 1 ms per round once backed off, plus the spins and the ramp-up.
        assert 30 <= rounds < 2000


async def test_a_failing_check_reaches_its_waiter_only() -> None:
    def broken() -> bool:
        raise RuntimeError("CUDA error: an illegal memory access")

    async with EventPoller.open() as poller:
        with pytest.raises(RuntimeError, match="illegal memory"):
            await poller.wait(_later(broken))
        await poller.wait(Deadline(0.002))  # the poller lives on


def _later(probe):
    first = [True]

    def check() -> bool:
        if first[0]:  # not done at the first (inline) check, so the poller sees it
            first[0] = False
            return False
        return bool(probe())

    return check


async def test_cancelling_a_wait_unregisters_it() -> None:
    async with EventPoller.open() as poller:
        with anyio.move_on_after(0.01) as scope:
            await poller.wait(lambda: False)
        assert scope.cancelled_caught
        assert poller.pending == 0


async def test_wait_needs_a_running_poller_and_a_known_object() -> None:
    poller = EventPoller()
    with pytest.raises(ClosedError, match="not running"):
        await poller.wait(lambda: False)
    await poller.wait(lambda: True)  # already complete: no poller needed
    async with EventPoller.open() as running:
        with pytest.raises(TypeError, match="cannot poll"):
            await running.wait(42)  # type: ignore[arg-type]
    with pytest.raises(ClosedError):
        await running.wait(lambda: False)
    with pytest.raises(ValueError, match="min_interval"):
        EventPoller(min_interval=0)


async def test_stopping_the_poller_releases_waiters() -> None:
    errors: list[BaseException] = []
    poller = EventPoller()

    async def waiter() -> None:
        try:
            await poller.wait(lambda: False)
        except ClosedError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as outer, anyio.create_task_group() as inner:
        await inner.start(poller.run)
        outer.start_soon(waiter)
        await anyio.sleep(0.01)
        inner.cancel_scope.cancel()
    assert len(errors) == 1


async def test_waits_for_torch_distributed_work() -> None:
    import torch
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    store = dist.HashStore()
    group = dist.ProcessGroupGloo(store, 0, 1)
    try:
        tensor = torch.ones(1 << 16)
        work = group.allreduce([tensor])
        async with EventPoller.open() as poller:
            await poller.wait(work)
        assert work.is_completed()
        assert float(tensor[0]) == 1.0
    finally:
        del group


async def test_errors_in_the_block_come_out_unwrapped() -> None:
    async def fail_inside() -> None:
        async with EventPoller.open():
            try:
                raise KeyError("cause")
            except KeyError as exc:
                raise ValueError("boom") from exc

    with pytest.raises(ValueError, match="boom") as info:
        await fail_inside()
    assert isinstance(info.value.__cause__, KeyError)
