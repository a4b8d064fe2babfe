"""Building KV events from tree nodes (only when someone listens: hashes cost SHA-256)."""

from __future__ import annotations

import numpy as np

from hicache_async.events import BlockRemoved, BlockStored, StorageMedium
from hicache_async.radix import TOKEN_BYTES, RadixTree, TreeNode

__all__ = ["removed_event", "stored_event", "token_list"]

_TOKEN = np.dtype(f"<i{TOKEN_BYTES}")


def token_list(data: bytes | memoryview) -> list[int]:
    """Token ids of radix key bytes, as Python ints (for events only)."""
    ids: list[int] = np.frombuffer(data, dtype=_TOKEN).tolist()
    return ids


def stored_event(tree: RadixTree, node: TreeNode, medium: StorageMedium) -> BlockStored:
    """``BlockStored`` for every page of ``node``, chained to its parent's last page."""
    parent = node.parent
    parent_hash = None
    if parent is not None and parent.parent is not None:
        parent_hashes = tree.page_hashes(parent)
        parent_hash = parent_hashes[-1] if parent_hashes else None
    return BlockStored(
        block_hashes=tuple(tree.page_hashes(node)),
        parent_block_hash=parent_hash,
        token_ids=tuple(token_list(node.key)),
        block_size=tree.page_size,
        medium=medium,
        extra_key=tree.namespace(node),
    )


def removed_event(tree: RadixTree, nodes: list[TreeNode], medium: StorageMedium) -> BlockRemoved:
    """One ``BlockRemoved`` for the pages of ``nodes``."""
    return BlockRemoved(tuple(h for node in nodes for h in tree.page_hashes(node)), medium)
