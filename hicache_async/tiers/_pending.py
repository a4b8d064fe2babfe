"""A count of queued work that can be awaited down to zero (drains) or to the next finished
piece (a request waiting for pages that work in flight pins)."""

from __future__ import annotations

import anyio

__all__ = ["Pending"]


class Pending:
    """Work submitted and not yet finished; :meth:`wait_idle` returns when there is none,
    :meth:`wait_progress` when some of it finished."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: anyio.Event | None = None
        self._progress: anyio.Event | None = None

    def add(self, n: int = 1) -> None:
        self.count += n

    def done(self, n: int = 1) -> None:
        self.count -= n
        if self._progress is not None:
            self._progress.set()
            self._progress = None
        if self.count == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        """Return once nothing is pending (at once when nothing is)."""
        while self.count:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()

    async def wait_progress(self) -> None:
        """Return once some pending work finished (at once when nothing is pending). Under a
        steady stream of new work the count may never reach zero: a waiter that needs only
        what some finished piece frees must not wait for idle."""
        if self.count:
            if self._progress is None:
                self._progress = anyio.Event()
            await self._progress.wait()
