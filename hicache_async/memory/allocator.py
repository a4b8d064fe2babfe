"""Paged allocation of pool pages, with double-free and foreign-index checks.

A pool of ``capacity`` pages hands out page indices; token slots are ``page * page_size +
offset`` (see :mod:`hicache_async.memory.slots`). The allocator is touched only on the event
loop thread (house rule 1), so it has no lock.

SGLang's allocators corrupted their free list silently when a page was freed twice; here every
free is checked against an ownership bitmap first, so the error surfaces at the faulty call.
"""

from __future__ import annotations

import torch

from hicache_async.errors import IndexStateError

__all__ = ["PagedAllocator"]

_ONE = torch.tensor(1, dtype=torch.int32)
_MINUS_ONE = torch.tensor(-1, dtype=torch.int32)


class PagedAllocator:
    """Hands out page indices in ``[first_page, capacity)``.

    ``alloc`` costs O(pages allocated). Frees are validated at once and queued, then merged
    into the free list in one concatenation when an allocation needs them: that is the batch
    free, so freeing many small runs (an eviction pass) costs one merge, not one per run.
    With ``debug=True`` each page carries an owner count: ``share`` adds an owner and a page
    returns to the free list only when its last owner frees it.
    """

    def __init__(self, capacity: int, *, first_page: int = 0, debug: bool = False) -> None:
        if capacity <= first_page or first_page < 0:
            raise ValueError(f"capacity {capacity} leaves no pages after first_page {first_page}")
        self.capacity = capacity
        self.first_page = first_page
        self.debug = debug
        self._free = torch.arange(first_page, capacity, dtype=torch.int64)
        self._free_count = self._free.numel()  # pages in ``_free`` (not counting pending)
        self._pending: list[torch.Tensor] = []
        # Pages free right now, frees not yet merged included: a plain attribute, because
        # every request reads it.
        self.available = self._free_count
        # Owners per page: 0 free, 1 allocated; above 1 only through share() in debug mode.
        self._owners = torch.zeros(capacity, dtype=torch.int32)

    @property
    def usable(self) -> int:
        """Pages this allocator can hand out at all."""
        return self.capacity - self.first_page

    @property
    def used(self) -> int:
        """Pages allocated right now."""
        return self.usable - self.available

    def alloc(self, n_pages: int) -> torch.Tensor | None:
        """``n_pages`` page indices (int64), or ``None`` when fewer are free."""
        if n_pages < 0:
            raise ValueError(f"cannot allocate {n_pages} pages")
        if n_pages > self._free_count:
            if n_pages > self.available:
                return None
            self._merge_pending()
        pages = self._free[:n_pages]
        self._free = self._free[n_pages:]
        self._free_count -= n_pages
        self.available -= n_pages
        self._owners[pages] = 1
        return pages

    def free(self, pages: torch.Tensor) -> None:
        """Return ``pages``; a foreign index, a repeated index or a page not allocated raises
        :class:`IndexStateError` before anything changes."""
        pages = self._check(pages)
        if pages.numel() == 0:
            return
        if self.debug and pages.numel() > 1 and torch.unique(pages).numel() != pages.numel():
            raise IndexStateError("free() got the same page more than once")  # shared pages
        # One scatter-add takes an owner from every page, once per occurrence: a page freed
        # more often than it has owners (double free, or repeated in this call) goes below
        # zero. Cheaper than checking first (no sort for duplicates); undone on error.
        owners = self._owners
        owners.index_put_((pages,), _MINUS_ONE, accumulate=True)
        after = owners[pages]
        if bool((after < 0).any()):
            owners.index_put_((pages,), _ONE, accumulate=True)
            before = owners[pages]
            if bool((before <= 0).any()):
                bad = pages[before <= 0][:8].tolist()
                raise IndexStateError(f"double free: pages {bad} are not allocated")
            raise IndexStateError("free() got the same page more than once")
        released = pages[after == 0] if self.debug else pages
        if released.numel():
            self._pending.append(released.clone())
            self.available += released.numel()

    def share(self, pages: torch.Tensor) -> None:
        """Debug mode: add an owner to allocated ``pages`` (each owner frees once)."""
        if not self.debug:
            raise IndexStateError("share() needs PagedAllocator(debug=True)")
        pages = self._check(pages)
        if bool((self._owners[pages] <= 0).any()):
            raise IndexStateError("share() of a page that is not allocated")
        self._owners.index_add_(0, pages, torch.ones_like(pages, dtype=torch.int32))

    def owners(self, pages: torch.Tensor) -> torch.Tensor:
        """Owner counts of ``pages`` (0 = free)."""
        return self._owners[self._check(pages)].clone()

    def is_allocated(self, pages: torch.Tensor) -> bool:
        """Whether every page in ``pages`` is allocated."""
        return bool((self._owners[self._check(pages)] > 0).all())

    def clear(self) -> None:
        """Free every page (the pool's contents become garbage)."""
        self._free = torch.arange(self.first_page, self.capacity, dtype=torch.int64)
        self._free_count = self.available = self._free.numel()
        self._pending.clear()
        self._owners.zero_()

    def _merge_pending(self) -> None:
        if self._pending:
            self._free = torch.cat([self._free, *self._pending])
            self._free_count = self._free.numel()
            self._pending.clear()

    def _check(self, pages: torch.Tensor) -> torch.Tensor:
        if not isinstance(pages, torch.Tensor) or pages.dtype != torch.int64 or pages.dim() != 1:
            raise IndexStateError("page indices must be a 1-D int64 tensor")
        pages = pages.cpu()
        if pages.numel():
            low, high = torch.aminmax(pages)
            if int(low) < self.first_page or int(high) >= self.capacity:
                raise IndexStateError(
                    f"foreign page index: pages must lie in [{self.first_page}, {self.capacity})"
                )
        return pages

    def __repr__(self) -> str:
        return f"PagedAllocator(capacity={self.capacity}, available={self.available})"
