"""The radix tree over token pages: match, insert, split, lock refs, lazy page hashes.

Synchronous by design: the event loop owns it (no locks, no awaits). Keys are int64-LE bytes;
children are keyed by their first page's bytes (``TreeNode.edge``). A node keeps its token ids as
int32 when they fit (half the fresh memory per insert, which dominated its cost), widens them
into a reused buffer to compare a whole span with one ``bytearray.startswith`` (a ``memcmp``), so
neither match nor insert does per-token or per-page Python work. Nodes keep one page index per
page, not one slot per token: inserts take token slots
(whole, in-order pages, as the paged pools hand out) and keep ``slots[::page_size] //
page_size``. Page hashes are computed only when asked for (:meth:`RadixTree.page_hashes`).

Residency invariant: a node that holds device slots (valid or reserved for a load) has a parent
that is a root or holds device slots too. Host-only nodes hang below anything. A match counts
device hits only while nodes are device-valid, so nothing below a loading node is a device hit
until its load finishes.
Eviction and tier transitions live in :mod:`hicache_async.radix.tiers`; this module is the index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np
import torch

from hicache_async.config import EvictionPolicy
from hicache_async.errors import IndexStateError
from hicache_async.radix.hashing import hash_narrow_pages, hash_pages
from hicache_async.radix.key import TOKEN_BYTES, KeyBytes, RadixInputError, RadixKey
from hicache_async.radix.node import MatchResult, NodeState, Tier, TreeNode
from hicache_async.radix.policy import EvictionHeap, make_policy

__all__ = ["RadixTreeBase"]

_I64 = np.dtype("<i8")
_I32 = np.dtype("<i4")
_U64 = np.dtype("<u8")
_I32_MAX = 2**31 - 1
_UMAX = np.maximum.reduce  # ndarray.max goes through a Python-level wrapper
_NO_TOKENS = np.empty(0, dtype=_I32)
_NO_TOKENS.flags.writeable = False
_DEVICE = NodeState.DEVICE
_HOST = NodeState.HOST
_BOTH = NodeState.BOTH
_LOADING = NodeState.LOADING
_REMOVED = NodeState.REMOVED
_DEVICE_VALID = frozenset({NodeState.DEVICE, NodeState.BOTH, NodeState.BACKING_UP})
_HOST_VALID = frozenset({NodeState.HOST, NodeState.BOTH, NodeState.LOADING})


def _frozen(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """``a``, read-only: a node's ids are the index, and readers get the array itself."""
    a.flags.writeable = False
    return a


def _part(tokens: np.ndarray[Any, Any], start: int, stop: int) -> np.ndarray[Any, Any]:
    """``tokens[start:stop]`` for one part of a split node: a view when the part covers at
    least half of the memory ``tokens`` lives in, else a copy. A view keeps that memory alive
    for as long as the part lives, so this bounds what a part can hold beyond its own ids to
    as much again, while the copy made is never the larger part (splits copied both parts,
    ~14% of a request's time at page 1 on the conversation trace)."""
    part = tokens[start:stop]
    owner = tokens if tokens.base is None else tokens.base
    if 2 * part.nbytes >= owner.nbytes:
        return part  # read-only, as a view of a read-only array
    return _frozen(part.copy())


def pages_of(slots: torch.Tensor, page_size: int) -> tuple[torch.Tensor, bool]:
    """The pages of token ``slots`` on any device (torch ops), and whether the slots are whole,
    in-order pages."""
    pages = slots[::page_size] // page_size
    offsets = torch.arange(page_size, dtype=torch.int64, device=slots.device)
    ok = torch.equal(slots.reshape(-1, page_size), pages.unsqueeze(1) * page_size + offsets)
    return pages, ok


def check_indices(indices: object, n_tokens: int, what: str) -> torch.Tensor:
    """``indices`` as a 1-D int64 tensor of ``n_tokens`` slots, or a :class:`RadixInputError`."""
    if not isinstance(indices, torch.Tensor):
        raise RadixInputError(f"{what} must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise RadixInputError(
            f"{what} must be a 1-D int64 tensor, got dtype {indices.dtype} "
            f"shape {tuple(indices.shape)}"
        )
    if indices.numel() != n_tokens:
        raise RadixInputError(f"{what} has {indices.numel()} slots for {n_tokens} tokens")
    return indices


