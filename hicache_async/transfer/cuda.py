"""The CUDA transfer engine: copy streams, events, and the poller to await them.

Backups (D2H) and loads (H2D) each run on a dedicated stream that first waits for the current
(compute) stream, so the copies see what the model wrote and never overtake readers of the
destination. Scattered device pages are gathered (``index_select``) into a contiguous staging
tensor on the device, which moves to or from pinned host memory in one ``copy_(non_blocking=
True)`` per run of consecutive host pages (per layer and plane for ``layer_first``, whose pages
are contiguous only within a plane); loads then scatter with ``index_copy_`` and record one
event per layer. Nothing on the loop thread synchronizes: events are awaited through the
:class:`~hicache_async.transfer.poller.EventPoller`.

The staging and index tensors stay referenced until the last event of their copy completed; a
cancelled caller waits (shielded) for that event too, so no copy lands in memory its owner
already freed. A page-first load stages every layer before the first scatter (pages are
contiguous across layers), so its layers become ready close together; ``layer_first`` loads
stage layer by layer and overlap with compute.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import NoReturn

import anyio
import torch

from hicache_async.errors import ClosedError, LayoutError, TransferError
from hicache_async.memory.device_pool import DeviceKVPool
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.transfer.base import LoadTicket, TransferEngine
from hicache_async.transfer.plan import device_pages_view, host_pages_view, plan_pages
from hicache_async.transfer.poller import EventPoller

__all__ = ["CudaLoadTicket", "CudaTransferEngine"]

_ALWAYS_RUNS = 1 << 40  # bytes per page that make the planner always coalesce into runs


class CudaLoadTicket(LoadTicket):
    """A load on the load stream; ``events[i]`` completes when layer ``i`` is in place.

    A compute stream can also wait on the GPU side: ``stream.wait_event(ticket.events[i])``.
    """

    def __init__(self, poller: EventPoller, events: list[torch.cuda.Event], keep: object) -> None:
        super().__init__(len(events))
        self.events = events
        self._poller = poller
        self._keep: object = keep  # staging and index tensors the copies still read

    def is_layer_ready(self, layer: int) -> bool:
        return bool(self.events[self._check(layer)].query())  # type: ignore[no-untyped-call]

    async def layer_ready(self, layer: int) -> None:
        await self._poller.wait(self.events[self._check(layer)])

    def _check(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise LayoutError(f"layer {layer} is outside [0, {self.num_layers})")
        return layer


class CudaTransferEngine(TransferEngine):
    """Copies between a CUDA device pool and a pinned host pool on two copy streams."""

    def __init__(
        self, device_pool: DeviceKVPool, host_pool: HostKVPool, poller: EventPoller
    ) -> None:
        super().__init__(device_pool, host_pool)
        if device_pool.device.type != "cuda":
            raise LayoutError(
                f"CudaTransferEngine needs a CUDA device pool, not {device_pool.device}"
            )
        if not host_pool.pinned:
            raise LayoutError("CudaTransferEngine needs a pinned host pool (pin_memory=True)")
        self.device = device_pool.device
        self.poller = poller
        self.backup_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        self.load_stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        self._device = device_pages_view(device_pool)  # [L, P, pages, C]
        self._host = host_pages_view(host_pool)  # [L, P, pages, C], maybe permuted
        layers, planes = self.layout.num_layers, self.layout.kv_planes
        self._host_pages = host_pool.buffer.view(host_pool.num_pages, layers, planes, -1)

    async def _backup(self, device: torch.Tensor, host: torch.Tensor) -> None:
        self.stats.backups += 1
        self.stats.backup_bytes += host.numel() * self.layout.bytes_per_page
        if host.numel() == 0:
            return
        try:
            event, keep = self._enqueue_backup(host, device)
        except RuntimeError as exc:
            await self._fail(self.backup_stream, exc)
        await self._settle(event)
        del keep  # the copy is over: staging may go back to the caching allocator

    def _enqueue_backup(
        self, host: torch.Tensor, device: torch.Tensor
    ) -> tuple[torch.cuda.Event, object]:
        positions = torch.arange(host.numel(), dtype=torch.int64)
        runs = plan_pages(positions, host, _ALWAYS_RUNS).runs or ()
        stream = self.backup_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        index_cpu = device.pin_memory()
        with torch.cuda.stream(stream):
            index = index_cpu.to(self.device, non_blocking=True)
            if self.host_pool.is_page_first:
                # [n, L, P, C]: a run of host pages is one contiguous block.
                staging = self._device.permute(2, 0, 1, 3).index_select(0, index)
                for s0, d0, n in runs:
                    self._host_pages[d0 : d0 + n].copy_(staging[s0 : s0 + n], non_blocking=True)
            else:
                staging = self._device.index_select(2, index)  # [L, P, n, C]
                for layer in range(self.layout.num_layers):
                    for plane in range(self.layout.kv_planes):
                        dst, src = self._host[layer, plane], staging[layer, plane]
                        for s0, d0, n in runs:
                            dst[d0 : d0 + n].copy_(src[s0 : s0 + n], non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
        return event, (staging, index, index_cpu)

    @asynccontextmanager
    async def _run_load(self, src: torch.Tensor, dst: torch.Tensor) -> AsyncIterator[LoadTicket]:
        try:
            ticket = self._enqueue_load(src, dst)
        except RuntimeError as exc:
            await self._fail(self.load_stream, exc)
        try:
            yield ticket
        finally:
            await self._settle(ticket.events[-1], shielded=True)
            ticket._keep = None

    def _enqueue_load(self, src: torch.Tensor, dst: torch.Tensor) -> CudaLoadTicket:
        n = src.numel()
        layers, planes = self.layout.num_layers, self.layout.kv_planes
        positions = torch.arange(n, dtype=torch.int64)
        runs = plan_pages(src, positions, _ALWAYS_RUNS).runs or ()
        stream = self.load_stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        index_cpu = dst.pin_memory()
        events: list[torch.cuda.Event] = []
        with torch.cuda.stream(stream):
            index = index_cpu.to(self.device, non_blocking=True)
            if self.host_pool.is_page_first:
                staging = torch.empty(
                    (n, layers, planes, self._device.shape[-1]),
                    dtype=self.layout.dtype,
                    device=self.device,
                )
                for s0, d0, k in runs:
                    staging[d0 : d0 + k].copy_(self._host_pages[s0 : s0 + k], non_blocking=True)
                staged = staging.permute(1, 2, 0, 3)  # [L, P, n, C]
            else:
                staging = torch.empty(
                    (layers, planes, n, self._device.shape[-1]),
                    dtype=self.layout.dtype,
                    device=self.device,
                )
                staged = staging
            for layer in range(layers):
                if not self.host_pool.is_page_first:
                    for plane in range(planes):
                        dst_view, src_view = staging[layer, plane], self._host[layer, plane]
                        for s0, d0, k in runs:
                            dst_view[d0 : d0 + k].copy_(src_view[s0 : s0 + k], non_blocking=True)
                if n:
                    self._device[layer].index_copy_(1, index, staged[layer])
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(stream)
                events.append(event)
        return CudaLoadTicket(self.poller, events, (staging, index, index_cpu))

    async def _fail(self, stream: torch.cuda.Stream, exc: RuntimeError) -> NoReturn:
        """Enqueueing failed part-way (e.g. out of memory for staging): wait until what was
        enqueued has run, so the caller may free the pages, then report the error."""
        self.stats.failed += 1
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record(stream)
        await self._settle(event, shielded=True)
        raise TransferError(f"enqueueing a copy failed: {exc}") from exc

    async def _settle(self, event: torch.cuda.Event, *, shielded: bool = False) -> None:
        """Await ``event``; if cancelled, still wait for it (shielded) before re-raising."""
        if not shielded:
            try:
                await self.poller.wait(event)
                return
            except anyio.get_cancelled_exc_class():
                self.stats.cancelled += 1
                with anyio.CancelScope(shield=True):
                    await self._wait_even_if_closed(event)
                raise
        with anyio.CancelScope(shield=True):
            await self._wait_even_if_closed(event)

    async def _wait_even_if_closed(self, event: torch.cuda.Event) -> None:
        try:
            await self.poller.wait(event)
        except ClosedError:
            # The poller's owner is gone; blocking here is the lesser evil than freeing memory
            # a copy still writes into.
            event.synchronize()
