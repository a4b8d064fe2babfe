"""An in-process page store with a byte capacity, in least-recently-used order.

Touched only on the event loop (no lock). One store can back several backend instances, e.g.
the tensor-parallel ranks of one process, to share an L3 inside a process: pass the same
:class:`MemoryStore` object, or the same ``store`` name (named stores live as long as the process
or until :func:`drop_named_store`).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["MemoryStore", "drop_named_store", "named_store"]


class MemoryStore:
    """Values by key, oldest first; the oldest are dropped above ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self.evicted = 0
        self.evicted_keys: list[str] = []  # since the last take_evicted()
        self._values: OrderedDict[str, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def get(self, key: str) -> bytes | None:
        """The value under ``key`` (now most recently used), or ``None``."""
        value = self._values.get(key)
        if value is not None:
            self._values.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> bool | None:
        """Store ``value`` unless ``key`` exists: ``True`` stored, ``None`` skipped, ``False``
        when it alone exceeds the capacity."""
        if key in self._values:
            self._values.move_to_end(key)
            return None
        if self.capacity_bytes is not None and len(value) > self.capacity_bytes:
            return False
        self._values[key] = value
        self.used_bytes += len(value)
        while self.capacity_bytes is not None and self.used_bytes > self.capacity_bytes:
            gone, old = self._values.popitem(last=False)
            self.used_bytes -= len(old)
            self.evicted += 1
            self.evicted_keys.append(gone)
        return True

    def take_evicted(self) -> list[str]:
        """The keys the capacity dropped since the last call."""
        keys, self.evicted_keys = self.evicted_keys, []
        return keys

    def delete(self, key: str) -> None:
        """Forget ``key``."""
        value = self._values.pop(key, None)
        if value is not None:
            self.used_bytes -= len(value)

    def raw(self, key: str) -> bytes | None:
        """The stored value without touching the order (for tests and tools)."""
        return self._values.get(key)

    def replace_raw(self, key: str, value: bytes) -> None:
        """Overwrite a stored value as is (fault injection in tests)."""
        old = self._values[key]
        self._values[key] = value
        self.used_bytes += len(value) - len(old)

    def keys(self) -> list[str]:
        """Stored keys, oldest first."""
        return list(self._values)

    def clear(self) -> None:
        """Forget everything."""
        self._values.clear()
        self.used_bytes = 0


_NAMED: dict[str, MemoryStore] = {}


def named_store(name: str, capacity_bytes: int | None) -> MemoryStore:
    """The store called ``name``, created with ``capacity_bytes`` on first use."""
    store = _NAMED.get(name)
    if store is None:
        store = _NAMED[name] = MemoryStore(capacity_bytes)
    return store


def drop_named_store(name: str) -> None:
    """Forget the store called ``name`` (its memory goes once no backend uses it)."""
    _NAMED.pop(name, None)
