"""The radix prefix index: keys, chained page hashes, the tree with tier residency and lock
refs, and the eviction policies.

The tree runs on the event loop thread (synchronous, no locks): :class:`RadixTree`.
"""

from __future__ import annotations

from hicache_async.radix.hashing import hash_pages, page_hashes
from hicache_async.radix.key import (
    TOKEN_BYTES,
    RadixInputError,
    RadixKey,
    check_token_ids,
    tokens_to_bytes,
)
from hicache_async.radix.node import EvictResult, MatchResult, NodeState, Tier, TreeNode
from hicache_async.radix.policy import POLICIES, EvictionStrategy, make_policy
from hicache_async.radix.tiers import RadixTree

__all__ = [
    "POLICIES",
    "TOKEN_BYTES",
    "EvictResult",
    "EvictionStrategy",
    "MatchResult",
    "NodeState",
    "RadixInputError",
    "RadixKey",
    "RadixTree",
    "Tier",
    "TreeNode",
    "check_token_ids",
    "hash_pages",
    "make_policy",
    "page_hashes",
    "tokens_to_bytes",
]
