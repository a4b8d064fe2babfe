"""Eviction policies: the registry, and each policy's own eviction order."""

from __future__ import annotations

import pytest
import torch

from hicache_async.config import EvictionPolicy
from hicache_async.errors import ConfigError
from hicache_async.radix import POLICIES, RadixKey, RadixTree, make_policy

A, B, C = [1, 1], [2, 2], [3, 3]


def _scenario(policy: str) -> list[str]:
    """A, B, C inserted in that order (priorities 0, 2, 1); then matches C, A, C, A, B.

    last access C < A < B; hits B=1 < C=2 = A=2; created A < B < C."""
    tree = RadixTree(page_size=2, eviction_policy=policy)
    for i, (toks, prio) in enumerate(((A, 0), (B, 2), (C, 1))):
        tree.insert(RadixKey(toks), torch.tensor([2 * i, 2 * i + 1]), priority=prio)
    for toks in (C, A, C, A, B):
        tree.match_prefix(RadixKey(toks))
    names = {bytes(RadixKey(t).data): n for t, n in ((A, "A"), (B, "B"), (C, "C"))}
    order = []
    for _ in range(3):
        ev = tree.evict(1)
        tree.check()
        (node,) = ev.removed
        order.append(names[node.key])
    assert tree.total_size() == 0
    return order


@pytest.mark.parametrize(
    ("policy", "order"),
    [
        ("lru", ["C", "A", "B"]),
        ("lfu", ["B", "C", "A"]),
        ("fifo", ["A", "B", "C"]),
        ("mru", ["B", "A", "C"]),
        ("filo", ["C", "B", "A"]),
        ("priority", ["A", "C", "B"]),
    ],
)
def test_each_policy_has_its_order(policy: str, order: list[str]) -> None:
    assert _scenario(policy) == order


def test_registry_covers_the_enum() -> None:
    assert set(POLICIES) == set(EvictionPolicy)
    for p in EvictionPolicy:
        assert make_policy(p).name is p
        assert make_policy(p.value).name is p


def test_unknown_policy_lists_known_ones() -> None:
    with pytest.raises(ConfigError, match="lru, lfu, fifo, mru, filo, priority"):
        RadixTree(eviction_policy="random")


def test_priority_ties_fall_back_to_lru() -> None:
    tree = RadixTree(page_size=1, eviction_policy="priority")
    for i in range(3):
        tree.insert(RadixKey([10 + i]), torch.tensor([i]), priority=5)
    tree.match_prefix(RadixKey([10]))
    got = [tree.evict(1).removed[0].key for _ in range(3)]
    assert got == [RadixKey([11]).data, RadixKey([12]).data, RadixKey([10]).data]


def test_eviction_heap_stays_bounded_under_touches() -> None:
    tree = RadixTree(page_size=1)
    for i in range(50):
        tree.insert(RadixKey([i]), torch.tensor([i]))
    for _ in range(40):
        for i in range(50):
            tree.match_prefix(RadixKey([i]))
    assert len(tree._dev_heap._heap) <= 2 * 50 + 64 + 1
    tree.check()


@pytest.mark.parametrize("policy", ["lru", "lfu", "mru", "priority"])
def test_first_lists_members_in_eviction_order_without_removing(policy: str) -> None:
    import random

    rng = random.Random(7)
    tree = RadixTree(page_size=1, eviction_policy=policy)
    for i in range(200):
        tree.insert(RadixKey([1000 + i]), torch.tensor([i]), priority=rng.randrange(3))
    for _ in range(600):  # touches leave stale entries in the heap
        tree.match_prefix(RadixKey([1000 + rng.randrange(200)]))
    heap = tree._dev_heap
    live = sorted(e for e in heap._heap if e[2].dev_seq == e[1])
    for count in (0, 1, 5, 64, 200, 500):
        assert heap.first(count) == [n for *_, n in live[:count]]
    assert heap.size == 200  # nothing was removed
    # ...and eviction takes them in that order.
    assert [tree.evict(1).removed[0] for _ in range(10)] == [n for *_, n in live[:10]]
