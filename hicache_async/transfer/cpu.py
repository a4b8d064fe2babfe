"""The CPU transfer engine: L1 and L2 are both host memory; copies run in worker threads.

Each copy runs through ``anyio.to_thread.run_sync`` under a :class:`anyio.CapacityLimiter`,
so the loop keeps running while bytes move (torch releases the GIL inside ``copy_`` and the
index ops). Backups are cut into chunks of at most ``chunk_bytes`` and loads into groups of
layers of at least ``min_layer_group_bytes`` (a layer is ready when its group is), one thread
call each: every call costs a thread hop and a fork/join of torch's intra-op threads, so the
pieces are large. A cancelled caller waits for the piece in flight (``to_thread`` does not
abandon its thread), then stops, so no thread writes after ``backup``/``load`` has ended.
Copies of at most ``inline_bytes`` run on the loop: a thread hop costs more than they do.

``io_backend``: ``direct`` (torch index ops) is what runs; ``kernel`` and ``auto`` map to it on
CPU, where no fused kernel exists.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import anyio
import anyio.lowlevel
import torch

from hicache_async.errors import LayoutError, TransferError
from hicache_async.memory.device_pool import DeviceKVPool
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.transfer.base import LoadTicket, TransferEngine
from hicache_async.transfer.plan import (
    copy_pages,
    count_runs,
    device_pages_view,
    host_pages_view,
    plan_pages,
)
from hicache_async.transfer.poller import raise_single

__all__ = ["CpuTransferEngine"]


class _CpuLoadTicket(LoadTicket):
    """Layers become ready in order; one event per change wakes every waiter."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(num_layers)
        self._ready = 0
        self._error: BaseException | None = None
        self._changed = anyio.Event()

    def is_layer_ready(self, layer: int) -> bool:
        return layer < self._ready

    async def layer_ready(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise LayoutError(f"layer {layer} is outside [0, {self.num_layers})")
        while self._ready <= layer:
            if self._error is not None:
                await anyio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller sees that
                raise TransferError(f"layer {layer} never arrived: {self._error}") from self._error
            await self._changed.wait()

    def _advance(self, ready: int) -> None:
        self._ready = ready
        self._changed.set()
        self._changed = anyio.Event()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._changed.set()


class CpuTransferEngine(TransferEngine):
    """Copies between CPU pools in worker threads, at most ``threads`` at a time."""

    def __init__(
        self,
        device_pool: DeviceKVPool,
        host_pool: HostKVPool,
        *,
        threads: int = 2,
        chunk_bytes: int = 128 << 20,
        min_layer_group_bytes: int = 64 << 20,
        inline_bytes: int = 256 << 10,
        run_call_bytes: int = 2 << 20,
    ) -> None:
        super().__init__(device_pool, host_pool)
        if device_pool.device.type != "cpu":
            raise LayoutError(
                f"CpuTransferEngine needs a CPU device pool, not {device_pool.device}"
            )
        if threads <= 0 or chunk_bytes <= 0:
            raise ValueError("threads and chunk_bytes must be positive")
        self.limiter = anyio.CapacityLimiter(threads)
        self.chunk_bytes = chunk_bytes
        self.min_layer_group_bytes = min_layer_group_bytes
        self.inline_bytes = inline_bytes
        self.run_call_bytes = run_call_bytes
        self._device = device_pages_view(device_pool)
        self._host = host_pages_view(host_pool)

    async def _backup(self, device: torch.Tensor, host: torch.Tensor) -> None:
        self.stats.backups += 1
        self.stats.backup_bytes += host.numel() * self.layout.bytes_per_page
        plan = plan_pages(device, host, self.layout.bytes_per_page)
        max_pages = max(1, self.chunk_bytes // self.layout.bytes_per_page)
        for chunk in plan.chunks(max_pages):
            copy = functools.partial(copy_pages, self._host, self._device, chunk)
            await self._in_thread(copy, chunk.num_pages * self.layout.bytes_per_page)

    @asynccontextmanager
    async def _run_load(self, src: torch.Tensor, dst: torch.Tensor) -> AsyncIterator[LoadTicket]:
        ticket = _CpuLoadTicket(self.layout.num_layers)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._copy_layers, ticket, src, dst)
                yield ticket
        except BaseExceptionGroup as group:
            # _copy_layers raises only cancellation, so the group wraps what the block raised.
            raise_single(group)

    async def _copy_layers(
        self, ticket: _CpuLoadTicket, src: torch.Tensor, dst: torch.Tensor
    ) -> None:
        group = self._layer_group(src, dst)
        per_layer = self.layout.bytes_per_page_per_layer * src.numel()
        plan = plan_pages(src, dst, self.layout.bytes_per_page_per_layer * group)
        try:
            for start in range(0, self.layout.num_layers, group):
                layers = slice(start, min(start + group, self.layout.num_layers))
                copy = functools.partial(copy_pages, self._device, self._host, plan, layers)
                await self._in_thread(copy, (layers.stop - start) * per_layer)
                ticket._advance(layers.stop)
        except TransferError as exc:  # the ticket reports it to the load's owner
            ticket._fail(exc)
        except BaseException:  # cancelled (the block left early): no thread runs now
            ticket._fail(TransferError("the load was cancelled"))
            raise

    def _layer_group(self, src: torch.Tensor, dst: torch.Tensor) -> int:
        """Layers per thread call: at least ``min_layer_group_bytes`` per call, and enough
        that each run copied moves ``run_call_bytes`` (scattered pages make short runs, and
        a ``copy_`` call costs microseconds whatever it moves)."""
        per_page = self.layout.bytes_per_page_per_layer
        by_bytes = -(-self.min_layer_group_bytes // max(per_page * src.numel(), 1))
        runs = max(count_runs(src, dst), 1)
        by_runs = -(-self.run_call_bytes * runs // max(per_page * src.numel(), 1))
        return max(1, min(self.layout.num_layers, max(by_bytes, by_runs)))

    async def _in_thread(self, copy: Callable[[], None], nbytes: int) -> None:
        try:
            if nbytes <= self.inline_bytes:  # a thread hop costs more than copying this much
                copy()
                await anyio.lowlevel.checkpoint()
            else:
                await anyio.to_thread.run_sync(copy, limiter=self.limiter)
        except anyio.get_cancelled_exc_class():
            self.stats.cancelled += 1
            raise
        except Exception as exc:
            self.stats.failed += 1
            raise TransferError(f"a host copy failed: {exc}") from exc
