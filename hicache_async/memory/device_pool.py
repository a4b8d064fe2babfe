"""The L1 device KV pool: the buffers the model's attention reads and writes.

All layers live in one tensor ``kv`` shaped ``[num_layers, planes, num_tokens, heads, head_dim]``
(planes: K and V for MHA, the one latent for MLA). ``get_key_buffer(layer)`` and friends hand
out ``[num_tokens, heads, head_dim]`` views of it, the per-layer shape SGLang's attention
backends expect; one allocation lets the transfer engines move a page of every layer with one
strided copy.

Page 0 is padding: slot 0 is the dummy target padded batch entries write to, so the allocator
starts at page 1 and ``num_pages`` usable pages need ``num_pages + 1`` pages of memory.
Token slots (int64, ``page * page_size + offset``) are the public currency.
"""

from __future__ import annotations

import torch

from hicache_async.errors import LayoutError
from hicache_async.layout import KVLayout, dtype_name
from hicache_async.memory.allocator import PagedAllocator
from hicache_async.memory.slots import pages_to_slots, slots_to_pages

__all__ = ["DeviceKVPool"]


class DeviceKVPool:
    """``num_pages`` usable pages of KV on ``device`` (``cuda`` when present, else ``cpu``)."""

    def __init__(
        self,
        layout: KVLayout,
        num_pages: int,
        *,
        device: torch.device | str | None = None,
        debug: bool = False,
    ) -> None:
        if num_pages <= 0:
            raise LayoutError(f"a device pool needs at least one usable page, not {num_pages}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.layout = layout
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            # Tensors report "cuda:N": compare devices with the index filled in.
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.page_size = layout.page_size
        self.num_pages = num_pages
        self.total_pages = num_pages + 1  # page 0 is padding
        self.num_tokens = self.total_pages * self.page_size
        self.kv = torch.zeros(
            (
                layout.num_layers,
                layout.kv_planes,
                self.num_tokens,
                layout.num_kv_heads,
                layout.head_dim,
            ),
            dtype=layout.dtype,
            device=self.device,
        )
        self.debug = debug
        self.allocator = PagedAllocator(self.total_pages, first_page=1, debug=debug)

    @property
    def is_mla(self) -> bool:
        """Whether the pool holds one latent plane per layer (MLA) instead of K and V."""
        return self.layout.use_mla

    @property
    def nbytes(self) -> int:
        """Bytes the pool holds, padding page included."""
        return self.kv.numel() * self.kv.element_size()

    def get_key_buffer(self, layer: int) -> torch.Tensor:
        """``layer``'s keys (MLA: the latent), ``[num_tokens, heads, head_dim]``."""
        return self.kv[self._check_layer(layer), 0]

    def get_value_buffer(self, layer: int) -> torch.Tensor:
        """``layer``'s values; MLA has none (the latent holds both), so that is an error."""
        if self.is_mla:
            raise LayoutError(
                "an MLA pool has no value buffer; read the latent with get_key_buffer"
            )
        return self.kv[self._check_layer(layer), 1]

    def get_kv_buffer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(keys, values)`` of ``layer``; for MLA both are the latent buffer (as SGLang)."""
        keys = self.get_key_buffer(layer)
        return (keys, keys) if self.is_mla else (keys, self.kv[layer, 1])

    def set_kv_buffer(
        self, layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None
    ) -> None:
        """Write ``k`` and ``v`` (each ``(n, num_kv_heads, head_dim)``) at token slots ``loc``.

        MLA pools take the latent as ``k`` and no ``v``. Slots are range-checked on CPU, and on
        CUDA with ``debug=True`` (the check costs a device sync there).
        """
        layer = self._check_layer(layer)
        loc = self._check_slots(loc)
        self._check_rows(k, "k", loc.numel())
        if self.is_mla:
            if v is not None:
                raise LayoutError("an MLA pool stores one latent per token: pass it as k, v=None")
            self.kv[layer, 0].index_copy_(0, loc, k)
            return
        if v is None:
            raise LayoutError("an MHA pool needs both k and v")
        self._check_rows(v, "v", loc.numel())
        self.kv[layer, 0].index_copy_(0, loc, k)
        self.kv[layer, 1].index_copy_(0, loc, v)

    def alloc_slots(self, num_tokens: int) -> torch.Tensor | None:
        """Token slots of whole fresh pages covering ``num_tokens`` (on the pool's device)."""
        pages = self.allocator.alloc(-(-num_tokens // self.page_size))
        if pages is None:
            return None
        return pages_to_slots(pages, self.page_size).to(self.device)

    def free_slots(self, slots: torch.Tensor) -> None:
        """Free the whole pages that page-aligned ``slots`` cover."""
        self.allocator.free(slots_to_pages(slots.cpu(), self.page_size))

    def _check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.layout.num_layers:
            raise LayoutError(f"layer {layer} is outside [0, {self.layout.num_layers})")
        return layer

    def _check_slots(self, loc: torch.Tensor) -> torch.Tensor:
        if not isinstance(loc, torch.Tensor) or loc.dim() != 1 or loc.dtype != torch.int64:
            raise LayoutError("token slots must be a 1-D int64 tensor")
        if loc.device != self.device:
            raise LayoutError(f"token slots are on {loc.device}; the pool is on {self.device}")
        # On CUDA the range check would sync the device once per layer; only debug pays it.
        check_range = self.device.type == "cpu" or self.debug
        if (
            check_range
            and loc.numel()
            and (int(loc.min()) < 0 or int(loc.max()) >= self.num_tokens)
        ):
            raise LayoutError(f"token slots must lie in [0, {self.num_tokens})")
        return loc

    def _check_rows(self, t: torch.Tensor, name: str, n: int) -> None:
        want = (n, self.layout.num_kv_heads, self.layout.head_dim)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise LayoutError(
                f"{name} must be shaped {want} (n, num_kv_heads, head_dim), not {got}"
            )
        if t.dtype != self.layout.dtype:
            raise LayoutError(
                f"{name} is {dtype_name(t.dtype)}; the pool stores {dtype_name(self.layout.dtype)}"
            )
        if t.device != self.device:
            raise LayoutError(f"{name} is on {t.device}; the pool is on {self.device}")

    def __repr__(self) -> str:
        return (
            f"DeviceKVPool(pages={self.num_pages}, device={self.device}, "
            f"page_bytes={self.layout.bytes_per_page}, mla={self.is_mla})"
        )
