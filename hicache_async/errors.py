"""The exceptions hicache-async raises.

Every error the library raises on purpose derives from :class:`HiCacheError`, so one
``except HiCacheError`` catches them all. Backends translate their client's exceptions
(``OSError``, ``redis.ConnectionError``, ...) into :class:`StorageError` at the boundary::

    HiCacheError
    ├── ConfigError            a setting is invalid, or settings contradict each other
    ├── LayoutError            a tensor's shape, dtype or device does not fit the KV layout
    ├── CapacityError          a pool has no free pages left for a request that cannot wait
    ├── IndexStateError        a lock, free or tier transition that the index state forbids
    │                          (double free, unlock below zero, foreign page index)
    ├── StorageError           an L3 backend failed (I/O, connection, protocol)
    │   └── CorruptPageError   stored bytes failed their header or checksum check
    ├── TransferError          a copy between tiers failed
    └── ClosedError            the cache, pool or backend was used after it was closed

Timeouts are not errors here: a prefetch that runs out of time keeps what arrived and
reports it in its result, as the cache is allowed to miss. None of these names shadow a
built-in (no ``TimeoutError``, no ``ConnectionError``).
"""

from __future__ import annotations

__all__ = [
    "CapacityError",
    "ClosedError",
    "ConfigError",
    "CorruptPageError",
    "HiCacheError",
    "IndexStateError",
    "LayoutError",
    "StorageError",
    "TransferError",
]


class HiCacheError(Exception):
    """Base class of every error raised by hicache-async."""


class ConfigError(HiCacheError, ValueError):
    """A setting is invalid, or two settings contradict each other.

    Also a :class:`ValueError`, so code that validates input generically still catches it.
    """


class LayoutError(HiCacheError, ValueError):
    """A tensor's shape, dtype or device does not match the KV layout it is used with."""


class CapacityError(HiCacheError):
    """A pool ran out of pages where the caller asked for a guarantee."""


class IndexStateError(HiCacheError):
    """An operation the index or allocator state forbids: a double free, a foreign index,
    an unlock below zero, a transition from the wrong tier state."""


class StorageError(HiCacheError):
    """An L3 storage backend failed. The runtime turns it into a cache miss."""


class CorruptPageError(StorageError):
    """Stored bytes failed their header or checksum check; they are never handed out."""


class TransferError(HiCacheError):
    """A copy between tiers (device <-> host) failed."""


class ClosedError(HiCacheError):
    """The cache, pool or backend was used after it was closed."""
