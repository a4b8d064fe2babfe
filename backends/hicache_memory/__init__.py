"""The memory L3 backend (``memory``): an in-process store with a byte capacity."""

from hicache_memory._backend import MemoryOptions, MemoryStorage
from hicache_memory._store import MemoryStore, drop_named_store, named_store

__all__ = ["MemoryOptions", "MemoryStorage", "MemoryStore", "drop_named_store", "named_store"]
