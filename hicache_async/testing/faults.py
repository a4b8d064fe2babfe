"""Fault-injection wrappers around any :class:`HiCacheStorage`, for tests of the backends and
of the tiers above them.

Each wrapper forwards the backend primitives (namespaced keys, page buffers) to the wrapped
backend and shares its counters, so ``wrapper.get_stats()`` shows the faults it caused::

    storage = FlakyStorage(create_storage("memory", config), fail_rate=0.3, seed=1)
"""

from __future__ import annotations

import random
from typing import Any

import anyio

from hicache_async.errors import CorruptPageError, StorageError
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.storage import HiCacheStorage, PageBuffer

__all__ = ["CorruptingStorage", "FlakyStorage", "ForwardingStorage", "SlowStorage"]


class ForwardingStorage(HiCacheStorage):
    """Forwards everything to ``inner``; the base of the fault wrappers."""

    def __init__(self, inner: HiCacheStorage) -> None:
        super().__init__(inner.config, inner.options)
        self.inner = inner
        self.name = f"{type(self).__name__}({inner.name})"  # type: ignore[misc]
        self.stats = inner.stats  # one set of counters for the wrapper and the backend

    def register_mem_pool_host(self, pool: HostKVPool) -> None:
        super().register_mem_pool_host(pool)
        self.inner.register_mem_pool_host(pool)

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        return await self.inner._read_pages(keys, buffers)

    async def _write_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        return await self.inner._write_pages(keys, buffers)

    async def _leading(self, keys: list[str]) -> int:
        return await self.inner._leading(keys)

    async def _clear(self) -> None:
        await self.inner._clear()

    async def _aclose(self) -> None:
        await self.inner.aclose()

    def _extra_stats(self) -> dict[str, Any]:
        return self.inner._extra_stats()


class FlakyStorage(ForwardingStorage):
    """Each call fails with probability ``fail_rate`` (a :class:`StorageError`, as a dead
    server or disk would), and every call fails while ``down`` is set."""

    def __init__(self, inner: HiCacheStorage, fail_rate: float = 0.5, *, seed: int = 0) -> None:
        super().__init__(inner)
        self.fail_rate = fail_rate
        self.down = False
        self.injected = 0
        self._rng = random.Random(seed)

    def _maybe_fail(self) -> None:
        if self.down or self._rng.random() < self.fail_rate:
            self.injected += 1
            raise StorageError("injected fault (FlakyStorage)")

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        self._maybe_fail()
        return await super()._read_pages(keys, buffers)

    async def _write_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        self._maybe_fail()
        return await super()._write_pages(keys, buffers)

    async def _leading(self, keys: list[str]) -> int:
        self._maybe_fail()
        return await super()._leading(keys)


class SlowStorage(ForwardingStorage):
    """Every call first sleeps ``delay`` seconds plus ``per_page`` per page (cancellable), as a
    slow or distant backend would; for timeout and cancellation tests."""

    def __init__(self, inner: HiCacheStorage, delay: float = 0.05, per_page: float = 0.0) -> None:
        super().__init__(inner)
        self.delay = delay
        self.per_page = per_page

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await anyio.sleep(self.delay + self.per_page * len(keys))
        return await super()._read_pages(keys, buffers)

    async def _write_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await anyio.sleep(self.delay + self.per_page * len(keys))
        return await super()._write_pages(keys, buffers)

    async def _leading(self, keys: list[str]) -> int:
        await anyio.sleep(self.delay)
        return await super()._leading(keys)


class CorruptingStorage(ForwardingStorage):
    """A page read with probability ``rate`` lands with a flipped byte and is reported as a
    failed check (``False``, a ``corrupt`` error): what a backend does when stored bytes rot.
    Tests of the tiers check that such a page is never used, even though its host page was
    written."""

    def __init__(self, inner: HiCacheStorage, rate: float = 1.0, *, seed: int = 0) -> None:
        super().__init__(inner)
        self.rate = rate
        self.corrupted = 0
        self._rng = random.Random(seed)

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        found = await super()._read_pages(keys, buffers)
        for i, ok in enumerate(found):
            if ok and self._rng.random() < self.rate:
                segment = buffers[i][self._rng.randrange(len(buffers[i]))]
                if len(segment):
                    at = self._rng.randrange(len(segment))
                    segment[at] ^= 0xFF
                self.corrupted += 1
                self.stats.record_error("corrupt", CorruptPageError("injected (CorruptingStorage)"))
                found[i] = False
        return found
