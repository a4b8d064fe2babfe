"""Load back (L2 -> L1): bring the host-resident part of a match onto the device.

All or nothing per request: either every host page after the device hit is loaded, or none
(and the request recomputes them). reserve: device pages (evicting L1; the caller keeps the
matched path locked so eviction cannot take it), each node ``LOADING`` top-down, the host copy
locked. move: the H2D copy. commit: ``BOTH``, ``BlockStored(GPU)``, unlock the host copy.
rollback: ``HOST`` again bottom-up, free the device pages, unlock.

A request whose host part another request is loading waits for that load to end and matches
again (:meth:`Load.wait_for_others`), instead of recomputing pages that are on their way.

Splits during the copy create ``LOADING`` ancestors in the reserved span; commit and rollback
therefore walk from the last host node up to the device boundary, not over a saved list.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import torch

from hicache_async.events import EventHub, StorageMedium
from hicache_async.metrics import Counters, Transition
from hicache_async.radix import MatchResult, NodeState, RadixTree, TreeNode
from hicache_async.tiers._events import stored_event
from hicache_async.tiers._span import span_chain
from hicache_async.tiers.copy import CopyEngine
from hicache_async.tiers.device import DeviceTier

__all__ = ["Load", "LoadResult"]


@dataclass(frozen=True, slots=True)
class LoadResult:
    """Device slots of the whole matched prefix after a load (or without one)."""

    device_indices: torch.Tensor
    loaded_tokens: int
    last_node: TreeNode  # the deepest node now on device


class Load:
    """Runs loads; each one is a complete reserve -> move -> commit or rollback."""

    def __init__(
        self,
        tree: RadixTree,
        device: DeviceTier,
        engine: CopyEngine,
        counters: Counters,
        hub: EventHub,
        *,
        min_tokens: int = 1,
        bytes_per_page: int = 0,
    ) -> None:
        self.tree, self.device, self.engine = tree, device, engine
        self.counters, self.hub = counters, hub
        self.min_tokens = min_tokens
        self.bytes_per_page = bytes_per_page
        self._totals = counters.transitions[Transition.LOAD]
        self._settled = anyio.Event()  # set (and replaced) whenever a load ends

    @property
    def skipped(self) -> int:
        """Loads not made: too short, or no device room."""
        return self._totals.skipped

    @property
    def waited(self) -> int:
        """Loads that first waited for another request's load of their path."""
        return self._totals.waited

    def busy(self, match: MatchResult) -> bool:
        """Whether another request's load is moving part of ``match``'s host part."""
        return bool(match.host_hit_length) and not _host_nodes(match)

    async def wait_for_others(
        self, match: MatchResult, rematch: Callable[[], MatchResult]
    ) -> MatchResult:
        """While another request's load moves part of ``match``'s host part, wait for a load
        to end and match again (``rematch``); the match then has no page in flight."""
        self._totals.waited += 1
        while self.busy(match):
            await self._settled.wait()
            match = rematch()
        return match

    def _settle(self) -> None:
        self._settled.set()
        self._settled = anyio.Event()

    async def load(self, match: MatchResult) -> LoadResult:
        """Load the host part of ``match`` (the caller holds its device and host locks)."""
        tokens = match.host_hit_length
        nodes = _host_nodes(match)
        if tokens < self.min_tokens or not nodes:
            if tokens:
                self._totals.skipped += 1
            return LoadResult(match.device_indices, 0, match.last_device_node)
        pages = tokens // self.tree.page_size
        reserved = self.device.reserve(pages)
        if reserved is None:
            self._totals.skipped += 1
            return LoadResult(match.device_indices, 0, match.last_device_node)
        slots = reserved.to(match.device_indices.device)  # the tree keeps L1's device slots
        host_slots = torch.cat([n.host_indices for n in nodes if n.host_indices is not None])
        offset = 0
        for node in nodes:  # top-down: a parent holds device slots before its child
            self.tree.start_load(node, slots[offset : offset + node.num_tokens])
            offset += node.num_tokens
        last = match.last_host_node
        self.tree.lock_host(last)
        start = time.perf_counter()
        try:
            await self.engine.load(host_slots, slots)
        except BaseException:
            for node in reversed(span_chain(last, tokens)):
                self.device.free(self.tree.cancel_load(node))
            self.tree.unlock_host(last)
            self._totals.failures += 1
            self._settle()
            raise
        span = span_chain(last, tokens)
        for node in span:
            self.tree.finish_load(node)
        self.tree.unlock_host(last)
        self._settle()
        self._totals.add(pages, pages * self.bytes_per_page, time.perf_counter() - start)
        if self.hub.active:
            self.hub.emit([stored_event(self.tree, n, StorageMedium.GPU) for n in span])
        device = torch.cat([match.device_indices, slots])
        return LoadResult(device, tokens, last)


def _host_nodes(match: MatchResult) -> list[TreeNode]:
    """The host-only nodes from below the last device node down to the last host node."""
    nodes: list[TreeNode] = []
    x: TreeNode | None = match.last_host_node
    while x is not None and x is not match.last_device_node and x.parent is not None:
        if x.state is not NodeState.HOST:
            return []  # another transition is moving part of this path: do not race it
        nodes.append(x)
        x = x.parent
    nodes.reverse()
    return nodes
