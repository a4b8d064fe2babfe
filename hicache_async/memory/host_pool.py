"""The L2 host KV pool: pinned host memory in a layer-first or page-first byte order.

Whatever the host layout, a page has one **canonical byte order**: layer by layer, and within
a layer K then V (MLA: the one latent plane), each ``[page_size, heads, head_dim]``. That is the
page-first memory order, so a page-first page is one contiguous run; a layer-first page is
``num_layers * planes`` runs whose concatenation is the same bytes. L3 pages are stored in the
canonical order, so servers with different host layouts share them.

Storage backends read and write pages through :meth:`HostKVPool.page_segments`: writable
``memoryview`` objects over the pool itself (no copies), which ``os.preadv`` / ``os.pwritev``
and socket APIs take directly.
"""

from __future__ import annotations

import torch

from hicache_async.config import HostLayout
from hicache_async.errors import IndexStateError, LayoutError
from hicache_async.layout import KVLayout
from hicache_async.memory.allocator import PagedAllocator

__all__ = ["HostKVPool"]


class HostKVPool:
    """``num_pages`` pages of KV on the host, with an allocator for them.

    ``buffer`` has the layout's dtype and shape
    ``[num_layers, planes, num_pages * page_size, heads, head_dim]`` for ``layer_first`` and
    ``[num_pages, num_layers, planes, page_size, heads, head_dim]`` for the page-first layouts
    (``page_first_direct`` has the same bytes; transfer engines move its pages whole).
    Memory is pinned when CUDA is available, unless ``pin_memory`` says otherwise.
    """

    def __init__(
        self,
        layout: KVLayout,
        num_pages: int,
        host_layout: HostLayout = HostLayout.PAGE_FIRST,
        *,
        pin_memory: bool | None = None,
        debug: bool = False,
    ) -> None:
        if num_pages <= 0:
            raise LayoutError(f"a host pool needs at least one page, not {num_pages}")
        self.layout = layout
        self.host_layout = HostLayout(host_layout)
        self.num_pages = num_pages
        self.page_size = layout.page_size
        self.bytes_per_page = layout.bytes_per_page
        self.pinned = torch.cuda.is_available() if pin_memory is None else pin_memory
        planes, heads, dim = layout.kv_planes, layout.num_kv_heads, layout.head_dim
        shape: tuple[int, ...]
        if self.is_page_first:
            shape = (num_pages, layout.num_layers, planes, self.page_size, heads, dim)
        else:
            shape = (layout.num_layers, planes, num_pages * self.page_size, heads, dim)
        self.buffer = torch.empty(shape, dtype=layout.dtype, pin_memory=self.pinned)
        self.allocator = PagedAllocator(num_pages, debug=debug)
        # One flat byte view of the whole pool, as a tensor and as a writable memoryview,
        # from which page views are sliced without copies.
        self._flat = self.buffer.view(-1).view(torch.uint8)
        self._bytes: memoryview = self._flat.numpy().data
        # layer_first: where each (layer, plane) run of page 0 starts, in canonical order.
        seg = layout.bytes_per_page_per_layer // planes
        plane_stride = num_pages * seg
        self._segment_bytes = seg
        self._segment_starts = [
            (layer * planes + plane) * plane_stride
            for layer in range(layout.num_layers)
            for plane in range(planes)
        ]

    @property
    def is_page_first(self) -> bool:
        """Whether each page is one contiguous run of bytes."""
        return self.host_layout is not HostLayout.LAYER_FIRST

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds."""
        return self.num_pages * self.bytes_per_page

    def page_segments(self, page: int) -> list[memoryview]:
        """Writable views of ``page``'s bytes in canonical order, over the pool itself.

        One view for the page-first layouts; ``num_layers * planes`` views for layer-first.
        """
        self._check_page(page)
        if self.is_page_first:
            start = page * self.bytes_per_page
            return [self._bytes[start : start + self.bytes_per_page]]
        seg = self._segment_bytes
        offset = page * seg
        return [
            self._bytes[start + offset : start + offset + seg] for start in self._segment_starts
        ]

    def get_data_page(self, page: int) -> torch.Tensor:
        """``page`` as one flat ``uint8`` tensor in canonical order.

        A view of the pool for the page-first layouts; a copy for layer-first.
        """
        self._check_page(page)
        if self.is_page_first:
            start = page * self.bytes_per_page
            return self._flat[start : start + self.bytes_per_page]
        seg, offset = self._segment_bytes, page * self._segment_bytes
        return torch.cat([self._flat[s + offset : s + offset + seg] for s in self._segment_starts])

    def set_from_flat_data_page(self, page: int, data: torch.Tensor) -> None:
        """Write ``page`` from one flat buffer in canonical order (any dtype, right byte count)."""
        self._check_page(page)
        flat = data.reshape(-1).view(torch.uint8) if data.dtype != torch.uint8 else data.reshape(-1)
        if flat.numel() != self.bytes_per_page:
            raise LayoutError(
                f"a page of this layout is {self.bytes_per_page} bytes, not {flat.numel()}"
            )
        flat = flat.cpu()
        if self.is_page_first:
            start = page * self.bytes_per_page
            self._flat[start : start + self.bytes_per_page].copy_(flat)
            return
        seg, offset = self._segment_bytes, page * self._segment_bytes
        for i, start in enumerate(self._segment_starts):
            self._flat[start + offset : start + offset + seg].copy_(flat[i * seg : (i + 1) * seg])

    def _check_page(self, page: int) -> None:
        if not 0 <= page < self.num_pages:
            raise IndexStateError(f"host page {page} is outside the pool [0, {self.num_pages})")

    def __repr__(self) -> str:
        return (
            f"HostKVPool(pages={self.num_pages}, layout={self.host_layout.value}, "
            f"page_bytes={self.bytes_per_page}, pinned={self.pinned})"
        )
