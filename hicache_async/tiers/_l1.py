"""Building L1: the device pool, and (with an L2) the poller and the transfer engine."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from anyio.abc import TaskGroup

from hicache_async.config import HiCacheConfig
from hicache_async.memory.allocator import PagedAllocator
from hicache_async.memory.device_pool import DeviceKVPool
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.transfer import EventPoller, TransferEngine, make_transfer_engine

__all__ = ["L1", "EngineWrapper", "build_l1"]


@dataclass
class L1:
    """The device tier's parts. ``engine`` is None without an L2 to copy to."""

    pool: DeviceKVPool
    poller: EventPoller
    engine: TransferEngine | None

    @property
    def allocator(self) -> PagedAllocator:
        return self.pool.allocator

    async def start(self, tg: TaskGroup) -> None:
        """Start the poller in the cache's task group."""
        await tg.start(self.poller.run)


EngineWrapper = Callable[[TransferEngine], TransferEngine]
"""Wraps the transfer engine the tiers copy through (fault injection, tracing)."""


def build_l1(
    config: HiCacheConfig,
    device: torch.device,
    host: HostKVPool | None,
    wrap_engine: EngineWrapper | None = None,
) -> L1:
    """The device pool of ``config`` on ``device``, and its engine to ``host`` (passed through
    ``wrap_engine`` when given)."""
    pool = DeviceKVPool(config.layout, config.device_pages, device=device)
    poller = EventPoller()
    engine = None
    if host is not None:
        engine = make_transfer_engine(pool, host, poller, io_backend=config.io_backend)
        if wrap_engine is not None:
            engine = wrap_engine(engine)
    return L1(pool, poller, engine)
