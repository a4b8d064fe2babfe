"""Eviction and tier transitions of the radix tree: the state changes the runtime commits.

Eviction pops the tier's heap of evictable leaves (no tree scan) and takes exactly the pages asked
for: when a leaf is longer than what is still needed, it is split and only its tail goes, which is
what a per-page LRU would evict (a node's tail pages are never more recent than its head).

The transitions follow reserve -> move -> commit: ``start_backup`` / ``start_load`` record the
reserved destination slots (in-flight state), ``finish_*`` commits, ``cancel_*`` rolls back and
hands the reserved slots back to the caller to free.
"""

from __future__ import annotations

import torch

from hicache_async.errors import IndexStateError
from hicache_async.radix.node import EvictResult, NodeState, TreeNode
from hicache_async.radix.tree import RadixTreeBase, check_indices

__all__ = ["RadixTree"]

_DEVICE = NodeState.DEVICE
_HOST = NodeState.HOST
_BOTH = NodeState.BOTH
_BACKING_UP = NodeState.BACKING_UP
_LOADING = NodeState.LOADING
_REMOVED = NodeState.REMOVED


class RadixTree(RadixTreeBase):
    """Radix prefix index over whole pages, aware of the device and host tiers.

    Request path: :meth:`match_prefix`, :meth:`find`, :meth:`insert`, :meth:`insert_host`,
    :meth:`lock` / :meth:`unlock` (and the ``_host`` variants). Capacity: :meth:`evict`,
    :meth:`evict_host`.
    Transitions: :meth:`start_backup` / :meth:`finish_backup` / :meth:`cancel_backup`,
    :meth:`start_load` / :meth:`finish_load` / :meth:`cancel_load`, :meth:`drop_host`.
    Sizes are in tokens; eviction requests are in pages.
    """

    # ----------------------------------------------------------------------- eviction

    def _cat(self, parts: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        """The page tensors ``parts`` as one int64 tensor (what the allocators take)."""
        if not parts:
            return empty
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).long()

    def evict(
        self, n_pages: int, keep_host: bool = True, *, keep_unbacked: bool = False
    ) -> EvictResult:
        """Evict up to ``n_pages`` device pages from unlocked device leaves, policy order.

        A node that also has a host copy becomes host-only when ``keep_host``; otherwise (or
        when it has no host copy) it leaves the tree with any host-only nodes below it, whose
        host slots are returned too. Nodes whose removal would drop a host-locked copy are
        skipped, and so are nodes with no host copy when ``keep_unbacked`` (``write_back``:
        those must be backed up first, or their KV would be lost from every tier). The caller
        frees ``device_pages`` / ``host_pages``.
        """
        need = n_pages * self.page_size
        done = 0
        dev: list[torch.Tensor] = []
        host: list[torch.Tensor] = []
        result = EvictResult(self._empty, self._empty_host, self.page_size)
        skipped: list[TreeNode] = []
        heap = self._dev_heap
        while done < need:
            node = heap.pop()
            if node is None:
                break
            drop = not (keep_host and node.state is _BOTH)
            if drop and (node.host_lock_ref or (keep_unbacked and node.state is _DEVICE)):
                skipped.append(node)
                continue
            n = node.num_tokens
            if n > need - done:
                self._split(node, n - (need - done), lower_leaves=drop)  # ``node``: the tail
                n = need - done
            if drop:
                self._remove_subtree(node, dev, host, result)
            else:
                self._demote(node, dev)
                result.demoted.append(node)
            done += n
        for node in skipped:
            self._refresh(node)
        result.device_pages = self._cat(dev, self._empty)
        result.host_pages = self._cat(host, self._empty_host)
        result.num_pages = done // self.page_size
        return result

    def eviction_candidates(self, count: int) -> list[TreeNode]:
        """The first ``count`` unlocked device leaves in eviction order (not evicted).

        The write-back policy backs these up before evicting, so L1 eviction demotes them to
        L2 instead of dropping them."""
        return self._dev_heap.first(count)

    def evict_host(self, n_pages: int) -> EvictResult:
        """Evict up to ``n_pages`` host pages from unlocked host-only leaves, policy order."""
        need = n_pages * self.page_size
        done = 0
        dev: list[torch.Tensor] = []
        host: list[torch.Tensor] = []
        result = EvictResult(self._empty, self._empty_host, self.page_size)
        heap = self._host_heap
        while done < need:
            node = heap.pop()
            if node is None:
                break
            n = node.num_tokens
            if n > need - done:
                self._split(node, n - (need - done), lower_leaves=True)
                n = need - done
            self._remove_subtree(node, dev, host, result)
            done += n
        result.host_pages = self._cat(host, self._empty_host)
        result.num_pages = done // self.page_size
        return result

    def _demote(self, node: TreeNode, dev: list[torch.Tensor]) -> None:
        """BOTH -> HOST for an unlocked device leaf."""
        assert node.device_pages is not None
        assert node.device_lock_ref == 0
        dev.append(node.device_pages)
        node.device_pages = None
        node.state = _HOST
        self._dev_evictable -= node.num_tokens
        parent = node.parent
        assert parent is not None
        parent.n_dev_children -= 1
        self._refresh(parent)
        self._refresh(node)

    def _remove_subtree(
        self,
        node: TreeNode,
        dev: list[torch.Tensor],
        host: list[torch.Tensor],
        result: EvictResult,
    ) -> None:
        """Take ``node`` and everything below it out of the tree (all unlocked)."""
        parent = node.parent
        assert parent is not None
        del parent.children[node.edge]
        if node.state.holds_device:
            parent.n_dev_children -= 1
        stack = [node]
        while stack:
            x = stack.pop()
            stack.extend(x.children.values())
            n = x.num_tokens
            if x.device_pages is not None:
                dev.append(x.device_pages)
                x.device_pages = None
                self._dev_evictable -= n
                result.removed_device.append(x)
            if x.host_pages is not None:
                host.append(x.host_pages)
                x.host_pages = None
                self._host_evictable -= n
                result.removed_host.append(x)
            self._dev_heap.discard(x)
            self._host_heap.discard(x)
            x.state = _REMOVED
            result.removed.append(x)
        if parent.parent is None:
            if not parent.children and parent.extra_key is not None:
                del self._roots[parent.extra_key]  # an empty namespace goes away
        else:
            self._refresh(parent)

    # ----------------------------------------------------------------------- transitions

    def _expect(self, node: TreeNode, *states: NodeState) -> None:
        if node.state not in states or node.parent is None:
            want = " or ".join(s.name for s in states)
            raise IndexStateError(f"{node!r} must be {want} for this transition")

    def _add_host(self, node: TreeNode) -> None:
        if node.host_lock_ref:
            self._host_protected += node.num_tokens
        else:
            self._host_evictable += node.num_tokens

    def _sub_host(self, node: TreeNode) -> torch.Tensor:
        indices = node.host_indices
        assert indices is not None
        node.host_pages = None
        if node.host_lock_ref:
            self._host_protected -= node.num_tokens
        else:
            self._host_evictable -= node.num_tokens
        return indices

    def start_backup(self, node: TreeNode, host_indices: torch.Tensor) -> None:
        """DEVICE -> BACKING_UP: host slots reserved, the D2H copy is about to start."""
        self._expect(node, _DEVICE)
        check_indices(host_indices, node.num_tokens, "host_indices")
        self._start_backup(node, self._to_pages(host_indices, "host_indices"))

    def start_backup_pages(self, node: TreeNode, host_pages: torch.Tensor) -> None:
        """:meth:`start_backup` with the reserved host pages (one int64 page index per page
        of ``node``); the tree keeps ``host_pages`` (hand over a tensor never written again)."""
        self._expect(node, _DEVICE)
        check_indices(host_pages, node.num_tokens // self.page_size, "host_pages")
        self._start_backup(node, host_pages)

    def _start_backup(self, node: TreeNode, host_pages: torch.Tensor) -> None:
        node.host_pages = host_pages
        node.state = _BACKING_UP
        self._add_host(node)
        self._refresh(node)

    def finish_backup(self, node: TreeNode) -> None:
        """BACKING_UP -> BOTH: the host copy is complete."""
        self._expect(node, _BACKING_UP)
        node.state = _BOTH
        self._refresh(node)

    def cancel_backup(self, node: TreeNode) -> torch.Tensor:
        """BACKING_UP -> DEVICE; returns the reserved host slots for the caller to free."""
        self._expect(node, _BACKING_UP)
        node.state = _DEVICE
        indices = self._sub_host(node)
        self._refresh(node)
        return indices

    def start_load(self, node: TreeNode, device_indices: torch.Tensor) -> None:
        """HOST -> LOADING: device slots reserved, the H2D copy is about to start.

        Loads go top-down: the parent must already hold device slots (or be a root)."""
        self._expect(node, _HOST)
        parent = node.parent
        assert parent is not None
        if parent.parent is not None and not parent.state.holds_device:
            raise IndexStateError(f"load {node!r} only after its parent {parent!r}")
        check_indices(device_indices, node.num_tokens, "device_indices")
        self._set_device_copy(node, self._to_pages(device_indices, "device_indices"), _LOADING)

    def finish_load(self, node: TreeNode) -> None:
        """LOADING -> BOTH: the device copy is complete."""
        self._expect(node, _LOADING)
        node.state = _BOTH
        self._refresh(node)

    def cancel_load(self, node: TreeNode) -> torch.Tensor:
        """LOADING -> HOST; returns the reserved device slots for the caller to free.

        Cancel bottom-up: a node whose children hold device slots cannot go back to HOST."""
        self._expect(node, _LOADING)
        if node.n_dev_children:
            raise IndexStateError(f"cancel the loads below {node!r} first")
        indices = node.device_indices
        assert indices is not None
        node.device_pages = None
        node.state = _HOST
        if node.device_lock_ref:
            self._dev_protected -= node.num_tokens
        else:
            self._dev_evictable -= node.num_tokens
        parent = node.parent
        assert parent is not None
        parent.n_dev_children -= 1
        self._refresh(parent)
        self._refresh(node)
        return indices

    def drop_host(self, node: TreeNode) -> torch.Tensor:
        """BOTH -> DEVICE (e.g. L2 pressure on a page still on L1); returns the host slots."""
        self._expect(node, _BOTH)
        if node.host_lock_ref:
            raise IndexStateError(f"{node!r} is host-locked")
        node.state = _DEVICE
        indices = self._sub_host(node)
        self._refresh(node)
        return indices

    # ----------------------------------------------------------------------- whole tree

    def clear(self) -> EvictResult:
        """Drop every node (e.g. on a cache flush). Refused while anything is locked.

        Returns all device and host slots for the caller to free, and the removed nodes."""
        if self._dev_protected or self._host_protected:
            raise IndexStateError(
                f"cannot clear: {self._dev_protected} device and {self._host_protected} host "
                "tokens are locked"
            )
        dev: list[torch.Tensor] = []
        host: list[torch.Tensor] = []
        result = EvictResult(self._empty, self._empty_host, self.page_size)
        for root in list(self._roots.values()):
            for child in list(root.children.values()):
                self._remove_subtree(child, dev, host, result)
        result.device_pages = self._cat(dev, self._empty)
        result.host_pages = self._cat(host, self._empty_host)
        result.num_pages = sum(n.num_tokens for n in result.removed) // self.page_size
        return result

    def stats(self) -> dict[str, int]:
        """Counters for metrics (O(1); no tree walk)."""
        return {
            "device_evictable_tokens": self._dev_evictable,
            "device_protected_tokens": self._dev_protected,
            "host_evictable_tokens": self._host_evictable,
            "host_protected_tokens": self._host_protected,
            "device_evictable_leaves": self._dev_heap.size,
            "host_evictable_leaves": self._host_heap.size,
            "namespaces": len(self._roots),
            "nodes_created": self._next_id - 1,
        }

    # ----------------------------------------------------------------------- checks

    def check(self) -> None:
        """Verify every invariant by a full recount; raise :class:`IndexStateError` if broken."""
        from hicache_async.radix.check import check_tree

        check_tree(self)
