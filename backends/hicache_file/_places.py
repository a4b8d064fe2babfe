"""What this process knows of where pages lie: a bounded cache in front of the index.

A read batch looks its pages up here first and asks the index (SQLite) only for the rest: at
hot-read speed the lookup was a tenth of a 256 KiB batch's time. The cache is a hint, never
the truth: ``exists`` always asks the index, and a read through a stale place (a page another
process evicted, its hole punched, or its segment removed) fails the page's check against the
trailer kept with the place, so the reader asks the index again (``Store.settle``) and reads
the page where it lies now, or counts a miss. Wrong bytes are never taken for a page: the
payload's xxh3 must match the trailer, which names the key.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

from hicache_file._index import Location

__all__ = ["Places"]


class Places:
    """Up to ``limit`` places by key digest, oldest dropped first; thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._places: dict[bytes, Location] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._places)

    def split(self, digests: Sequence[bytes]) -> tuple[dict[bytes, Location], list[bytes]]:
        """The known places of ``digests``, and those not known."""
        found: dict[bytes, Location] = {}
        missing: list[bytes] = []
        with self._lock:
            get = self._places.get
            for digest in digests:
                loc = get(digest)
                if loc is None:
                    missing.append(digest)
                else:
                    found[digest] = loc
        return found, missing

    def put(self, places: Iterable[tuple[bytes, Location]]) -> None:
        """Remember ``places``."""
        with self._lock:
            table = self._places
            table.update(places)
            excess = len(table) - self.limit
            if excess > 0:
                for digest in list(table)[:excess]:  # a dict iterates oldest first
                    del table[digest]

    def drop(self, digests: Iterable[bytes]) -> None:
        """Forget ``digests``."""
        with self._lock:
            for digest in digests:
                self._places.pop(digest, None)

    def drop_segments(self, segments: set[int]) -> None:
        """Forget every place in ``segments`` (their files are gone)."""
        if not segments:
            return
        with self._lock:
            gone = [d for d, loc in self._places.items() if loc.seg in segments]
            for digest in gone:
                del self._places[digest]

    def clear(self) -> None:
        """Forget everything."""
        with self._lock:
            self._places.clear()
