"""Pending work counts: waiting for idle and waiting for progress."""

from __future__ import annotations

import anyio

from hicache_async.tiers._pending import Pending


async def test_wait_progress_returns_at_the_next_finished_piece_not_at_idle() -> None:
    pending = Pending()
    await pending.wait_progress()  # nothing pending: at once
    pending.add(2)
    woke: list[str] = []

    async def waiter(name: str, wait: object) -> None:
        await wait()  # type: ignore[operator]
        woke.append(name)

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter, "progress", pending.wait_progress)
        tg.start_soon(waiter, "idle", pending.wait_idle)
        await anyio.wait_all_tasks_blocked()
        pending.done()
        await anyio.wait_all_tasks_blocked()
        assert woke == ["progress"]
        pending.add()  # new work keeps the count up: idle waits on
        pending.done()
        await anyio.wait_all_tasks_blocked()
        assert woke == ["progress"]
        pending.done()
    assert woke == ["progress", "idle"]
