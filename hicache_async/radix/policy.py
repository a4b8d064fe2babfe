"""Eviction policies (a registry keyed by :class:`EvictionPolicy`) and the heap of evictable leaves.

A policy maps a node to a sort key: smallest leaves first. The tree keeps one
:class:`EvictionHeap` per tier holding only the *evictable leaves* of that tier, so an eviction
pops what it needs in O(log n) instead of scanning every leaf as SGLang does. Entries are deleted
lazily: each node remembers the sequence number of its one live entry, and anything else popped is
stale. A node whose key changes (touched by a match) is simply pushed again.
"""

from __future__ import annotations

import heapq
from typing import Any, ClassVar

from hicache_async.config import EvictionPolicy
from hicache_async.errors import ConfigError
from hicache_async.radix.node import TreeNode

__all__ = [
    "POLICIES",
    "EvictionHeap",
    "EvictionStrategy",
    "FIFOStrategy",
    "FILOStrategy",
    "LFUStrategy",
    "LRUStrategy",
    "MRUStrategy",
    "PriorityStrategy",
    "make_policy",
]


class EvictionStrategy:
    """Orders evictable leaves; the smallest :meth:`key` leaves first. No constructor arguments."""

    name: ClassVar[EvictionPolicy]

    def key(self, node: TreeNode) -> Any:
        raise NotImplementedError


class LRUStrategy(EvictionStrategy):
    name = EvictionPolicy.LRU

    def key(self, node: TreeNode) -> int:
        return node.last_access


class LFUStrategy(EvictionStrategy):
    name = EvictionPolicy.LFU

    def key(self, node: TreeNode) -> tuple[int, int]:
        return (node.hit_count, node.last_access)


class FIFOStrategy(EvictionStrategy):
    name = EvictionPolicy.FIFO

    def key(self, node: TreeNode) -> int:
        return node.created


class MRUStrategy(EvictionStrategy):
    name = EvictionPolicy.MRU

    def key(self, node: TreeNode) -> int:
        return -node.last_access


class FILOStrategy(EvictionStrategy):
    name = EvictionPolicy.FILO

    def key(self, node: TreeNode) -> int:
        return -node.created


class PriorityStrategy(EvictionStrategy):
    """Lowest request priority first; LRU among equal priorities."""

    name = EvictionPolicy.PRIORITY

    def key(self, node: TreeNode) -> tuple[int, int]:
        return (node.priority, node.last_access)


POLICIES: dict[EvictionPolicy, type[EvictionStrategy]] = {
    cls.name: cls
    for cls in (
        LRUStrategy,
        LFUStrategy,
        FIFOStrategy,
        MRUStrategy,
        FILOStrategy,
        PriorityStrategy,
    )
}


def make_policy(name: EvictionPolicy | str) -> EvictionStrategy:
    """The policy registered under ``name``; an unknown name is a :class:`ConfigError`."""
    try:
        return POLICIES[EvictionPolicy(name)]()
    except ValueError:
        known = ", ".join(p.value for p in POLICIES)
        raise ConfigError(f"unknown eviction policy {name!r}; known: {known}") from None


class EvictionHeap:
    """Evictable leaves of one tier, ordered by a policy, with lazy deletion.

    ``attr`` names the node slot (``dev_seq`` / ``host_seq``) that holds the seq of the node's
    live entry; 0 means the node is not a member.
    """

    __slots__ = ("_attr", "_heap", "_key", "_seq", "size")

    def __init__(self, policy: EvictionStrategy, attr: str) -> None:
        self._key = policy.key
        self._attr = attr
        self._heap: list[tuple[Any, int, TreeNode]] = []
        self._seq = 0
        self.size = 0  # live members

    def push(self, node: TreeNode) -> None:
        """Add ``node``, or re-file it under its current key if it is already a member."""
        self._seq += 1
        if not getattr(node, self._attr):
            self.size += 1
        setattr(node, self._attr, self._seq)
        heapq.heappush(self._heap, (self._key(node), self._seq, node))
        if len(self._heap) > 2 * self.size + 64:
            self._compact()

    def discard(self, node: TreeNode) -> None:
        if getattr(node, self._attr):
            setattr(node, self._attr, 0)
            self.size -= 1

    def pop(self) -> TreeNode | None:
        """Remove and return the first member, or None when there is none."""
        heap, attr = self._heap, self._attr
        while heap:
            _, seq, node = heapq.heappop(heap)
            if getattr(node, attr) == seq:
                setattr(node, attr, 0)
                self.size -= 1
                return node
        return None

    def members(self) -> list[TreeNode]:
        attr = self._attr
        return [n for _, seq, n in self._heap if getattr(n, attr) == seq]

    def first(self, count: int) -> list[TreeNode]:
        """The first ``count`` members in eviction order, without removing them.

        Walks the heap array from its root through a frontier of child positions (a heap's
        ``count`` smallest lie in its top part): O((count + stale entries met) log), not a
        scan of every entry (the ``write_back`` policy asks before every L1 eviction)."""
        heap, attr = self._heap, self._attr
        out: list[TreeNode] = []
        if not heap or count <= 0:
            return out
        frontier = [(heap[0][0], heap[0][1], 0)]
        end = len(heap)
        while frontier and len(out) < count:
            _, seq, i = heapq.heappop(frontier)
            node = heap[i][2]
            if getattr(node, attr) == seq:  # stale entries are skipped, their subtrees not
                out.append(node)
            for c in (2 * i + 1, 2 * i + 2):
                if c < end:
                    key, cseq, _ = heap[c]
                    heapq.heappush(frontier, (key, cseq, c))
        return out

    def _compact(self) -> None:
        attr = self._attr
        self._heap = [e for e in self._heap if getattr(e[2], attr) == e[1]]
        heapq.heapify(self._heap)
