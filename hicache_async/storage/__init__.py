"""L3 storage: the async ``HiCacheStorage`` contract, its config, and the backend registry.

Backends (``file``, ``memory``, ``redis``, third-party ones) are found by name through the
entry-point group ``hicache_async.storage_backends``; see :func:`create_storage`.
"""

from hicache_async.storage._base import (
    HiCacheStorage,
    NoOptions,
    PageBuffer,
    StorageState,
    error_kind,
)
from hicache_async.storage._config import (
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    namespace_suffix,
)
from hicache_async.storage._registry import ENTRY_POINT_GROUP, available_backends, create_storage
from hicache_async.storage._stats import StorageStats
from hicache_async.storage.blob import BlobStorage
from hicache_async.storage.codec import PageCodec

__all__ = [
    "ENTRY_POINT_GROUP",
    "BlobStorage",
    "HiCacheStorage",
    "HiCacheStorageConfig",
    "HiCacheStorageExtraInfo",
    "NoOptions",
    "PageBuffer",
    "PageCodec",
    "StorageState",
    "StorageStats",
    "available_backends",
    "create_storage",
    "error_kind",
    "namespace_suffix",
]
