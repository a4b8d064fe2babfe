"""The transfer engine contract: backup (L1 -> L2) and load (L2 -> L1) of whole pages.

Callers follow reserve -> move -> commit (house rule 2): they allocate and lock the pages on
both sides, await the move, then commit or roll back. The engine's promise that makes this
safe under cancellation: **when ``backup``/``load`` returns or raises, cancellation included,
no copy still reads its source or writes its destination**. A cancelled or failed move leaves
the destination's bytes unspecified (possibly part-copied), so the caller frees it without
committing; it is never handed out while a copy can still land in it.

Loads complete layer by layer (SGLang's ``LayerDoneCounter``): ``async with
engine.load_layers(host_slots, device_slots) as ticket`` starts a load and yields a
:class:`LoadTicket` whose ``layer_ready(i)`` returns once layer ``i`` is in place, so layer
``i`` can compute while later layers still copy. Leaving the block waits for the whole load.
Several loads may run at once (one per request of a batch); ``engine.layer_ready(i)`` waits
for layer ``i`` of *every* load in flight when it is called, which is what a forward pass over
the whole batch needs.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import torch

from hicache_async.errors import IndexStateError, LayoutError, TransferError
from hicache_async.memory.allocator import PagedAllocator
from hicache_async.memory.device_pool import DeviceKVPool
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.memory.slots import slots_to_pages

__all__ = ["LoadTicket", "TransferEngine", "TransferStats"]


class LoadTicket(ABC):
    """One load in flight: per-layer readiness, in layer order."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    @abstractmethod
    async def layer_ready(self, layer: int) -> None:
        """Return once ``layer`` of this load is in the device pool (raises if it failed)."""

    @abstractmethod
    def is_layer_ready(self, layer: int) -> bool:
        """Whether ``layer`` is in place already, without waiting."""

    async def done(self) -> None:
        """Return once every layer is in place."""
        await self.layer_ready(self.num_layers - 1)


class TransferStats:
    """Counters of one engine (plain ints; read them on the loop)."""

    __slots__ = ("backup_bytes", "backups", "cancelled", "failed", "load_bytes", "loads")

    def __init__(self) -> None:
        self.backups = self.loads = self.backup_bytes = self.load_bytes = 0
        self.cancelled = self.failed = 0

    def as_dict(self) -> dict[str, int]:
        """The counters as a JSON-ready dict."""
        return {name: getattr(self, name) for name in self.__slots__}


class TransferEngine(ABC):
    """Moves whole pages between a :class:`DeviceKVPool` and a :class:`HostKVPool`."""

    def __init__(self, device_pool: DeviceKVPool, host_pool: HostKVPool) -> None:
        if device_pool.layout != host_pool.layout:
            raise LayoutError(
                f"device pool layout {device_pool.layout.fingerprint} differs from host pool "
                f"layout {host_pool.layout.fingerprint}"
            )
        self.device_pool = device_pool
        self.host_pool = host_pool
        self.layout = device_pool.layout
        self.stats = TransferStats()
        self._inflight: list[LoadTicket] = []

    def statistics(self) -> dict[str, int]:
        """The engine's counters plus the loads in flight now (for metrics)."""
        return {**self.stats.as_dict(), "loads_in_flight": len(self._inflight)}

    async def backup(self, device_slots: torch.Tensor, host_slots: torch.Tensor) -> None:
        """Copy the pages of ``device_slots`` into those of ``host_slots`` (L1 -> L2)."""
        host, device = self.host_and_device_pages(host_slots, device_slots)
        await self._backup(device, host)

    async def backup_pages(self, device_pages: torch.Tensor, host_pages: torch.Tensor) -> None:
        """:meth:`backup` for a caller that holds page indices (1-D int64 CPU tensors, one per
        page, pairwise): no slot round trip. The pages are checked to be allocated all the same."""
        host, device = self.checked_pages(host_pages, device_pages)
        await self._backup(device, host)

    @abstractmethod
    async def _backup(self, device: torch.Tensor, host: torch.Tensor) -> None:
        """Copy checked device pages ``device`` into host pages ``host`` (both CPU int64)."""

    @abstractmethod
    def _run_load(
        self, src: torch.Tensor, dst: torch.Tensor
    ) -> AbstractAsyncContextManager[LoadTicket]:
        """Start moving host pages ``src`` to device pages ``dst``; exit once it is over."""

    async def load(self, host_slots: torch.Tensor, device_slots: torch.Tensor) -> None:
        """Copy the pages of ``host_slots`` into those of ``device_slots`` (L2 -> L1)."""
        async with self.load_layers(host_slots, device_slots) as ticket:
            await ticket.done()

    @asynccontextmanager
    async def load_layers(
        self, host_slots: torch.Tensor, device_slots: torch.Tensor
    ) -> AsyncIterator[LoadTicket]:
        """Start a load; the ticket reports each layer; leaving waits for the whole load."""
        src, dst = self.host_and_device_pages(host_slots, device_slots)
        self.stats.loads += 1
        self.stats.load_bytes += src.numel() * self.layout.bytes_per_page
        ticket: LoadTicket | None = None
        try:
            async with self._run_load(src, dst) as ticket:
                self._inflight.append(ticket)
                yield ticket
        finally:  # only once the copy is over: until then engine.layer_ready waits for it
            if ticket is not None:
                self._inflight.remove(ticket)

    async def layer_ready(self, layer: int) -> None:
        """Return once ``layer`` is in place for every load in flight now."""
        for ticket in list(self._inflight):
            # A failed or cancelled load writes nothing more; its owner handles the error.
            with contextlib.suppress(TransferError):
                await ticket.layer_ready(layer)

    def host_and_device_pages(
        self, host_slots: torch.Tensor, device_slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked page indices (CPU int64) of two equally long, page-aligned slot tensors.

        Slots may live on either device; CUDA slot tensors cost a sync with the current stream
        to read them, so pass CPU ones (the loop keeps the index on the CPU anyway).
        """
        if host_slots.dim() != 1 or device_slots.dim() != 1:
            raise LayoutError("token slots must be 1-D int64 tensors")
        if host_slots.numel() != device_slots.numel():
            raise LayoutError(
                f"{host_slots.numel()} host slots vs {device_slots.numel()} device slots: "
                "a transfer moves equally many tokens"
            )
        size = self.layout.page_size
        return self.checked_pages(
            slots_to_pages(host_slots.cpu(), size), slots_to_pages(device_slots.cpu(), size)
        )

    def checked_pages(
        self, host_pages: torch.Tensor, device_pages: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``host_pages`` and ``device_pages`` (CPU int64) once checked: 1-D, equally many, and
        allocated in their pools."""
        for pages in (host_pages, device_pages):
            if pages.dim() != 1 or pages.dtype != torch.int64 or not pages.is_cpu:
                raise LayoutError("page indices must be 1-D int64 CPU tensors")
        if host_pages.numel() != device_pages.numel():
            raise LayoutError(
                f"{host_pages.numel()} host pages vs {device_pages.numel()} device pages: "
                "a transfer moves equally many pages"
            )
        host = _reserved(self.host_pool.allocator, host_pages, "host")
        return host, _reserved(self.device_pool.allocator, device_pages, "device")


def _reserved(allocator: PagedAllocator, pages: torch.Tensor, tier: str) -> torch.Tensor:
    # A copy touches only pages its caller holds: a free page could be handed out mid-copy.
    if pages.numel() and not allocator.is_allocated(pages):
        raise IndexStateError(f"a transfer touches {tier} pages that are not allocated")
    return pages
