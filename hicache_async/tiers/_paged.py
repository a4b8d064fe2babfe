"""What the L1 and L2 tiers share: reserving whole pages, evicting first when short."""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from hicache_async.memory.allocator import PagedAllocator
from hicache_async.memory.slots import pages_to_slots, slots_to_pages

__all__ = ["PagedTier", "leading"]


def leading(flags: list[bool]) -> int:
    """How many leading entries are true (a page counts only after its whole prefix)."""
    return next((i for i, flag in enumerate(flags) if not flag), len(flags))


class PagedTier(abc.ABC):
    """Reserves token slots of whole pages; a reservation that cannot be met takes nothing.

    A reservation that finds the tier short evicts the shortfall plus ``headroom`` pages (a
    fraction of the tier): an eviction pass costs tens of microseconds whatever its size (heap
    pops, a split, a free with its checks, events), so the next reservations find room without
    one. What it evicts early is what the policy would evict next anyway.
    """

    def __init__(self, allocator: PagedAllocator, page_size: int, headroom: float = 0.0) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.headroom = int(allocator.usable * headroom)  # pages
        self.evicted_pages = 0
        self.on_free: Callable[[], None] | None = None  # set while requests wait for room

    def reserve(self, n_pages: int) -> torch.Tensor | None:
        """Token slots of ``n_pages`` pages, evicting as needed; None if impossible."""
        pages = self.reserve_pages(n_pages)
        return None if pages is None else pages_to_slots(pages, self.page_size)

    def reserve_pages(self, n_pages: int) -> torch.Tensor | None:
        """``n_pages`` page indices, evicting as needed; None if impossible."""
        short = n_pages - self.allocator.available
        if short > 0:
            self.evict(short + self.headroom)
        return self.allocator.alloc(n_pages)

    def free(self, slots: torch.Tensor) -> None:
        """Return token slots (whole pages) to the pool."""
        if slots.numel():
            self.allocator.free(slots_to_pages(slots.cpu(), self.page_size))
            if self.on_free is not None:
                self.on_free()

    def free_pages(self, pages: torch.Tensor) -> None:
        """Return int64 page indices to the pool (reserved ones, or what evictions hand back)."""
        if pages.numel():
            self.allocator.free(pages.cpu())
            if self.on_free is not None:
                self.on_free()

    @abc.abstractmethod
    def evict(self, n_pages: int) -> int:
        """Evict up to ``n_pages`` pages of this tier; returns how many were freed."""
