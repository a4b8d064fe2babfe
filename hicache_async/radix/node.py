"""Tree nodes, their tier residency, and the results the tree hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, StrEnum

import torch

from hicache_async.memory.slots import pages_to_slots
from hicache_async.radix.key import TOKEN_BYTES

__all__ = ["EvictResult", "MatchResult", "NodeState", "Tier", "TreeNode"]


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
    """

    __slots__ = (
        "children",
        "created",
        "dev_seq",
        "device_lock_ref",
        "device_pages",
        "extra_key",
        "hashes",
        "hit_count",
        "host_lock_ref",
        "host_pages",
        "host_seq",
        "id",
        "key",
        "last_access",
        "n_dev_children",
        "page_size",
        "parent",
        "priority",
        "state",
        "written",
    )

    def __init__(
        self,
        node_id: int,
        key: bytes,
        parent: TreeNode | None,
        state: NodeState,
        tick: int,
        priority: int = 0,
        page_size: int = 1,
    ) -> None:
        self.id = node_id  # from the tree's own counter
        self.page_size = page_size
        self.key = key  # int64-LE token bytes of this node's span
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
        return len(self.key) // TOKEN_BYTES

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
