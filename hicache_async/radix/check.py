"""The invariant checker behind :meth:`RadixTree.check` (tests call it after every step).

A full recount: O(tree size), never used on a hot path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from hicache_async.errors import IndexStateError
from hicache_async.radix.node import NodeState, TreeNode

if TYPE_CHECKING:
    from hicache_async.radix.tiers import RadixTree

__all__ = ["check_tree"]


def _fail(msg: str) -> None:
    raise IndexStateError(f"radix tree invariant broken: {msg}")


def _check_node(tree: RadixTree, x: TreeNode, pb: int) -> None:
    parent = x.parent
    assert parent is not None
    n = x.num_tokens
    st = x.state
    if st is NodeState.REMOVED:
        _fail(f"{x!r} is REMOVED but still in the tree")
    tokens = x.tokens
    if tokens.dtype not in (np.int32, np.int64) or tokens.ndim != 1:
        _fail(f"{x!r} tokens have dtype {tokens.dtype} and shape {tokens.shape}")
    if tokens.dtype == np.int32 and tokens.size and int(tokens.min()) < 0:
        _fail(f"{x!r} keeps negative token ids as int32")
    if tokens.flags.writeable:
        _fail(f"{x!r} tokens are writeable")
    owner = tokens.base
    if owner is not None and 2 * tokens.nbytes < owner.nbytes:
        _fail(f"{x!r} keeps {owner.nbytes} bytes alive for {tokens.nbytes} bytes of ids")
    if not n or n % tree.page_size:
        _fail(f"{x!r} has {n} tokens, not whole pages of {tree.page_size}")
    if x.edge != x.key[:pb]:
        _fail(f"{x!r} edge is not the bytes of its first page")
    if parent.children.get(x.edge) is not x:
        _fail(f"{x!r} is not filed under its first page in its parent {parent!r}")
    for tier, idx, holds in (
        ("device", x.device_pages, st.holds_device),
        ("host", x.host_pages, st.holds_host),
    ):
        if holds != (idx is not None):
            _fail(f"{x!r} in state {st.name} has {tier}_pages={'set' if idx is not None else None}")
        pages = n // tree.page_size
        bad_dtype = idx is not None and idx.dtype not in (torch.int64, torch.int32)
        if idx is not None and (bad_dtype or idx.dim() != 1 or idx.numel() != pages):
            _fail(
                f"{x!r} {tier}_pages shape {tuple(idx.shape)} dtype {idx.dtype} for {pages} pages"
            )
    if x.device_lock_ref < 0 or x.host_lock_ref < 0:
        _fail(f"{x!r} has a negative lock ref")
    if parent.parent is not None:
        if parent.device_lock_ref < x.device_lock_ref or parent.host_lock_ref < x.host_lock_ref:
            _fail(f"{x!r} is locked more than its parent {parent!r}")
        # device slots only below device slots (a loading parent's are reserved, and an
        # insert may pass through it with KV it recomputed)
        if st.holds_device and not parent.state.holds_device:
            _fail(f"{x!r} holds device slots under {parent!r}")
    dev_children = sum(1 for c in x.children.values() if c.state.holds_device)
    if dev_children != x.n_dev_children:
        _fail(f"{x!r} counts {x.n_dev_children} device children, has {dev_children}")
    if x.hashes is not None and len(x.hashes) != n // tree.page_size:
        _fail(f"{x!r} caches {len(x.hashes)} hashes for {n // tree.page_size} pages")
    dev_ok = (
        st in (NodeState.DEVICE, NodeState.BOTH)
        and x.device_lock_ref == 0
        and x.n_dev_children == 0
    )
    host_ok = st is NodeState.HOST and not (x.host_lock_ref or x.device_lock_ref or x.children)
    if dev_ok != bool(x.dev_seq):
        _fail(f"{x!r} device-heap membership {bool(x.dev_seq)}, expected {dev_ok}")
    if host_ok != bool(x.host_seq):
        _fail(f"{x!r} host-heap membership {bool(x.host_seq)}, expected {host_ok}")


def check_tree(tree: RadixTree) -> None:
    """Raise :class:`IndexStateError` naming the first broken invariant."""
    pb = tree._pb
    sizes = {"dev_e": 0, "dev_p": 0, "host_e": 0, "host_p": 0}
    dev_idx: list[torch.Tensor] = []
    host_idx: list[torch.Tensor] = []
    dev_members: set[int] = set()
    host_members: set[int] = set()
    for extra, root in tree._roots.items():
        if root.parent is not None or root.num_tokens or root.edge or root.extra_key != extra:
            _fail(f"root {root!r} for extra key {extra!r} is malformed")
        if root.device_lock_ref or root.host_lock_ref or root.dev_seq or root.host_seq:
            _fail(f"root {root!r} is locked or evictable")
        stack = list(root.children.values())
        while stack:
            x = stack.pop()
            stack.extend(x.children.values())
            _check_node(tree, x, pb)
            n = x.num_tokens
            if x.device_pages is not None:
                dev_idx.append(x.device_pages)
                sizes["dev_p" if x.device_lock_ref else "dev_e"] += n
            if x.host_pages is not None:
                host_idx.append(x.host_pages)
                sizes["host_p" if x.host_lock_ref else "host_e"] += n
            if x.dev_seq:
                dev_members.add(id(x))
            if x.host_seq:
                host_members.add(id(x))
    have = {
        "dev_e": tree._dev_evictable,
        "dev_p": tree._dev_protected,
        "host_e": tree._host_evictable,
        "host_p": tree._host_protected,
    }
    if have != sizes:
        _fail(f"size counters {have} != recount {sizes}")
    for tier, parts in (("device", dev_idx), ("host", host_idx)):
        if parts:
            allidx = torch.cat(parts)
            if torch.unique(allidx).numel() != allidx.numel():
                _fail(f"a {tier} page is owned by more than one node")
    for name, heap, members in (
        ("device", tree._dev_heap, dev_members),
        ("host", tree._host_heap, host_members),
    ):
        live = {id(n) for n in heap.members()}
        if heap.size != len(members) or live != members:
            _fail(
                f"{name} heap holds {len(live)} live entries (size {heap.size}), tree has "
                f"{len(members)} evictable leaves"
            )
