"""Fault-injection wrappers around any :class:`HiCacheStorage`, for tests of the backends and
of the tiers above them.

Each wrapper forwards the backend primitives (namespaced keys, page buffers) to the wrapped
backend and shares its counters, so ``wrapper.get_stats()`` shows the faults it caused::

    storage = FlakyStorage(create_storage("memory", config), fail_rate=0.3, seed=1)

:class:`FaultyTransferEngine` does the same for L1 <-> L2 copies: it wraps a cache's transfer
engine and makes some copies fail or run late (``hicache_async.testing.soak`` installs it).
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import torch

from hicache_async.errors import CorruptPageError, StorageError, TransferError
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.memory.slots import pages_to_slots
from hicache_async.storage import HiCacheStorage, PageBuffer
from hicache_async.transfer import LoadTicket, TransferEngine

__all__ = [
    "CorruptingStorage",
    "FaultyTransferEngine",
    "FlakyStorage",
    "ForwardingStorage",
    "SlowStorage",
    "StallingStorage",
]


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
        self.delayed = 0  # calls made late so far

    async def _sleep(self, pages: int) -> None:
        self.delayed += 1
        await anyio.sleep(self.delay + self.per_page * pages)

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await self._sleep(len(keys))
        return await super()._read_pages(keys, buffers)

    async def _write_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await self._sleep(len(keys))
        return await super()._write_pages(keys, buffers)

    async def _leading(self, keys: list[str]) -> int:
        await self._sleep(0)
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


class StallingStorage(ForwardingStorage):
    """A call stalls with probability ``rate`` (every call while ``paused``): it hangs until
    :meth:`release` or for ``stall_s`` seconds, then goes on, as a paused server or a read
    stuck in the kernel would. The wait is cancellable, like a client's socket read."""

    def __init__(
        self, inner: HiCacheStorage, rate: float = 0.05, stall_s: float = 30.0, *, seed: int = 0
    ) -> None:
        super().__init__(inner)
        self.rate = rate
        self.stall_s = stall_s
        self.paused = False
        self.injected = 0  # calls stalled so far
        self.stalled = 0  # calls stalled now
        self._rng = random.Random(seed)
        self._release: anyio.Event | None = None  # made on the loop, by the first stall
        self._stalling: anyio.Event | None = None  # set by the next stall (wait_stalled)

    async def wait_stalled(self) -> None:
        """Return once a call is stalled (at once if one is now)."""
        while not self.stalled:
            self._stalling = anyio.Event()
            await self._stalling.wait()

    def release(self) -> None:
        """Let every call stalled now go on (later calls may stall again)."""
        if self._release is not None:
            self._release.set()
            self._release = None

    async def _maybe_stall(self) -> None:
        if not self.paused and self._rng.random() >= self.rate:
            return
        self.injected += 1
        if self._release is None:
            self._release = anyio.Event()
        released = self._release
        self.stalled += 1
        if self._stalling is not None:
            self._stalling.set()
            self._stalling = None
        try:
            with anyio.move_on_after(self.stall_s):
                await released.wait()
        finally:
            self.stalled -= 1

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await self._maybe_stall()
        return await super()._read_pages(keys, buffers)

    async def _write_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await self._maybe_stall()
        return await super()._write_pages(keys, buffers)

    async def _leading(self, keys: list[str]) -> int:
        await self._maybe_stall()
        return await super()._leading(keys)


class FaultyTransferEngine(TransferEngine):
    """Wraps a :class:`TransferEngine`: a copy fails with probability ``fail_rate`` (a
    :class:`TransferError`, half of them before the copy, half after it landed, as a copy
    whose completion reports an error) and runs ``delay`` seconds late with probability
    ``slow_rate``. The late part is a cancellable sleep before the copy starts, so the
    engine's promise holds: when a call returns or raises, no copy still runs."""

    def __init__(
        self,
        inner: TransferEngine,
        *,
        fail_rate: float = 0.05,
        slow_rate: float = 0.1,
        delay: float = 0.005,
        seed: int = 0,
    ) -> None:
        super().__init__(inner.device_pool, inner.host_pool)
        self.inner = inner
        self.stats = inner.stats  # one set of counters for the wrapper and the engine
        self.fail_rate = fail_rate
        self.slow_rate = slow_rate
        self.delay = delay
        self.failed = 0  # copies made to fail
        self.slowed = 0  # copies made late
        self._rng = random.Random(seed)

    def statistics(self) -> dict[str, int]:
        return self.inner.statistics()

    async def _before(self) -> bool:
        """Delay and pick the fault of one copy: raises now, or True to raise after it."""
        if self._rng.random() < self.slow_rate:
            self.slowed += 1
            await anyio.sleep(self.delay)
        if self._rng.random() >= self.fail_rate:
            return False
        self.failed += 1
        if self._rng.random() < 0.5:
            raise TransferError("injected copy failure before the copy (FaultyTransferEngine)")
        return True

    async def backup(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> None:
        fail_after = await self._before()
        await self.inner.backup(device_slots, host_slots)
        if fail_after:
            raise TransferError("injected copy failure after the copy (FaultyTransferEngine)")

    async def backup_pages(self, device_pages: torch.Tensor, host_pages: torch.Tensor) -> None:
        fail_after = await self._before()
        await self.inner.backup_pages(device_pages, host_pages)
        if fail_after:
            raise TransferError("injected copy failure after the copy (FaultyTransferEngine)")

    @asynccontextmanager
    async def load_layers(
        self, host_slots: torch.Tensor, device_slots: torch.Tensor
    ) -> AsyncIterator[LoadTicket]:
        fail_after = await self._before()
        async with self.inner.load_layers(host_slots, device_slots) as ticket:
            yield ticket
        if fail_after:
            raise TransferError("injected copy failure after the copy (FaultyTransferEngine)")

    async def layer_ready(self, layer: int) -> None:
        await self.inner.layer_ready(layer)

    async def _backup(self, device: torch.Tensor, host: torch.Tensor) -> None:
        await self.backup_pages(device, host)  # not reached: the public methods delegate

    def _run_load(
        self, src: torch.Tensor, dst: torch.Tensor
    ) -> AbstractAsyncContextManager[LoadTicket]:
        size = self.layout.page_size
        return self.load_layers(pages_to_slots(src, size), pages_to_slots(dst, size))
