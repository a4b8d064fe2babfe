"""LRU hit ratio of the tree on a trace slice equals a per-page LRU reference simulator.

The reference follows ``shared/data/trace_stats.py`` (written again here, independently): a page
is its whole prefix chain; a request hits the longest prefix whose pages are all resident; then
all its pages become resident and most recent, refreshed tail first (so a prefix is always more
recent than its extensions); the least recent pages go past the capacity.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from hicache_async.radix import RadixKey, RadixTree

TRACE = Path(__file__).parent / "data" / "mooncake_conversation_head.jsonl"


def _requests() -> list[list[int]]:
    rows = [json.loads(line) for line in TRACE.read_text().splitlines() if line.strip()]
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["timestamp"], i))
    return [rows[i]["hash_ids"] for i in order]


def _reference_hits(reqs: list[list[int]], capacity: int) -> int:
    ids: dict[tuple[int, int], int] = {}
    cache: OrderedDict[int, None] = OrderedDict()
    hits = 0
    for hids in reqs:
        chain = []
        parent = -1
        for h in hids:
            parent = ids.setdefault((parent, h), len(ids))
            chain.append(parent)
        for n in chain:
            if n not in cache:
                break
            hits += 1
        for n in reversed(chain):
            if n in cache:
                cache.move_to_end(n)
            else:
                cache[n] = None
                if len(cache) > capacity:
                    cache.popitem(last=False)
    return hits


def _tree_hits(reqs: list[list[int]], capacity: int, page: int) -> int:
    tree = RadixTree(page_size=page, eviction_policy="lru")
    offs = np.arange(page, dtype=np.int64)
    next_slot = 0  # fresh slots per request: check() verifies each is owned once
    hits = 0
    for hids in reqs:
        key = RadixKey((np.asarray(hids, dtype=np.int64)[:, None] * page + offs).ravel())
        hits += tree.match_prefix(key).device_hit_length // page
        tree.insert(key, torch.arange(next_slot, next_slot + len(key), dtype=torch.int64))
        next_slot += len(key)
        over = tree.total_size() // page - capacity
        if over > 0:
            assert tree.evict(over).num_pages == over
    tree.check()
    assert tree.total_size() <= capacity * page
    return hits


@pytest.mark.parametrize(("capacity", "page"), [(128, 1), (512, 4), (2048, 1), (8192, 2)])
def test_lru_hit_ratio_matches_reference(capacity: int, page: int) -> None:
    reqs = _requests()
    total = sum(len(h) for h in reqs)
    ref = _reference_hits(reqs, capacity) / total
    got = _tree_hits(reqs, capacity, page) / total
    assert ref > 0.01  # the slice exercises reuse at this capacity
    assert abs(got - ref) < 0.005, (got, ref)
