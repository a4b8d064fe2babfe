"""Real parts for transition tests: a radix tree, a host pool, a memory L3, an event hub."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import torch

from hicache_async import HostLayout, KVLayout
from hicache_async.events import EventHub, EventStream
from hicache_async.memory import HostKVPool
from hicache_async.metrics import Counters
from hicache_async.radix import RadixTree
from hicache_async.storage import HiCacheStorage, HiCacheStorageConfig, create_storage
from hicache_async.tiers.host import HostTier

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", page_size=4)


@dataclass
class Rig:
    tree: RadixTree
    pool: HostKVPool
    host: HostTier
    storage: HiCacheStorage
    counters: Counters
    hub: EventHub
    events: EventStream

    def fill(self, slots: torch.Tensor, value: int) -> None:
        """Write a recognisable byte pattern into the host pages of ``slots``."""
        pages = slots[:: LAYOUT.page_size] // LAYOUT.page_size
        for i, page in enumerate(pages.tolist()):
            data = torch.full((LAYOUT.bytes_per_page,), (value + i) % 251, dtype=torch.uint8)
            self.pool.set_from_flat_data_page(page, data)

    def page_bytes(self, slots: torch.Tensor) -> list[int]:
        pages = slots[:: LAYOUT.page_size] // LAYOUT.page_size
        return [int(self.pool.get_data_page(p)[0]) for p in pages.tolist()]


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    tree = RadixTree(page_size=LAYOUT.page_size)
    pool = HostKVPool(LAYOUT, 32, HostLayout.PAGE_FIRST)
    hub = EventHub()
    storage = create_storage("memory", HiCacheStorageConfig(model_name="t"))
    storage.register_mem_pool_host(pool)
    async with storage, hub.subscribe() as events:
        yield Rig(tree, pool, HostTier(tree, pool, hub), storage, Counters(), hub, events)
    tree.check()
