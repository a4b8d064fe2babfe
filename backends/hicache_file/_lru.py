"""The capacity index of the file backend: page files in least-recently-used order.

Kept in memory and touched only on the event loop. It is filled once from the survey (one
walk of the store in its own thread, files ordered by mtime), and the store is never walked
again: every later write, hit, removal and page found gone updates it in O(1).
"""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["LruIndex"]


class LruIndex:
    """Sizes of page files by path, oldest first."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.keys: dict[str, str] = {}  # path -> key, for pages this process wrote

    def __len__(self) -> int:
        return len(self._sizes)

    def fill(self, sizes: OrderedDict[str, int], used_bytes: int) -> None:
        """Take ``sizes`` (oldest first, ``used_bytes`` in all) before what is known already,
        which is more recent."""
        for path, size in self._sizes.items():
            old = sizes.pop(path, None)
            used_bytes += size - (old or 0)
            sizes[path] = size
        self._sizes = sizes
        self.used_bytes = used_bytes

    def touch(self, path: str, size: int) -> None:
        """Mark ``path`` most recently used (adding it when unknown)."""
        old = self._sizes.pop(path, None)
        if old is not None:
            self.used_bytes -= old
        self._sizes[path] = size
        self.used_bytes += size

    def discard(self, path: str) -> None:
        """Forget ``path``."""
        size = self._sizes.pop(path, None)
        self.keys.pop(path, None)
        if size is not None:
            self.used_bytes -= size

    def over_capacity(self) -> list[str]:
        """Remove and return the oldest paths until the rest fits the capacity."""
        victims = []
        while self.used_bytes > self.capacity_bytes and self._sizes:
            path, size = self._sizes.popitem(last=False)
            self.used_bytes -= size
            victims.append(path)
        return victims

    def clear(self) -> None:
        """Forget everything."""
        self._sizes.clear()
        self.keys.clear()
        self.used_bytes = 0
