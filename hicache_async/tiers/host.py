"""L2 page reservation with eviction, and the KV events of what L2 evicts.

Every transition that needs host pages (backup, prefetch) reserves them here, synchronously on
the loop: free pages first, then the tree's unlocked host-only leaves in policy order. A
reservation that cannot be met takes nothing (no partial allocation leaks).
"""

from __future__ import annotations

import torch

from hicache_async.events import EventHub, StorageMedium
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.memory.slots import pages_to_slots, slots_to_pages
from hicache_async.radix import RadixTree
from hicache_async.tiers._events import removed_event

__all__ = ["HostTier"]


class HostTier:
    """Reserves and frees L2 pages for the transitions."""

    def __init__(self, tree: RadixTree, pool: HostKVPool, hub: EventHub) -> None:
        self.tree, self.pool, self.hub = tree, pool, hub
        self.page_size = pool.page_size
        self.evicted_pages = 0

    def reserve(self, n_pages: int) -> torch.Tensor | None:
        """Token slots of ``n_pages`` host pages, evicting L2 as needed; None if impossible."""
        allocator = self.pool.allocator
        short = n_pages - allocator.available
        if short > 0:
            self.evict(short)
        pages = allocator.alloc(n_pages)
        return None if pages is None else pages_to_slots(pages, self.page_size)

    def evict(self, n_pages: int, *, emit: bool = True) -> int:
        """Evict up to ``n_pages`` host pages; returns how many were freed."""
        result = self.tree.evict_host(n_pages)
        if result.host_indices.numel():
            self.free(result.host_indices)
        if emit and result.removed and self.hub.active:
            self.hub.emit([removed_event(self.tree, result.removed, StorageMedium.CPU_PINNED)])
        self.evicted_pages += result.num_pages
        return result.num_pages

    def free(self, slots: torch.Tensor) -> None:
        """Return host token slots (whole pages) to the pool."""
        if slots.numel():
            self.pool.allocator.free(slots_to_pages(slots, self.page_size))
