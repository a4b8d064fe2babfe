"""hicache-async: an asyncio-native runtime for the hierarchical KV cache of LLM serving.

A radix tree indexes token prefixes; their KV data lives in three tiers (L1 device, L2 host,
L3 storage), and every move between tiers is an async task on the caller's event loop.
"""

from __future__ import annotations

from hicache_async._version import __version__
from hicache_async.cache import CacheState, HiCache
from hicache_async.config import (
    EvictionPolicy,
    HiCacheConfig,
    HostLayout,
    IOBackend,
    KVEventsConfig,
    PrefetchPolicy,
    WritePolicy,
)
from hicache_async.errors import (
    CapacityError,
    ClosedError,
    ConfigError,
    CorruptPageError,
    HiCacheError,
    IndexStateError,
    LayoutError,
    StorageError,
    TransferError,
)
from hicache_async.layout import KVLayout
from hicache_async.session import Hit, Session

__all__ = [
    "CacheState",
    "CapacityError",
    "ClosedError",
    "ConfigError",
    "CorruptPageError",
    "EvictionPolicy",
    "HiCache",
    "HiCacheConfig",
    "HiCacheError",
    "Hit",
    "HostLayout",
    "IOBackend",
    "IndexStateError",
    "KVEventsConfig",
    "KVLayout",
    "LayoutError",
    "PrefetchPolicy",
    "Session",
    "StorageError",
    "TransferError",
    "WritePolicy",
    "__version__",
]
