"""Tree nodes, their tier residency, and the results the tree hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

import numpy as np
import torch

from hicache_async.memory.slots import pages_to_slots

__all__ = ["EvictResult", "MatchResult", "NodeState", "Tier", "TreeNode"]

_I64 = np.dtype("<i8")


class Tier(StrEnum):
    """A tier the index tracks slots for."""

    DEVICE = "device"  # L1
    HOST = "host"  # L2


class NodeState(Enum):
    """Where a node's KV lives. In-flight states hold the destination slots already reserved."""

    DEVICE = "device"  # L1 only
    HOST = "host"  # L2 only
    BOTH = "both"  # L1 and L2 hold the same bytes
    BACKING_UP = "backing_up"  # L1 valid; L2 slots reserved, D2H copy in flight
    LOADING = "loading"  # L2 valid; L1 slots reserved, H2D copy in flight
    REMOVED = "removed"  # no longer in the tree; kept readable for KV events and hashes

    @property
    def holds_device(self) -> bool:
        """Owns device slots (valid or reserved)."""
        return self in _HOLDS_DEVICE

    @property
    def device_valid(self) -> bool:
        """Device slots hold the KV (readable by the model, matchable as a device hit)."""
        return self in _DEVICE_VALID

    @property
    def holds_host(self) -> bool:
        """Owns host slots (valid or reserved)."""
        return self in _HOLDS_HOST

    @property
    def host_valid(self) -> bool:
        """Host slots hold the KV."""
        return self in _HOST_VALID


_HOLDS_DEVICE = frozenset(
    {NodeState.DEVICE, NodeState.BOTH, NodeState.BACKING_UP, NodeState.LOADING}
)
_DEVICE_VALID = frozenset({NodeState.DEVICE, NodeState.BOTH, NodeState.BACKING_UP})
_HOLDS_HOST = frozenset({NodeState.HOST, NodeState.BOTH, NodeState.BACKING_UP, NodeState.LOADING})
_HOST_VALID = frozenset({NodeState.HOST, NodeState.BOTH, NodeState.LOADING})


class TreeNode:
    """One run of whole pages. Created and mutated only by :class:`RadixTree`; read freely.

    Slots are kept per page (``device_pages``, ``host_pages``: page indices of the paged pools,
    token slot = page * page_size + offset), not per token: 16x less to store and copy at page
    16; at page 1 (a page is a token) as int32 when they fit. ``device_indices`` /
    ``host_indices`` expand them to int64 token slots on demand.

    The span's token ids are kept in ``tokens``, a read-only numpy array the node owns: int32
    when every id is in ``[0, 2**31)`` (half the bytes to store: fresh memory costs page
    faults), else int64. ``key`` gives them as int64-LE bytes (a new copy on each call),
    ``edge`` is the int64-LE bytes of the first page, under which the parent files the node.
    """

    __slots__ = (
        "children",
        "created",
        "dev_seq",
        "device_lock_ref",
        "device_pages",
        "edge",
        "extra_key",
        "hashes",
        "hit_count",
        "host_lock_ref",
        "host_pages",
        "host_seq",
        "id",
        "last_access",
        "n_dev_children",
        "page_size",
        "parent",
        "priority",
        "state",
        "tokens",
        "written",
    )

    def __init__(
        self,
        node_id: int,
        tokens: np.ndarray[Any, Any],
        edge: bytes,
        parent: TreeNode | None,
        state: NodeState,
        tick: int,
        priority: int = 0,
        page_size: int = 1,
    ) -> None:
        self.id = node_id  # from the tree's own counter
        self.page_size = page_size
        self.tokens = tokens  # token ids of this node's span (int32 when they fit, else int64)
        self.edge = edge  # int64-LE bytes of the first page: this node's key in parent.children
        self.parent = parent  # None only for a namespace root
        self.children: dict[bytes, TreeNode] = {}  # keyed by the child's first page bytes
        self.state = state
        self.device_pages: torch.Tensor | None = None  # page indices (int64; int32 at page 1)
        self.host_pages: torch.Tensor | None = None
        self.device_lock_ref = 0
        self.host_lock_ref = 0
        self.n_dev_children = 0  # children whose state holds device slots: O(1) leaf test
        self.hit_count = 0
        self.last_access = tick  # logical clock of the tree: strictly ordered, deterministic
        self.created = tick
        self.priority = priority
        self.hashes: list[str] | None = None  # per-page SHA-256 hex, filled lazily
        self.written = False  # its pages were acknowledged by L3 (set by the write-back commit)
        self.extra_key: str | None = None  # only meaningful on roots
        self.dev_seq = 0  # seq of this node's live entry in the device eviction heap (0: none)
        self.host_seq = 0  # likewise for the host heap

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def key(self) -> bytes:
        """The span's token ids as int64-LE bytes (built on each call: not for hot paths)."""
        t = self.tokens
        return (t if t.dtype == _I64 else t.astype(_I64)).tobytes()

    @property
    def is_root(self) -> bool:
        return self.parent is None

    @property
    def device_indices(self) -> torch.Tensor | None:
        """Device token slots, one per token (built from ``device_pages`` on each call)."""
        p = self.device_pages
        return None if p is None else pages_to_slots(p, self.page_size)

    @property
    def host_indices(self) -> torch.Tensor | None:
        """Host token slots, one per token (built from ``host_pages`` on each call)."""
        p = self.host_pages
        return None if p is None else pages_to_slots(p, self.page_size)

    def __repr__(self) -> str:
        return (
            f"TreeNode(id={self.id}, tokens={self.num_tokens}, state={self.state.name}, "
            f"dlock={self.device_lock_ref}, hlock={self.host_lock_ref})"
        )


@dataclass(frozen=True, slots=True)
class MatchResult:
    """The longest cached prefix of a key.

    ``device_pages`` are the device pages of the leading run of device-valid nodes (ending at
    ``last_device_node``; int64, or int32 at page 1), ``device_indices`` their int64 token
    slots; ``host_hit_length`` more tokens follow on host (ending at ``last_host_node``, which
    is ``last_device_node`` when there is no host hit).
    """

    device_pages: torch.Tensor
    last_device_node: TreeNode
    last_host_node: TreeNode
    host_hit_length: int = 0
    page_size: int = 1

    @property
    def device_hit_length(self) -> int:
        return int(self.device_pages.numel()) * self.page_size

    @property
    def device_indices(self) -> torch.Tensor:
        """Device token slots of the hit, one per token (built on each call)."""
        return pages_to_slots(self.device_pages, self.page_size)


@dataclass(slots=True)
class EvictResult:
    """What an eviction did. The caller frees the pages and emits KV events for the nodes."""

    device_pages: torch.Tensor  # int64 device pages to free
    host_pages: torch.Tensor  # int64 host pages to free
    page_size: int = 1
    removed: list[TreeNode] = field(default_factory=list)  # left the tree (state REMOVED)
    # Of ``removed``, those that had a device / a host copy (for per-medium KV events).
    removed_device: list[TreeNode] = field(default_factory=list)
    removed_host: list[TreeNode] = field(default_factory=list)
    demoted: list[TreeNode] = field(default_factory=list)  # lost their device copy, now HOST
    num_pages: int = 0  # pages evicted from the tier asked for

    @property
    def device_indices(self) -> torch.Tensor:
        """The freed device pages as int64 token slots (built on each call)."""
        return pages_to_slots(self.device_pages, self.page_size)

    @property
    def host_indices(self) -> torch.Tensor:
        """The freed host pages as int64 token slots (built on each call)."""
        return pages_to_slots(self.host_pages, self.page_size)
