"""Helpers for transfer tests: pools with random bytes, slot allocation, bitwise compares."""

from __future__ import annotations

import torch

from hicache_async import KVLayout
from hicache_async.memory import DeviceKVPool, HostKVPool, pages_to_slots

MHA = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, dtype="bfloat16", page_size=4)
MLA = KVLayout(num_layers=3, use_mla=True, kv_lora_rank=6, qk_rope_head_dim=2, page_size=2)


def randomize(t: torch.Tensor, seed: int) -> None:
    """Fill ``t`` with random bytes (any dtype; compare with :func:`bits`)."""
    raw = t.view(torch.uint8)
    gen = torch.Generator(device=t.device).manual_seed(seed)
    raw.copy_(torch.randint(0, 256, raw.shape, generator=gen, dtype=torch.uint8, device=t.device))


def bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes, so NaN patterns compare equal bit for bit."""
    return t.contiguous().view(torch.uint8)


def alloc_slots(allocator, page_size: int, n_pages: int, *, shuffle: bool, seed: int = 0):
    """Token slots of ``n_pages`` fresh pages, optionally in a scattered order."""
    pages = allocator.alloc(n_pages)
    assert pages is not None
    if shuffle:
        pages = pages[torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed))]
    return pages_to_slots(pages, page_size)


__all__ = ["MHA", "MLA", "DeviceKVPool", "HostKVPool", "alloc_slots", "bits", "randomize"]
