"""Adapter for ``shared/peers/bench_radix.py``: our :class:`RadixTree` behind its interface.

    PYTHONPATH=. $PEERS_VENV/bin/python ../shared/peers/bench_radix.py --workload trace \
        --page-sizes 16,1 --impl sglang,benchmarks.peers_adapter:make_cache

What each call does, next to SGLang's ``RadixCache`` (same workload, same inputs):

- keys: ``RadixKey(tokens, copy=False)`` views the ``array('q')`` (SGLang's ``RadixKey`` keeps the
  caller's array too); the tree copies the token bytes it stores, as SGLang copies key slices.
- insert: takes the per-token slot tensor; the tree checks that its whole pages are whole,
  in-order pool pages and keeps one page index per page (SGLang clones the per-token slots).
- match: concatenates the matched nodes' page tensors (SGLang concatenates per-token slots) and
  returns the hit length. ``make_cache_slots`` also expands them to per-token slots
  (``MatchResult.device_indices``), the same result SGLang builds.
- no page hashes (SGLang's ``RadixCache`` computes none either).
"""

from __future__ import annotations

from array import array
from typing import Any

import torch

from hicache_async.radix import RadixKey, RadixTree


class HiCacheRadix:
    def __init__(self, page_size: int) -> None:
        self.tree = RadixTree(page_size=page_size)

    def match(self, tokens: array[int]) -> int:
        return self.tree.match_prefix(RadixKey(tokens, copy=False)).device_hit_length

    def insert(self, tokens: array[int], value: torch.Tensor) -> int:
        return self.tree.insert(RadixKey(tokens, copy=False), value)

    def stats(self) -> dict[str, Any]:
        nodes = 0
        stack = list(self.tree._roots.values())
        while stack:
            n = stack.pop()
            nodes += 1
            stack.extend(n.children.values())
        return {
            "nodes": nodes - len(self.tree._roots),
            "tokens": self.tree.total_size(),
        }


class HiCacheRadixSlots(HiCacheRadix):
    """Match also builds the per-token slot tensor of the hit."""

    def match(self, tokens: array[int]) -> int:
        r = self.tree.match_prefix(RadixKey(tokens, copy=False))
        return int(r.device_indices.numel())


class HiCacheRadixPages(HiCacheRadix):
    """Insert as the session commits (``insert_pages``): the caller holds the page table (here
    built from the per-token slots, as an allocator would hand it over) and the tree keeps
    views of it: no slot check, no copy (at page 1 the harness's slot tensor itself, which it
    never writes). Not SGLang's contract (it clones the slots), so not the headline figure."""

    def insert(self, tokens: array[int], value: torch.Tensor) -> int:
        size = self.tree.page_size
        n = len(tokens) // size * size
        pages = value[:n] if size == 1 else value[:n:size] // size
        key = RadixKey(tokens, copy=False)
        return self.tree.insert_pages(key if n == len(tokens) else key.prefix(n), pages)


def make_cache(page_size: int) -> HiCacheRadix:
    return HiCacheRadix(page_size)


def make_cache_slots(page_size: int) -> HiCacheRadix:
    return HiCacheRadixSlots(page_size)


def make_cache_pages(page_size: int) -> HiCacheRadix:
    return HiCacheRadixPages(page_size)
