"""Admission by worst case: how a server keeps requests that wait for L1 room from waiting
for each other.

``await s.allocate(n)`` waits for room, but room only comes when some request ends; if every
open request holds pages and waits for more (decode takes a page every ``page_size`` tokens),
none can end, and the cache says so at once (``CapacityError``: no room can ever come).
SGLang's scheduler retracts a request then. A handler per request can do simpler: before its
session opens, it takes from a budget of L1 pages the most it will ever hold (prompt + answer,
plus one page a limited hit may lock beside the slots allocated for it). The requests admitted
then always fit together, so their allocations wait only for evictions and backups in flight,
which end; a request over the budget waits for admission, first come first served, holding
nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from hicache_async.errors import CapacityError

__all__ = ["PageBudget", "worst_case_pages"]


def worst_case_pages(tokens: int, page_size: int) -> int:
    """The most L1 pages a request of ``tokens`` tokens (prompt and fed output) holds at once:
    its pages, and one more while a hit cut by ``load(limit=...)`` locks a page whose tokens it
    also allocated (the copy is freed at commit)."""
    return -(-tokens // page_size) + 1


class _Waiter:
    __slots__ = ("event", "pages")

    def __init__(self, pages: int) -> None:
        self.pages = pages
        self.event = anyio.Event()


class PageBudget:
    """``pages`` L1 pages handed to requests by their worst case, first come first served."""

    def __init__(self, pages: int) -> None:
        if pages < 1:
            raise CapacityError(f"a page budget needs at least one page, not {pages}")
        self.capacity = self.free = pages
        self.waited = 0  # requests that had to wait for admission, so far
        self._queue: deque[_Waiter] = deque()

    @property
    def waiting(self) -> int:
        """Requests waiting for admission."""
        return len(self._queue)

    @asynccontextmanager
    async def reserve(self, pages: int) -> AsyncIterator[None]:
        """Hold ``pages`` of the budget for the block; wait while others hold them."""
        if pages > self.capacity:
            raise CapacityError(
                f"a request needing {pages} L1 pages can never run: the budget is "
                f"{self.capacity} (shorter requests or more device_pages)"
            )
        if self._queue or pages > self.free:
            waiter = _Waiter(pages)
            self._queue.append(waiter)
            self.waited += 1
            try:
                await waiter.event.wait()
            except BaseException:
                if waiter.event.is_set():  # granted as it was cancelled: give it back
                    self._release(pages)
                else:
                    self._queue.remove(waiter)
                    self._grant()  # the ones behind it may fit now
                raise
        else:
            self.free -= pages
        try:
            yield
        finally:
            self._release(pages)

    def _release(self, pages: int) -> None:
        self.free += pages
        self._grant()

    def _grant(self) -> None:
        queue = self._queue
        while queue and queue[0].pages <= self.free:
            waiter = queue.popleft()
            self.free -= waiter.pages
            waiter.event.set()
