"""Load back (L2 -> L1): bring the host-resident part of a match onto the device.

All or nothing per request: either every host page after the device hit is loaded, or none
(and the request recomputes them). reserve (:class:`LoadReservation`, atomic): device pages
(evicting L1; the caller keeps the matched path locked so eviction cannot take it), each node
``LOADING`` top-down, the host copy locked. move: the H2D copy. commit: ``BOTH``,
``BlockStored(GPU)``, unlock the host copy. rollback (sync, cannot fail): ``HOST`` again
bottom-up, free the device pages, unlock.

A match is only loaded when its host part is loadable now (:meth:`Load.host_part`): a part
another request is loading is waited for (:meth:`Load.wait_settled`, then match again: its
pages are on their way, recomputing them would be waste); a part that some load or recompute
already brought to L1 is stale, and the caller matches again at once (waiting for it would wait
for a load that may never come).

Splits during the copy create ``LOADING`` ancestors in the reserved span; commit and rollback
therefore walk from the last host node up to the device boundary, not over a saved list. No
insert puts device pages below a ``LOADING`` node (the tree stops there), so the rollback's
``LOADING -> HOST`` always holds.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import anyio
import torch

from hicache_async.errors import IndexStateError
from hicache_async.events import EventHub, StorageMedium
from hicache_async.metrics import Counters, Transition
from hicache_async.radix import MatchResult, NodeState, RadixTree, TreeNode
from hicache_async.tiers._events import stored_event
from hicache_async.tiers._span import span_chain
from hicache_async.tiers.copy import CopyEngine
from hicache_async.tiers.device import DeviceTier

__all__ = ["HostPart", "Load", "LoadReservation", "LoadResult"]


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

    def host_part(self, match: MatchResult) -> HostPart:
        """Whether ``match``'s host part can be loaded now (see :class:`HostPart`)."""
        return _host_nodes(match)[0]

    def count_wait(self) -> None:
        """Count a request that waits for another request's load of its path."""
        self._totals.waited += 1

    async def wait_settled(self) -> None:
        """Return when the next load ends (committed or rolled back)."""
        await self._settled.wait()

    def _settle(self) -> None:
        self._settled.set()
        self._settled = anyio.Event()

    async def load(self, match: MatchResult) -> LoadResult:
        """Load the host part of ``match`` (the caller holds its device and host locks); no
        load when the part is not :attr:`HostPart.READY`, too short, or L1 has no room."""
        tokens = match.host_hit_length
        part, nodes = _host_nodes(match)
        if tokens < self.min_tokens or part is not HostPart.READY:
            if tokens:
                self._totals.skipped += 1
            return LoadResult(match.device_indices, 0, match.last_device_node)
        reservation = LoadReservation.reserve(self.tree, self.device, match, nodes)
        if reservation is None:
            self._totals.skipped += 1
            return LoadResult(match.device_indices, 0, match.last_device_node)
        start = time.perf_counter()
        try:
            await self.engine.load(reservation.host_slots, reservation.device_slots)
        except BaseException:
            reservation.rollback()
            self._totals.failures += 1
            self._settle()
            raise
        span = reservation.commit()
        self._settle()
        pages = tokens // self.tree.page_size
        self._totals.add(pages, pages * self.bytes_per_page, time.perf_counter() - start)
        if self.hub.active:
            self.hub.emit([stored_event(self.tree, n, StorageMedium.GPU) for n in span])
        device = torch.cat([match.device_indices, reservation.device_slots])
        return LoadResult(device, tokens, match.last_host_node)


class LoadReservation:
    """A reserved load: device pages taken, the span ``LOADING``, its host copy locked.

    Made by :meth:`reserve` (all or nothing), ended by exactly one of :meth:`commit` or
    :meth:`rollback`, both synchronous."""

    def __init__(
        self,
        tree: RadixTree,
        device: DeviceTier,
        last: TreeNode,
        tokens: int,
        device_slots: torch.Tensor,
        host_slots: torch.Tensor,
    ) -> None:
        self.tree, self.device = tree, device
        self.last, self.tokens = last, tokens
        self.device_slots, self.host_slots = device_slots, host_slots
        self._ended = False

    @classmethod
    def reserve(
        cls, tree: RadixTree, device: DeviceTier, match: MatchResult, nodes: list[TreeNode]
    ) -> LoadReservation | None:
        """Reserve the load of ``nodes`` (the match's host part, all ``HOST``, top-down);
        None when L1 has no room. Nothing is left reserved when it raises."""
        tokens = match.host_hit_length
        reserved = device.reserve(tokens // tree.page_size)
        if reserved is None:
            return None
        slots = reserved.to(match.device_indices.device)  # the tree keeps L1's device slots
        host_slots = torch.cat([n.host_indices for n in nodes if n.host_indices is not None])
        started: list[TreeNode] = []
        try:
            offset = 0
            for node in nodes:  # top-down: a parent holds device slots before its child
                tree.start_load(node, slots[offset : offset + node.num_tokens])
                started.append(node)
                offset += node.num_tokens
            tree.lock_host(match.last_host_node)
        except BaseException:
            for node in reversed(started):
                tree.cancel_load(node)
            device.free(reserved)
            raise
        return cls(tree, device, match.last_host_node, tokens, slots, host_slots)

    def commit(self) -> list[TreeNode]:
        """The copy landed: the span is ``BOTH``; returns its nodes, top-down."""
        self._end()
        span = span_chain(self.last, self.tokens)
        for node in span:
            self.tree.finish_load(node)
        self.tree.unlock_host(self.last)
        return span

    def rollback(self) -> None:
        """The copy failed or was cancelled: the span is ``HOST`` again, bottom-up, and its
        device pages are free. Nothing below a ``LOADING`` node holds device pages (inserts
        stop there), so going back to ``HOST`` cannot be refused."""
        self._end()
        for node in reversed(span_chain(self.last, self.tokens)):
            self.device.free(self.tree.cancel_load(node))
        self.tree.unlock_host(self.last)

    def _end(self) -> None:
        if self._ended:
            raise IndexStateError("a load reservation is committed or rolled back once")
        self._ended = True


class HostPart(enum.Enum):
    """Whether a match's host part can be loaded now."""

    READY = "ready"  # every node HOST: load it
    IN_FLIGHT = "in_flight"  # another request's load moves part of it: wait, match again
    STALE = "stale"  # part of it reached L1 since the match (loaded, recomputed): match again


def _host_nodes(match: MatchResult) -> tuple[HostPart, list[TreeNode]]:
    """The host-only nodes from below the last device node down to the last host node, and
    whether they can be loaded now."""
    nodes: list[TreeNode] = []
    x: TreeNode | None = match.last_host_node
    while x is not None and x is not match.last_device_node and x.parent is not None:
        state = x.state
        if state is not NodeState.HOST:
            return (HostPart.IN_FLIGHT if state is NodeState.LOADING else HostPart.STALE), []
        nodes.append(x)
        x = x.parent
    nodes.reverse()
    return HostPart.READY, nodes
