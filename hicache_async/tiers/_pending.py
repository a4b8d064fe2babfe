"""A count of queued work that can be awaited down to zero (for drains)."""

from __future__ import annotations

import anyio

__all__ = ["Pending"]


class Pending:
    """Work submitted and not yet finished; :meth:`wait_idle` returns when there is none."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: anyio.Event | None = None

    def add(self, n: int = 1) -> None:
        self.count += n

    def done(self, n: int = 1) -> None:
        self.count -= n
        if self.count == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def wait_idle(self) -> None:
        """Return once nothing is pending (at once when nothing is)."""
        while self.count:
            if self._idle is None:
                self._idle = anyio.Event()
            await self._idle.wait()
