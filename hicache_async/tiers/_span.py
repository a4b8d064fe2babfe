"""The nodes a reserved span became after splits."""

from __future__ import annotations

from hicache_async.radix import TreeNode

__all__ = ["span_chain"]


def span_chain(node: TreeNode, tokens: int) -> list[TreeNode]:
    """``node`` and the ancestors that, with it, cover the last ``tokens`` tokens of its path,
    top-down.

    A transition reserves a node's span; while its copy runs an insert may split the node. The
    split keeps the node object as the lower part and puts the upper part above it in the same
    state, so walking up from the node recovers the whole span.
    """
    chain: list[TreeNode] = []
    covered = 0
    x: TreeNode | None = node
    while covered < tokens and x is not None and x.parent is not None:
        chain.append(x)
        covered += x.num_tokens
        x = x.parent
    chain.reverse()
    return chain
