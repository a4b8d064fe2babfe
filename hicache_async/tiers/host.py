"""L2 page reservation with eviction, and the KV events of what L2 evicts.

Every transition that needs host pages (backup, prefetch) reserves them here, synchronously on
the loop: free pages first, then the tree's unlocked host-only leaves in policy order. A
reservation that cannot be met takes nothing (no partial allocation leaks).
"""

from __future__ import annotations

from hicache_async.events import EventHub, StorageMedium
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.radix import RadixTree
from hicache_async.tiers._events import removed_event
from hicache_async.tiers._paged import PagedTier

__all__ = ["HostTier"]


class HostTier(PagedTier):
    """Reserves and frees L2 pages for the transitions."""

    def __init__(
        self, tree: RadixTree, pool: HostKVPool, hub: EventHub, *, headroom: float = 0.0
    ) -> None:
        super().__init__(pool.allocator, pool.page_size, headroom)
        self.tree, self.pool, self.hub = tree, pool, hub

    def evict(self, n_pages: int, *, emit: bool = True) -> int:
        """Evict up to ``n_pages`` host pages; returns how many were freed."""
        result = self.tree.evict_host(n_pages)
        self.free_pages(result.host_pages)
        if emit and result.removed and self.hub.active:
            self.hub.emit([removed_event(self.tree, result.removed, StorageMedium.CPU_PINNED)])
        self.evicted_pages += result.num_pages
        return result.num_pages
