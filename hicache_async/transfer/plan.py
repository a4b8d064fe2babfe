"""Copy plans: which pages go where, as coalesced runs or as index tensors.

Both pools are seen through one 4-D view, ``[num_layers, planes, pages, page_elems]``
(:func:`device_pages_view`, :func:`host_pages_view`; the page-first host view is a permuted,
non-contiguous view of the same memory), so one plan copies between any two layouts.

A plan coalesces pages that are consecutive on both sides into runs, each moved by one strided
``copy_`` (one pass over the bytes). When runs are many and short, the per-call overhead would
dominate, so the plan falls back to a gather (``index_select``) and a scatter (``index_copy_``)
on index tensors: two passes, but a constant number of calls. No per-page Python loop either way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hicache_async.memory.device_pool import DeviceKVPool
from hicache_async.memory.host_pool import HostKVPool

__all__ = [
    "MIN_RUN_BYTES",
    "PagePlan",
    "copy_pages",
    "count_runs",
    "device_pages_view",
    "host_pages_view",
    "plan_pages",
]

# Runs at least this large (bytes per call) are worth one copy_ each; below it, index ops.
# Measured on CPU (bench_transfer.py): index_select/index_copy_ along the page dimension of
# these 4-D views move 2-7 GB/s (two passes, strided), a copy_ per 64 KiB+ run ~10 GB/s.
MIN_RUN_BYTES = 32 * 1024
_FEW_RUNS = 8


def device_pages_view(pool: DeviceKVPool) -> torch.Tensor:
    """``pool.kv`` as ``[num_layers, planes, total_pages, page_elems]`` (contiguous)."""
    layers, planes = pool.layout.num_layers, pool.layout.kv_planes
    return pool.kv.view(layers, planes, pool.total_pages, -1)


def host_pages_view(pool: HostKVPool) -> torch.Tensor:
    """``pool.buffer`` as ``[num_layers, planes, num_pages, page_elems]`` (a view, no copy)."""
    layers, planes = pool.layout.num_layers, pool.layout.kv_planes
    if pool.is_page_first:
        return pool.buffer.view(pool.num_pages, layers, planes, -1).permute(1, 2, 0, 3)
    return pool.buffer.view(layers, planes, pool.num_pages, -1)


@dataclass(frozen=True)
class PagePlan:
    """Pages ``src[i]`` -> ``dst[i]``; ``runs`` holds ``(src0, dst0, length)`` when used."""

    src: torch.Tensor
    dst: torch.Tensor
    runs: tuple[tuple[int, int, int], ...] | None

    @property
    def num_pages(self) -> int:
        """Pages the plan moves."""
        return self.src.numel()

    def chunks(self, max_pages: int) -> list[PagePlan]:
        """The plan cut into pieces of at most ``max_pages`` pages, in order."""
        if self.num_pages <= max_pages:
            return [self]
        if self.runs is None:
            return [
                PagePlan(self.src[i : i + max_pages], self.dst[i : i + max_pages], None)
                for i in range(0, self.num_pages, max_pages)
            ]
        out: list[PagePlan] = []
        group: list[tuple[int, int, int]] = []
        start = size = 0
        for s0, d0, n in self.runs:
            offset = 0
            while offset < n:
                take = min(n - offset, max_pages - size)
                group.append((s0 + offset, d0 + offset, take))
                offset += take
                size += take
                if size == max_pages:
                    out.append(self._sub(start, start + size, group))
                    start, size, group = start + size, 0, []
        if group:
            out.append(self._sub(start, start + size, group))
        return out

    def _sub(self, lo: int, hi: int, runs: list[tuple[int, int, int]]) -> PagePlan:
        return PagePlan(self.src[lo:hi], self.dst[lo:hi], tuple(runs))


def count_runs(src: torch.Tensor, dst: torch.Tensor) -> int:
    """How many runs of pages consecutive on both sides ``src -> dst`` has."""
    if src.numel() == 0:
        return 0
    return 1 + int((((src[1:] - src[:-1]) != 1) | ((dst[1:] - dst[:-1]) != 1)).sum())


def plan_pages(src: torch.Tensor, dst: torch.Tensor, bytes_per_page: int) -> PagePlan:
    """Plan moving pages ``src`` to ``dst`` (1-D int64 CPU tensors of equal length).

    ``bytes_per_page`` is what one page moves per copy call; it decides runs vs index ops.
    """
    n = src.numel()
    if n == 0:
        return PagePlan(src, dst, ())
    breaks = ((src[1:] - src[:-1]) != 1) | ((dst[1:] - dst[:-1]) != 1)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), breaks.nonzero().flatten() + 1])
    count = starts.numel()
    if count > _FEW_RUNS and n * bytes_per_page < count * MIN_RUN_BYTES:
        return PagePlan(src, dst, None)
    lengths = torch.diff(starts, append=torch.tensor([n]))
    runs = zip(src[starts].tolist(), dst[starts].tolist(), lengths.tolist(), strict=True)
    return PagePlan(src, dst, tuple(runs))


def copy_pages(
    dst: torch.Tensor, src: torch.Tensor, plan: PagePlan, layers: slice = slice(None)
) -> None:
    """Copy ``plan``'s pages of ``layers`` from view ``src`` into view ``dst`` (same device).

    Blocking; the CPU engine runs it in a worker thread (torch releases the GIL while copying).
    """
    dst, src = dst[layers], src[layers]
    if plan.runs is None:
        dst.index_copy_(2, plan.dst, src.index_select(2, plan.src))
        return
    for s0, d0, n in plan.runs:
        dst[:, :, d0 : d0 + n].copy_(src[:, :, s0 : s0 + n])
