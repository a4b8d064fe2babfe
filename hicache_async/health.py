"""Failures of background jobs: contained, counted, logged; a tier that keeps failing is
marked degraded.

A background job (a backup copy, an L3 write-back, a release, a best_effort prefetch) serves
no single request, so its failure must not end the cache's task group and with it every
request. Each job runs inside :meth:`Health.contain`: the job has rolled back what it reserved
by the time its exception gets here (reserve -> move -> commit, or rollback), so containing it
is counting it, logging it (the first of each job, then every 100th) and going on. Only a
broken invariant of the index, :class:`~hicache_async.errors.IndexStateError`, escalates.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from hicache_async.errors import IndexStateError

__all__ = ["DEGRADED_AFTER", "JOB_TIERS", "Health"]

log = logging.getLogger("hicache_async")

DEGRADED_AFTER = 8  # consecutive failures of a job before its tier is reported degraded
_LOG_EVERY = 100
# The tier a job's failures say is unusable: backups fail copying to L2, loads to L1, the
# write-back and prefetch talk to L3.
JOB_TIERS = {
    "backup": "host",
    "load": "device",
    "write_back": "storage",
    "release": "storage",
    "prefetch": "storage",
}


class Health:
    """Counts background failures per job and the tiers they leave degraded."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}
        self._streak: dict[str, int] = {}

    @contextmanager
    def contain(self, job: str) -> Iterator[None]:
        """Run a background job's step: an ``Exception`` (not an ``IndexStateError``, not a
        cancellation) is counted and logged instead of raised; success clears the streak."""
        try:
            yield
        except IndexStateError:
            raise
        except Exception as exc:
            self.failed(job, exc)
        else:
            self.succeeded(job)

    def failed(self, job: str, exc: BaseException) -> None:
        """Count one failure of ``job`` (already rolled back by the job itself)."""
        count = self.failures[job] = self.failures.get(job, 0) + 1
        self._streak[job] = self._streak.get(job, 0) + 1
        if count == 1 or count % _LOG_EVERY == 0:
            log.warning(
                "background %s failed (%d so far; the cache goes on): %r",
                job,
                count,
                exc,
                exc_info=count == 1,
            )

    def succeeded(self, job: str) -> None:
        """``job`` ran through: its tier is no longer degraded."""
        self._streak[job] = 0

    @property
    def degraded(self) -> list[str]:
        """Tiers whose jobs failed the last :data:`DEGRADED_AFTER` times in a row, sorted."""
        return sorted(
            {JOB_TIERS.get(job, job) for job, n in self._streak.items() if n >= DEGRADED_AFTER}
        )
