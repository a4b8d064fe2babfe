"""Paged allocation of pool pages, with double-free and foreign-index checks.

A pool of ``capacity`` pages hands out page indices; token slots are ``page * page_size +
offset`` (see :mod:`hicache_async.memory.slots`). The allocator is touched only on the event
loop thread (house rule 1), so it has no lock.

SGLang's allocators corrupted their free list silently when a page was freed twice; here every
free is checked against an ownership bitmap first, so the error surfaces at the faulty call.

The free list and the owner counts are numpy arrays: every request allocates and frees a few
pages, and on index arrays this small a numpy operation costs a fraction of a torch one. Page
indices come in and go out as int64 CPU tensors sharing memory with them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hicache_async.errors import IndexStateError

__all__ = ["PagedAllocator"]

_Pages = np.ndarray[Any, np.dtype[np.int64]]


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
        self._free: _Pages = np.arange(first_page, capacity, dtype=np.int64)
        self._pending: list[_Pages] = []
        # Pages free right now, frees not yet merged included: a plain attribute, because
        # every request reads it.
        self.available = len(self._free)
        # Owners per page: 0 free, 1 allocated; above 1 only through share() in debug mode.
        self._owners = np.zeros(capacity, dtype=np.int32)
        self._mark_buf = -np.arange(1, 65, dtype=np.int32)  # see free()

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
        if n_pages > len(self._free):
            if n_pages > self.available:
                return None
            self._merge_pending()
        pages = self._free[:n_pages]
        self._free = self._free[n_pages:]
        self.available -= n_pages
        self._owners[pages] = 1
        return torch.from_numpy(pages)

    def free(self, pages: torch.Tensor) -> None:
        """Return ``pages``; a foreign index, a repeated index or a page not allocated raises
        :class:`IndexStateError` before anything changes."""
        p = self._check(pages)
        n = len(p)
        if not n:
            return
        if self.debug:
            self._free_shared(p)
            return
        owners = self._owners
        if not owners[p].all():
            bad = p[owners[p] <= 0][:8].tolist()
            raise IndexStateError(f"double free: pages {bad} are not allocated")
        if n > 1:
            # A page listed twice: stamp each position with its own mark; a repeated page
            # keeps only its last mark, so an earlier position reads back another. Four
            # gathers and scatters: cheaper than a sort or ``ufunc.at`` on these sizes.
            marks = self._marks(n)
            owners[p] = marks
            if not np.array_equal(owners[p], marks):
                owners[p] = 1
                raise IndexStateError("free() got the same page more than once")
        owners[p] = 0
        self._pending.append(p.copy())  # the caller keeps its tensor
        self.available += n

    def _free_shared(self, p: _Pages) -> None:
        """Debug mode's free: one owner less per page; a page returns at its last owner."""
        if len(p) > 1 and len(np.unique(p)) != len(p):
            raise IndexStateError("free() got the same page more than once")  # shared pages
        owners = self._owners
        np.subtract.at(owners, p, 1)
        after = owners[p]
        if (after < 0).any():
            np.add.at(owners, p, 1)
            bad = p[after < 0][:8].tolist()
            raise IndexStateError(f"double free: pages {bad} are not allocated")
        released = p[after == 0]
        if len(released):
            self._pending.append(released)
            self.available += len(released)

    def _marks(self, n: int) -> np.ndarray[Any, np.dtype[np.int32]]:
        """``-1, -2, ..., -n``: distinct marks no owner count takes (grown, never shrunk)."""
        if len(self._mark_buf) < n:
            self._mark_buf = -np.arange(1, max(n, 2 * len(self._mark_buf)) + 1, dtype=np.int32)
        return self._mark_buf[:n]

    def share(self, pages: torch.Tensor) -> None:
        """Debug mode: add an owner to allocated ``pages`` (each owner frees once)."""
        if not self.debug:
            raise IndexStateError("share() needs PagedAllocator(debug=True)")
        p = self._check(pages)
        if (self._owners[p] <= 0).any():
            raise IndexStateError("share() of a page that is not allocated")
        np.add.at(self._owners, p, 1)

    def owners(self, pages: torch.Tensor) -> torch.Tensor:
        """Owner counts of ``pages`` (0 = free)."""
        return torch.from_numpy(self._owners[self._check(pages)])

    def is_allocated(self, pages: torch.Tensor) -> bool:
        """Whether every page in ``pages`` is allocated."""
        return bool((self._owners[self._check(pages)] > 0).all())

    def clear(self) -> None:
        """Free every page (the pool's contents become garbage)."""
        self._free = np.arange(self.first_page, self.capacity, dtype=np.int64)
        self.available = len(self._free)
        self._pending.clear()
        self._owners[:] = 0

    def _merge_pending(self) -> None:
        if self._pending:
            self._free = np.concatenate([self._free, *self._pending])
            self._pending.clear()

    def _check(self, pages: torch.Tensor) -> _Pages:
        if not isinstance(pages, torch.Tensor) or pages.dtype != torch.int64 or pages.dim() != 1:
            raise IndexStateError("page indices must be a 1-D int64 tensor")
        p: _Pages = pages.numpy() if pages.is_cpu else pages.cpu().numpy()
        if len(p) and (p.min() < self.first_page or p.max() >= self.capacity):
            raise IndexStateError(
                f"foreign page index: pages must lie in [{self.first_page}, {self.capacity})"
            )
        return p

    def __repr__(self) -> str:
        return f"PagedAllocator(capacity={self.capacity}, available={self.available})"
