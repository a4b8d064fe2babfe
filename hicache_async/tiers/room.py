"""Requests waiting for L1 room, served first come, first served.

``await session.allocate(n)`` that finds L1 full joins the queue. Only the head tries to take
pages (evicting, backing up under ``write_back``); the others wait for their turn, so a large
request is not starved by a stream of small ones. The head sleeps until something may have made
room: L1 pages freed (a request ended, an eviction) or device pages unlocked (evictable now).
The tree and the L1 tier tell the queue only while someone waits, so the hit path pays one
``is None`` test for it.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from hicache_async.errors import CapacityError, ClosedError, HiCacheError
from hicache_async.radix import RadixTree
from hicache_async.tiers._paged import PagedTier

__all__ = ["RoomQueue", "Turn"]

T = TypeVar("T")


class Turn:
    """One waiter's place in the queue."""

    __slots__ = ("abandoned", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()  # set when it becomes the head (or is abandoned)
        self.abandoned = False  # its session was closed while it waited


class RoomQueue:
    """The FIFO of requests waiting for L1 pages (one per cache)."""

    def __init__(self, tree: RadixTree, tier: PagedTier) -> None:
        self._tree, self._tier = tree, tier
        self._queue: collections.deque[Turn] = collections.deque()
        self._changed: anyio.Event | None = None  # set by notify(); the head waits on it
        self._closed = False

    @property
    def waiting(self) -> int:
        """Requests waiting for room now (an abandoned turn has left already)."""
        return len(self._queue)

    def notify(self) -> None:
        """Something may have made room: wake the head to try again."""
        changed = self._changed
        if changed is not None:
            self._changed = None
            changed.set()

    def abandon(self, turn: Turn) -> None:
        """The waiter's session was closed: it leaves the queue now (the head, which may run
        before the waiter's task does, must not count it as waiting) and is woken to raise."""
        turn.abandoned = True
        self._leave(turn)
        turn.event.set()
        self.notify()

    def close(self) -> None:
        """The cache is closing: every waiter wakes and raises :class:`ClosedError`."""
        self._closed = True
        for turn in self._queue:
            turn.event.set()
        self.notify()

    async def wait(
        self,
        turn: Turn,
        take: Callable[[], Awaitable[T | None]],
        stuck: Callable[[], str | None],
    ) -> T:
        """Wait for ``turn``, then call ``take`` until it returns something. ``stuck`` says
        why no room can ever come (every request that holds L1 pages is waiting too, and no
        background work will free any): then :class:`CapacityError`, not a wait for ever."""
        if self._closed:
            raise ClosedError("the cache closed: no room will come")
        queue = self._queue
        queue.append(turn)
        if len(queue) == 1:
            self._listen(True)
        else:
            self.notify()  # one more waiter: the head checks again whether it is stuck
        try:
            if queue[0] is not turn:
                await turn.event.wait()
            while True:
                if turn.abandoned:
                    raise HiCacheError("the session was closed while allocate() waited for room")
                if self._closed:
                    raise ClosedError("the cache closed while allocate() waited for room")
                # Made before trying: a change while ``take`` awaits is not missed.
                changed = self._changed
                if changed is None:
                    changed = self._changed = anyio.Event()
                result = await take()
                if result is not None:
                    return result
                reason = stuck()
                if reason is not None:
                    raise CapacityError(reason)
                await changed.wait()
        finally:
            self._leave(turn)

    def _leave(self, turn: Turn) -> None:
        """Take ``turn`` out of the queue (once), passing the head on."""
        queue = self._queue
        if turn not in queue:
            return
        head = queue[0] is turn
        queue.remove(turn)
        if not queue:
            self._listen(False)
        elif head:
            queue[0].event.set()

    def _listen(self, on: bool) -> None:
        callback = self.notify if on else None
        self._tree.on_device_unlock = callback
        self._tier.on_free = callback
