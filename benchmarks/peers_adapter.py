"""Adapter for ``shared/peers/bench_radix.py``: our :class:`RadixTree` behind its interface.

    PYTHONPATH=. $PEERS_VENV/bin/python ../shared/peers/bench_radix.py --workload trace \
        --page-sizes 16,1 --impl sglang,benchmarks.peers_adapter:make_cache

``match`` and ``insert`` build a :class:`RadixKey` from the ``array('q')`` each time (as SGLang's
adapter builds its ``RadixKey``), so the int64 -> int32 conversion is inside the timed calls. No
page hashes are computed (SGLang's ``RadixCache`` computes none either).
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


def make_cache(page_size: int) -> HiCacheRadix:
    return HiCacheRadix(page_size)
