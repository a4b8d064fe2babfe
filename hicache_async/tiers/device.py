"""L1 page reservation with eviction, and the KV events of what L1 evicts.

Eviction demotes unlocked device leaves that have a host copy (they stay matchable from L2)
and removes those that do not. Like :class:`~hicache_async.tiers.host.HostTier`, a reservation
that cannot be met takes nothing.
"""

from __future__ import annotations

from hicache_async.events import EventHub, StorageMedium
from hicache_async.memory.allocator import PagedAllocator
from hicache_async.radix import RadixTree
from hicache_async.tiers._events import removed_event
from hicache_async.tiers._paged import PagedTier

__all__ = ["DeviceTier"]


class DeviceTier(PagedTier):
    """Reserves and frees L1 pages for sessions and loads."""

    def __init__(
        self,
        tree: RadixTree,
        allocator: PagedAllocator,
        page_size: int,
        hub: EventHub,
        *,
        host_allocator: PagedAllocator | None = None,
        headroom: float = 0.0,
        keep_unbacked: bool = False,
    ) -> None:
        super().__init__(allocator, page_size, headroom)
        self.tree, self.hub = tree, hub
        self._host_allocator = host_allocator  # frees host pages of nodes eviction removes
        # write_back: a page with no host copy is never evicted here (it would be lost from
        # every tier); HiCache.ensure_device_room backs such victims up first, then evicts.
        self.keep_unbacked = keep_unbacked

    def evict(self, n_pages: int, *, keep_host: bool = True, emit: bool = True) -> int:
        """Evict up to ``n_pages`` device pages; returns how many were freed. ``keep_host=False``
        (clearing the cache) drops every unlocked page, backed up or not."""
        result = self.tree.evict(
            n_pages, keep_host=keep_host, keep_unbacked=keep_host and self.keep_unbacked
        )
        self.free_pages(result.device_pages)
        if result.host_pages.numel():
            assert self._host_allocator is not None, "removed host copies without an L2"
            self._host_allocator.free(result.host_pages.cpu())
        if emit and self.hub.active and (result.demoted or result.removed):
            gone = result.demoted + result.removed_device
            events = [removed_event(self.tree, gone, StorageMedium.GPU)]
            if result.removed_host:
                events.append(
                    removed_event(self.tree, result.removed_host, StorageMedium.CPU_PINNED)
                )
            self.hub.emit(events)
        self.evicted_pages += result.num_pages
        return result.num_pages
