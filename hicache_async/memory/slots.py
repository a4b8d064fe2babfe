"""Conversions between page indices and token slots.

The radix tree and the session API speak token slots (``page * page_size + offset``), as the
model's attention kernels do; allocators and L3 backends speak pages.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hicache_async.errors import LayoutError

__all__ = ["pages_to_slots", "slots_to_pages"]


_OFFSETS: dict[int, np.ndarray[Any, np.dtype[np.int64]]] = {}


def _offsets(page_size: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """``[0, page_size)`` as a row, made once per page size."""
    offsets = _OFFSETS.get(page_size)
    if offsets is None:
        offsets = _OFFSETS[page_size] = np.arange(page_size, dtype=np.int64)[None]
    return offsets


# Index tensors here are small and (for the allocators) on the CPU, where each torch op costs
# microseconds of dispatch; numpy on the same memory costs a fraction of that.


def pages_to_slots(pages: torch.Tensor, page_size: int) -> torch.Tensor:
    """Every token slot of ``pages`` (any integer dtype), page by page (int64)."""
    if page_size == 1:
        return pages.long()  # the same tensor when it is int64 already
    if pages.is_cpu:
        flat = pages.long().numpy()
        return torch.from_numpy((flat[:, None] * page_size + _offsets(page_size)).ravel())
    offsets = torch.arange(page_size, dtype=torch.int64, device=pages.device)
    return (pages.long().unsqueeze(1) * page_size + offsets).reshape(-1)


def slots_to_pages(slots: torch.Tensor, page_size: int) -> torch.Tensor:
    """The pages of page-aligned ``slots`` (whole pages, each in order).

    Raises :class:`LayoutError` when the slots do not cover whole pages in order.
    """
    if slots.dtype != torch.int64 or slots.dim() != 1:
        raise LayoutError(
            f"token slots must be a 1-D int64 tensor, not {slots.dtype} {tuple(slots.shape)}"
        )
    if page_size == 1:
        return slots
    if slots.numel() % page_size:
        raise LayoutError(f"{slots.numel()} token slots are not whole pages of {page_size}")
    if slots.is_cpu:
        rows = slots.numpy().reshape(-1, page_size)
        first = rows[:, 0] // page_size
        if not np.array_equal(rows, first[:, None] * page_size + _offsets(page_size)):
            raise LayoutError("token slots are not whole, in-order pages")
        return torch.from_numpy(first)
    pages = slots[::page_size] // page_size
    if not torch.equal(pages_to_slots(pages, page_size), slots):
        raise LayoutError("token slots are not whole, in-order pages")
    return pages