class RadixTreeBase:
    """Index structure and the request path (match, insert, lock). See :class:`RadixTree`."""

    def __init__(
        self,
        page_size: int = 1,
        eviction_policy: EvictionPolicy | str = EvictionPolicy.LRU,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(page_size, int) or page_size <= 0:
            raise RadixInputError(f"page_size must be a positive int, got {page_size!r}")
        self.page_size = page_size
        self._pb = page_size * TOKEN_BYTES  # bytes per page
        # New spans longer than this keep their ids as int32 when they fit (see _own_tokens).
        self.narrow_min_tokens = 512
        self._scratch = np.empty(0, dtype=_I64)  # reused by _to_pages (grown, never shrunk)
        self._ones = b""  # as many int64 ones as the scratch holds
        # Node tokens are widened to int64 here to be compared with a key's bytes by one
        # ``bytearray.startswith`` (a memcmp; grown, never shrunk).
        self._wide_buf = bytearray()
        self._wide = np.frombuffer(self._wide_buf, dtype=_I64)
        self.policy = make_policy(eviction_policy)
        self._next_id = 0
        self._tick = 0  # logical clock: every match/insert is one tick
        self._empty = torch.empty(0, dtype=torch.int64, device=device)
        self._empty_host = torch.empty(0, dtype=torch.int64)
        self._dev_heap = EvictionHeap(self.policy, "dev_seq")
        self._host_heap = EvictionHeap(self.policy, "host_seq")
        # token counts per tier; a node's tokens are protected while its tier's lock ref > 0
        self._dev_evictable = self._dev_protected = 0
        self._host_evictable = self._host_protected = 0
        self._roots: dict[str | None, TreeNode] = {}
        self.root = self._root_for(None)
        # Called after an unlock made device pages evictable, while set: requests waiting
        # for L1 room set it (None otherwise, so the hit path pays one test).
        self.on_device_unlock: Callable[[], None] | None = None

    # ----------------------------------------------------------------------- counters

    def evictable_size(self, tier: Tier = Tier.DEVICE) -> int:
        """Tokens holding slots of ``tier`` with no lock of that tier (O(1))."""
        return self._dev_evictable if tier is Tier.DEVICE else self._host_evictable

    def protected_size(self, tier: Tier = Tier.DEVICE) -> int:
        """Tokens holding slots of ``tier`` under a lock of that tier (O(1))."""
        return self._dev_protected if tier is Tier.DEVICE else self._host_protected

    def total_size(self, tier: Tier = Tier.DEVICE) -> int:
        """Tokens holding slots of ``tier`` (valid or reserved for an in-flight copy)."""
        return self.evictable_size(tier) + self.protected_size(tier)

    # ----------------------------------------------------------------------- nodes

    def _new_node(
        self,
        tokens: np.ndarray[Any, Any],
        edge: bytes,
        parent: TreeNode | None,
        state: NodeState,
        priority: int = 0,
    ) -> TreeNode:
        self._next_id += 1
        return TreeNode(
            self._next_id, tokens, edge, parent, state, self._tick, priority, self.page_size
        )

    def _own_tokens(self, data: KeyBytes, start: int, stop: int) -> np.ndarray[Any, Any]:
        """A new array of the token ids in key bytes ``[start, stop)``: int32 when all are in
        ``[0, 2**31)`` (one reduction to check), else int64. Spans of at most
        ``narrow_min_tokens`` stay int64: the 4 bytes a token saved there cost no page fault,
        and the check and cast cost two numpy calls on every short insert."""
        n = (stop - start) // TOKEN_BYTES
        span = np.frombuffer(data, dtype=_I64, count=n, offset=start)
        if n > self.narrow_min_tokens and int(_UMAX(span.view(_U64))) <= _I32_MAX:
            return _frozen(span.astype(_I32))
        return _frozen(span.copy())

    def _grow_wide(self, n: int) -> None:
        """Make the widening buffer hold at least ``n`` tokens."""
        self._wide = np.empty(0, dtype=_I64)  # drop the view so the buffer can be replaced
        self._wide_buf = bytearray(max(n, 2 * len(self._wide_buf) // TOKEN_BYTES) * TOKEN_BYTES)
        self._wide = np.frombuffer(self._wide_buf, dtype=_I64)

    def _root_for(self, extra_key: str | None) -> TreeNode:
        root = self._roots.get(extra_key)
        if root is None:
            # A root is never evicted or locked; its state is nominal (an empty prefix is on
            # every tier). One root per extra key: namespaces never share a node.
            root = self._new_node(_NO_TOKENS, b"", None, NodeState.BOTH)
            root.extra_key = extra_key
            self._roots[extra_key] = root
        return root

    def _refresh(self, node: TreeNode) -> None:
        """Re-derive ``node``'s membership of the two eviction heaps."""
        st = node.state
        if (
            (st is _DEVICE or st is _BOTH)
            and node.device_lock_ref == 0
            and node.n_dev_children == 0
            and node.parent is not None
        ):
            if not node.dev_seq:
                self._dev_heap.push(node)
        elif node.dev_seq:
            self._dev_heap.discard(node)
        # Either lock keeps a node in the tree: host eviction removes nodes outright.
        if st is _HOST and not (node.host_lock_ref or node.device_lock_ref or node.children):
            if not node.host_seq:
                self._host_heap.push(node)
        elif node.host_seq:
            self._host_heap.discard(node)

    def _common_tokens(
        self, tokens: np.ndarray[Any, Any], data: KeyBytes, off: int, end: int
    ) -> int:
        """Whole-page tokens that ``tokens`` share with the key bytes ``data[off:end]``.

        Work and memory in proportion to the common part, not to the node: chunks of doubling
        size are widened and memcmp'd until one differs, which is then halved down to a few
        tokens for numpy (a node can be far longer than where a key leaves it)."""
        tb = TOKEN_BYTES
        m = min(len(tokens), (end - off) // tb)
        if m > len(self._wide):
            self._grow_wide(m)
        wide, buf = self._wide, self._wide_buf
        lo, step = 0, 256
        while True:
            if lo >= m:
                return m - m % self.page_size
            hi = min(m, lo + step)
            wide[lo:hi] = tokens[lo:hi]
            if not buf.startswith(data[off + lo * tb : off + hi * tb], lo * tb):
                break
            lo, step = hi, 2 * step
        while hi - lo > 64:  # the first difference is in [lo, hi)
            mid = (lo + hi) // 2
            if buf.startswith(data[off + lo * tb : off + mid * tb], lo * tb):
                lo = mid
            else:
                hi = mid
        b = np.frombuffer(data, dtype=_I64, count=hi - lo, offset=off + lo * tb)
        first = lo + int(np.not_equal(wide[lo:hi], b).argmax())
        return first - first % self.page_size

    def _split(self, node: TreeNode, n_tokens: int, lower_leaves: bool = False) -> TreeNode:
        """Cut ``node`` after ``n_tokens`` (page-aligned, inside it); return the new upper part.

        The lower part stays the same object, so references to it (locks held by requests,
        heap entries, children's parent pointers) stay valid. ``lower_leaves``: the caller
        takes the lower part out of the tree at once (eviction), so it keeps a view.
        """
        parent = node.parent
        assert parent is not None
        tokens = node.tokens
        assert 0 < n_tokens < len(tokens)
        upper = self._new_node(
            _part(tokens, 0, n_tokens), node.edge, parent, node.state, node.priority
        )
        upper.created = node.created
        upper.last_access = node.last_access
        upper.hit_count = node.hit_count
        upper.device_lock_ref = node.device_lock_ref
        upper.host_lock_ref = node.host_lock_ref
        upper.written = node.written
        p = n_tokens // self.page_size
        if node.device_pages is not None:
            upper.device_pages = node.device_pages[:p]
            node.device_pages = node.device_pages[p:]
        if node.host_pages is not None:
            upper.host_pages = node.host_pages[:p]
            node.host_pages = node.host_pages[p:]
        if node.hashes is not None:
            upper.hashes, node.hashes = node.hashes[:p], node.hashes[p:]
        parent.children[upper.edge] = upper
        lower = tokens[n_tokens:] if lower_leaves else _part(tokens, n_tokens, len(tokens))
        node.tokens = lower
        node.edge = lower[: self.page_size].astype(_I64).tobytes()
        node.parent = upper
        upper.children[node.edge] = node
        upper.n_dev_children = 1 if node.state.holds_device else 0
        # ``upper`` has a child in its own state, so it is no evictable leaf of either tier.
        return upper

    def _touch(self, node: TreeNode, tick: int) -> None:
        node.last_access = tick
        if node.dev_seq:  # re-file under the new key (policies order by access time)
            self._dev_heap.push(node)
        if node.host_seq:
            self._host_heap.push(node)

    # ----------------------------------------------------------------------- request path

    def match_prefix(self, key: RadixKey) -> MatchResult:
        """The longest cached whole-page prefix of ``key``; splits a node where the match ends
        inside it, and refreshes access time and hit count along the matched path."""
        pb = self._pb
        data = memoryview(key.data)  # slices below are views, never copies
        end = len(data) // pb * pb
        root = self._roots.get(key.extra_key)
        if root is None or not end:
            r = root or self.root
            return MatchResult(self._empty, r, r, 0, self.page_size)
        self._tick += 1
        tick = self._tick
        node = last_dev = last_host = root
        off = host_bytes = 0
        dev: list[torch.Tensor] = []
        on_device = True
        while off < end:
            child = node.children.get(bytes(data[off : off + pb]))
            if child is None:
                break
            ck = child.tokens
            nb = len(ck) * TOKEN_BYTES
            cut = nb > end - off
            if not cut:  # widen the node's ids next to the key's, then one memcmp
                if nb > len(self._wide_buf):
                    self._grow_wide(len(ck))
                self._wide[: len(ck)] = ck
                cut = not self._wide_buf.startswith(data[off : off + nb])
            if cut:
                child = self._split(child, self._common_tokens(ck, data, off, end))
                ck = child.tokens
            child.hit_count += 1
            if child.dev_seq or child.host_seq:
                self._touch(child, tick)
            else:
                child.last_access = tick
            st = child.state
            if on_device and st in _DEVICE_VALID:
                dev.append(child.device_pages)  # type: ignore[arg-type]
                last_dev = last_host = child
            elif st in _HOST_VALID:
                on_device = False
                host_bytes += len(ck) * TOKEN_BYTES
                last_host = child
            else:
                break
            off += len(ck) * TOKEN_BYTES
            node = child
            if cut:
                break
        if not dev:
            pages = self._empty
        elif len(dev) == 1:
            pages = dev[0]
        else:
            pages = torch.cat(dev)
        return MatchResult(pages, last_dev, last_host, host_bytes // TOKEN_BYTES, self.page_size)

    def find(self, key: RadixKey) -> TreeNode:
        """The deepest node whose whole path is a prefix of ``key``'s whole pages (a root when
        there is none), whatever the nodes' tiers. Read-only: no split,
        no access time, no hit count (what announcing an insert needs: it is no use of the KV).
        """
        pb = self._pb
        data = memoryview(key.data)
        end = len(data) // pb * pb
        node = self._roots.get(key.extra_key) or self.root
        off = 0
        while off < end:
            child = node.children.get(bytes(data[off : off + pb]))
            if child is None:
                break
            nb = len(child.tokens) * TOKEN_BYTES
            if nb > end - off or not self._same_ids(child.tokens, data, off):
                break
            off += nb
            node = child
        return node

    def device_path(self, key: RadixKey) -> tuple[torch.Tensor, TreeNode]:
        """The device pages of ``key``'s longest prefix of whole nodes that L1 holds, and the
        node it ends at. Read-only, like :meth:`find` (a session's own commit reads back the
        page table the tree now holds: no use of the KV, no hit)."""
        pb = self._pb
        data = memoryview(key.data)
        end = len(data) // pb * pb
        node = self._roots.get(key.extra_key) or self.root
        off = 0
        pages: list[torch.Tensor] = []
        while off < end:
            child = node.children.get(bytes(data[off : off + pb]))
            if child is None or child.state not in _DEVICE_VALID:
                break
            nb = len(child.tokens) * TOKEN_BYTES
            if nb > end - off or not self._same_ids(child.tokens, data, off):
                break
            pages.append(child.device_pages)  # type: ignore[arg-type]
            off += nb
            node = child
        if not pages:
            return self._empty, node
        return (pages[0] if len(pages) == 1 else torch.cat(pages)), node

    def _same_ids(self, tokens: np.ndarray[Any, Any], data: memoryview, off: int) -> bool:
        """Whether a node's ``tokens`` equal the key bytes from ``off`` on: widened to int64
        in the reused buffer, then one memcmp (exact for int32 and int64 nodes alike).
        match_prefix and the insert walk inline this: a call costs ~0.1 µs a node there."""
        n = len(tokens)
        if n * TOKEN_BYTES > len(self._wide_buf):
            self._grow_wide(n)
        self._wide[:n] = tokens
        return self._wide_buf.startswith(data[off : off + n * TOKEN_BYTES])

    def _walk_for_insert(
        self, key: RadixKey, priority: int, *, device: bool = True
    ) -> tuple[TreeNode, int, int, list[tuple[TreeNode, int]]]:
        """Follow ``key`` down, splitting where it diverges inside a node.

        Returns (deepest matched node, matched bytes, aligned end, and the host-only nodes
        passed with the byte offset where each starts). A ``device`` insert stops above a
        ``LOADING`` node and returns the aligned end as matched (see :meth:`insert`)."""
        pb = self._pb
        data = memoryview(key.data)  # slices below are views, never copies
        end = len(data) // pb * pb
        node = self._root_for(key.extra_key)
        self._tick += 1
        tick = self._tick
        off = 0
        host_only: list[tuple[TreeNode, int]] = []
        while off < end:
            child = node.children.get(bytes(data[off : off + pb]))
            if child is None:
                break
            if device and child.state is _LOADING:
                # A load is moving it to L1 and may yet roll back to HOST, which it could not
                # do with device pages below it: the rest of the key is left to the load.
                return node, end, end, []
            ck = child.tokens
            nb = len(ck) * TOKEN_BYTES
            cut = nb > end - off
            if not cut:  # as in match_prefix
                if nb > len(self._wide_buf):
                    self._grow_wide(len(ck))
                self._wide[: len(ck)] = ck
                cut = not self._wide_buf.startswith(data[off : off + nb])
            if cut:
                child = self._split(child, self._common_tokens(ck, data, off, end))
                ck = child.tokens
            if priority > child.priority:
                child.priority = priority
            self._touch(child, tick)
            if child.state is _HOST:
                host_only.append((child, off))
            off += len(ck) * TOKEN_BYTES
            node = child
        return node, off, end, host_only

    def _attach(self, parent: TreeNode, child: TreeNode) -> None:
        parent.children[child.edge] = child
        if child.state.holds_device:
            parent.n_dev_children += 1
        self._refresh(parent)
        self._refresh(child)

    def insert(
        self, key: RadixKey, device_indices: torch.Tensor, priority: int = 0, *, copy: bool = True
    ) -> int:
        """Insert ``key``'s whole pages with their device slots (one per token of ``key``).

        Slots of whole pages must be whole, in-order pages of the pool (``page * page_size +
        offset``); the tree keeps one page index per page. Returns the number of leading tokens
        whose device copy was already cached: the caller frees its own duplicate slots for them
        (and the slots of a partial last page). Host-only nodes on the path adopt the caller's
        slots (the KV was recomputed) and become BOTH; new nodes are DEVICE. Where the key
        passes a node a load is moving to L1 (``LOADING``), the insert stops: that node and the
        rest count as cached. ``copy=False`` (page
        size 1) keeps views of ``device_indices`` instead of copies: for a caller that hands over
        a tensor it never writes again (a fresh allocation). Larger pages always keep a new
        tensor of page indices.
        """
        check_indices(device_indices, len(key), "device_indices")
        return self._insert(key, priority, device_indices, True, copy)

    def insert_pages(self, key: RadixKey, device_pages: torch.Tensor, priority: int = 0) -> int:
        """:meth:`insert` for a caller that holds the page table already: ``key`` is whole
        pages and ``device_pages`` has one device page index per page (int64, 1-D, on the
        tree's device). Nothing is converted or checked beyond the shape, and the tree keeps
        views of ``device_pages``: hand over a tensor that is never written again (the pages
        an allocator returned, or a concatenation made for the call)."""
        size = self.page_size
        if len(key) % size:
            raise RadixInputError(f"insert_pages takes whole pages: {len(key)} tokens, page {size}")
        check_indices(device_pages, len(key) // size, "device_pages")
        return self._insert(key, priority, device_pages, False, False)

    def _insert(
        self, key: RadixKey, priority: int, src: torch.Tensor, per_token: bool, copy: bool
    ) -> int:
        """The body of both inserts. ``src`` holds a slot per token (``per_token``: checked and
        converted to pages) or a page per page (kept as views)."""
        node, off, end, host_only = self._walk_for_insert(key, priority)
        cached = host_only[0][1] if host_only else off
        adopt = []  # converted (and checked) before anything changes state
        for h, start in host_only:
            stop = start + h.num_tokens * TOKEN_BYTES
            adopt.append((h, self._span_pages(src, per_token, copy, start, stop)))
        pages = self._span_pages(src, per_token, copy, off, end) if off < end else None
        for h, h_pages in adopt:  # the KV was recomputed: keep the caller's copy
            self._set_device_copy(h, h_pages)
        if pages is not None:
            data = key.data
            edge = bytes(data[off : off + self._pb])
            new = self._new_node(self._own_tokens(data, off, end), edge, node, _DEVICE, priority)
            new.device_pages = pages
            self._dev_evictable += new.num_tokens
            self._attach(node, new)
        return cached // TOKEN_BYTES

    def _span_pages(
        self, src: torch.Tensor, per_token: bool, copy: bool, start: int, stop: int
    ) -> torch.Tensor:
        """The pages of the key bytes ``[start, stop)`` in a tensor the tree may keep (or a
        :class:`RadixInputError` before anything changed)."""
        if not per_token:
            return src[start // self._pb : stop // self._pb]
        a, b = start // TOKEN_BYTES, stop // TOKEN_BYTES
        if src.device.type == "cpu" and (copy or self.page_size > 1):
            return self._own_pages_np(src.numpy()[a:b], "device_indices")  # numpy slices
        return self._own_pages(src[a:b], copy, "device_indices")  # are cheaper than torch's

    def _own_pages(self, slots: torch.Tensor, copy: bool, what: str) -> torch.Tensor:
        """The page indices of ``slots`` in a tensor the tree owns (``copy``) or a view."""
        if slots.device.type == "cpu" and (copy or self.page_size > 1):
            return self._own_pages_np(slots.numpy(), what)
        if self.page_size > 1:
            return self._to_pages(slots, what)  # a new tensor already
        return slots.clone() if copy else slots

    def _own_pages_np(self, flat: np.ndarray[Any, Any], what: str) -> torch.Tensor:
        """:meth:`_own_pages` of CPU slots, always a new tensor."""
        if self.page_size > 1:
            return self._to_pages_np(flat, what)
        # At page 1 a page is a token: int32 halves what the tree stores (fresh memory costs
        # page faults); slots that do not fit stay int64. One reduction checks the range:
        # negatives are huge as unsigned.
        if flat.size and int(_UMAX(flat.view(_U64))) <= _I32_MAX:
            return torch.from_numpy(flat.astype(_I32))  # timed faster than torch's .to
        return torch.from_numpy(flat.copy())

    def _to_pages(self, slots: torch.Tensor, what: str) -> torch.Tensor:
        """The page indices of token ``slots`` (whole pages, each in order), or a
        :class:`RadixInputError`. Vectorised, no per-token Python work, and on CPU no
        temporary as long as ``slots``: fresh memory costs page faults, which dominated."""
        size = self.page_size
        if size == 1 or not slots.numel():
            return slots
        if slots.device.type == "cpu":
            return self._to_pages_np(slots.numpy(), what)
        pages, ok = pages_of(slots, size)
        if not ok:
            self._not_pages(what)
        return pages

    def _not_pages(self, what: str) -> NoReturn:
        size = self.page_size
        raise RadixInputError(
            f"{what} must be whole pages of {size} slots, each in order from a multiple "
            f"of {size} (as the paged pools allocate them)"
        )

    def _to_pages_np(self, flat: np.ndarray[Any, Any], what: str) -> torch.Tensor:
        """:meth:`_to_pages` of CPU slots (page size > 1): a new tensor."""
        size = self.page_size
        n = flat.size
        if not n:
            return torch.from_numpy(flat.copy())
        first = flat[::size]
        if len(self._scratch) < n:
            grown = max(n, 2 * len(self._scratch))
            self._scratch = np.empty(grown, dtype=_I64)
            self._ones = np.ones(grown, dtype=_I64).tobytes()
        steps = self._scratch[: n - 1]
        np.subtract(flat[1:], flat[:-1], out=steps)  # 1 inside a page, any across pages
        steps[size - 1 :: size] = 1
        ok = self._ones.startswith(steps.data)  # all 1: one memcmp
        if size & (size - 1) == 0:  # a power of two: shift and mask
            shift = size.bit_length() - 1
            ok = ok and not int(np.bitwise_or.reduce(first)) & (size - 1)
            pages = torch.from_numpy(first >> shift)
        else:
            ok = ok and not (first % size).any()
            pages = torch.from_numpy(first // size)
        if not ok:
            self._not_pages(what)
        return pages

    def insert_host(
        self, key: RadixKey, host_indices: torch.Tensor, priority: int = 0, *, copy: bool = True
    ) -> int:
        """Insert pages that arrived on host (from L3). Returns the tokens already in the tree
        (any tier): the caller frees its duplicate host slots for them."""
        check_indices(host_indices, len(key), "host_indices")
        node, off, end, _ = self._walk_for_insert(key, priority, device=False)
        if off < end:
            part = host_indices[off // TOKEN_BYTES : end // TOKEN_BYTES]
            pages = self._own_pages(part, copy, "host_indices")
            data = key.data
            edge = bytes(data[off : off + self._pb])
            new = self._new_node(self._own_tokens(data, off, end), edge, node, _HOST, priority)
            new.host_pages = pages
            self._host_evictable += new.num_tokens
            self._attach(node, new)
        return off // TOKEN_BYTES

    def _set_device_copy(
        self, node: TreeNode, device_pages: torch.Tensor, state: NodeState = _BOTH
    ) -> None:
        """HOST -> ``state`` (BOTH: the KV was recomputed; LOADING: a load reserved the
        pages) with ``device_pages`` (validated by the caller)."""
        node.device_pages = device_pages
        node.state = state
        n = node.num_tokens
        if node.device_lock_ref:
            self._dev_protected += n
        else:
            self._dev_evictable += n
        parent = node.parent
        assert parent is not None
        parent.n_dev_children += 1
        self._refresh(parent)
        self._refresh(node)

    # ----------------------------------------------------------------------- lock refs

    def _check_live(self, node: TreeNode) -> None:
        if node.state is _REMOVED:
            raise IndexStateError(f"{node!r} was removed from the tree")

    def lock(self, node: TreeNode) -> None:
        """Protect the device copy of ``node`` and its ancestors from eviction."""
        self._check_live(node)
        x = node
        while x.parent is not None:
            if x.device_lock_ref == 0:
                if x.state.holds_device:
                    n = x.num_tokens
                    self._dev_evictable -= n
                    self._dev_protected += n
                if x.dev_seq:
                    self._dev_heap.discard(x)
                if x.host_seq:
                    self._host_heap.discard(x)
            x.device_lock_ref += 1
            x = x.parent

    def unlock(self, node: TreeNode) -> None:
        """Undo one :meth:`lock`; below zero is an :class:`IndexStateError` (nothing changes)."""
        x = node
        while x.parent is not None:
            if x.device_lock_ref <= 0:
                raise IndexStateError(f"device unlock below zero at {x!r} (from {node!r})")
            x = x.parent
        x = node
        while x.parent is not None:
            x.device_lock_ref -= 1
            if x.device_lock_ref == 0:
                if x.state.holds_device:
                    n = x.num_tokens
                    self._dev_evictable += n
                    self._dev_protected -= n
                if x.state is not _REMOVED:
                    self._refresh(x)
            x = x.parent
        if self.on_device_unlock is not None and node.device_lock_ref == 0:
            self.on_device_unlock()

    def lock_host(self, node: TreeNode) -> None:
        """Protect the host copy of ``node`` and its ancestors from host eviction."""
        self._check_live(node)
        x = node
        while x.parent is not None:
            if x.host_lock_ref == 0:
                if x.state.holds_host:
                    n = x.num_tokens
                    self._host_evictable -= n
                    self._host_protected += n
                if x.host_seq:
                    self._host_heap.discard(x)
            x.host_lock_ref += 1
            x = x.parent

    def unlock_host(self, node: TreeNode) -> None:
        """Undo one :meth:`lock_host`; below zero is an :class:`IndexStateError`."""
        x = node
        while x.parent is not None:
            if x.host_lock_ref <= 0:
                raise IndexStateError(f"host unlock below zero at {x!r} (from {node!r})")
            x = x.parent
        x = node
        while x.parent is not None:
            x.host_lock_ref -= 1
            if x.host_lock_ref == 0:
                if x.state.holds_host:
                    n = x.num_tokens
                    self._host_evictable += n
                    self._host_protected -= n
                if x.state is not _REMOVED:
                    self._refresh(x)
            x = x.parent

    # ----------------------------------------------------------------------- paths, hashes

    def path(self, node: TreeNode) -> list[TreeNode]:
        """The nodes from the root's child down to ``node`` (empty for a root)."""
        out: list[TreeNode] = []
        x = node
        while x.parent is not None:
            out.append(x)
            x = x.parent
        out.reverse()
        return out

    def namespace(self, node: TreeNode) -> str | None:
        x = node
        while x.parent is not None:
            x = x.parent
        return x.extra_key

    def path_key(self, node: TreeNode) -> RadixKey:
        """The whole prefix that ends at ``node``, as a key."""
        return RadixKey(b"".join(n.key for n in self.path(node)), self.namespace(node))

    def page_hashes(self, node: TreeNode) -> list[str]:
        """Chained SHA-256 hex hashes of ``node``'s own pages (computed once, then cached)."""
        if node.hashes is not None:
            return node.hashes
        todo: list[TreeNode] = []
        x = node
        while x.parent is not None and x.hashes is None:
            todo.append(x)
            x = x.parent
        prev: str | None = None
        extra: str | None = None
        if x.parent is None:
            extra = x.extra_key
        else:
            prev = x.hashes[-1] if x.hashes else None
        for n in reversed(todo):
            ext = extra if prev is None else None
            if n.tokens.dtype == _I32:  # already narrowed: hash the bytes as they are
                n.hashes = hash_narrow_pages(n.tokens.tobytes(), self.page_size, ext, prev)
            else:
                n.hashes = hash_pages(n.key, self.page_size, ext, prev)
            prev = n.hashes[-1]
        return node.hashes or []

    def path_hashes(self, node: TreeNode) -> list[str]:
        """The hashes of every page from the root down to ``node``."""
        self.page_hashes(node)
        out: list[str] = []
        for n in self.path(node):
            out.extend(n.hashes or ())
        return out
