"""Counters a backend keeps, and the log-once rule for its errors."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["StorageStats"]

logger = logging.getLogger("hicache_async.storage")


@dataclass
class StorageStats:
    """Counters of one backend instance since it opened. ``errors`` counts by kind
    (``corrupt``, ``io``, ``nospace``, ``connection``, ``timeout``, ...)."""

    backend: str = ""
    get_pages: int = 0
    get_hits: int = 0
    set_pages: int = 0
    set_written: int = 0
    set_skipped: int = 0
    set_failed: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evicted_pages: int = 0
    # Worker threads a cancelled call left running past the grace period (stuck in a blocking
    # call: a FIFO, a hung mount), and how many of them are still running: each holds a token
    # of the backend's thread limiter and keeps the pages it may write reserved until it returns.
    threads_left_behind: int = 0
    threads_stuck: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    _logged: set[str] = field(default_factory=set, repr=False, compare=False)

    @property
    def error_count(self) -> int:
        """All errors of every kind."""
        return sum(self.errors.values())

    def record_error(self, kind: str, exc: BaseException | str, *, count: int = 1) -> None:
        """Count ``count`` errors of ``kind``; log the first of each kind only (a failing disk
        or a dead server would otherwise flood the log once per page)."""
        self.errors[kind] = self.errors.get(kind, 0) + count
        if kind not in self._logged:
            self._logged.add(kind)
            logger.warning(
                "%s storage: %s error (%s); counted as misses, further ones are not logged",
                self.backend or "L3",
                kind,
                exc,
            )

    def thread_left_behind(self) -> None:
        """Count a worker thread left behind (on the loop, like every count); log the first."""
        self.threads_left_behind += 1
        self.threads_stuck += 1
        if "thread_left_behind" not in self._logged:
            self._logged.add("thread_left_behind")
            logger.warning(
                "%s storage: a worker thread is stuck in a blocking call; the request moved on, "
                "its pages stay reserved until it returns (threads_stuck in the stats); "
                "further ones are not logged",
                self.backend or "L3",
            )

    def thread_returned(self) -> None:
        """A thread left behind has returned."""
        self.threads_stuck -= 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot."""
        data = asdict(self)
        data.pop("_logged", None)
        data["error_count"] = self.error_count
        return data
