"""The capacity index of the file backend: page files in least-recently-used order.

Kept in memory and touched only on the event loop. It is built once, lazily, by one scan of
the store in a worker thread (files ordered by mtime), and never scanned again: every later
write, hit and removal updates it in O(1).
"""

from __future__ import annotations

import os
from collections import OrderedDict

__all__ = ["LruIndex", "scan_store"]


class LruIndex:
    """Sizes of page files by path, oldest first."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._sizes: OrderedDict[str, int] = OrderedDict()
        self.keys: dict[str, str] = {}  # path -> key, for pages this process wrote

    def __len__(self) -> int:
        return len(self._sizes)

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


def scan_store(root: str) -> list[tuple[float, str, int]]:
    """``(mtime, path, size)`` of every page file under ``root`` (blocking; run in a thread)."""
    found = []
    for top, _dirs, files in os.walk(root):
        for name in files:
            if not name.endswith(".kv"):
                continue
            path = os.path.join(top, name)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            found.append((st.st_mtime, path, st.st_size))
    found.sort()
    return found
