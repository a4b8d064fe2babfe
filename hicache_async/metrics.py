"""The cache's numbers: live counters the runtime bumps, and JSON-ready snapshots of them.

The runtime owns one :class:`Counters` and bumps plain integer fields on the event loop thread
(cheap: no locks, no allocation). ``cache.stats()`` turns them, plus the pools' and queues'
current sizes, into a :class:`CacheStats` snapshot, which is what users, the CLI's ``--json``
and the optional Prometheus exporter read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, computed_field

__all__ = [
    "CacheStats",
    "Counters",
    "KVPublisherStats",
    "PrefetchStats",
    "QueueStats",
    "StorageStats",
    "Tier",
    "TierStats",
    "Transition",
    "TransitionCounter",
    "TransitionStats",
]


class Tier(StrEnum):
    """The three tiers, as stats and metrics name them."""

    DEVICE = "device"
    HOST = "host"
    STORAGE = "storage"

    # Counters are dicts keyed by tier, bumped on every request: hash in C, as the str does
    # (Enum's own __hash__ is Python code).
    __hash__ = str.__hash__


class Transition(StrEnum):
    """The moves between tiers."""

    BACKUP = "backup"  # L1 -> L2
    LOAD = "load"  # L2 -> L1
    WRITE_BACK = "write_back"  # L2 -> L3
    PREFETCH = "prefetch"  # L3 -> L2

    __hash__ = str.__hash__  # see Tier


@dataclass(slots=True)
class TransitionCounter:
    """Running totals of one transition."""

    count: int = 0
    pages: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: int = 0
    skipped: int = 0  # see TransitionStats
    retried: int = 0
    dropped: int = 0
    waited: int = 0

    def add(self, pages: int, nbytes: int, seconds: float) -> None:
        """Record one finished move."""
        self.count += 1
        self.pages += pages
        self.bytes += nbytes
        self.seconds += seconds


@dataclass(slots=True)
class Counters:
    """Every counter the runtime bumps, on the loop thread only."""

    requests: int = 0
    hit_pages: dict[Tier, int] = field(default_factory=lambda: dict.fromkeys(Tier, 0))
    hit_tokens: dict[Tier, int] = field(default_factory=lambda: dict.fromkeys(Tier, 0))
    transitions: dict[Transition, TransitionCounter] = field(
        default_factory=lambda: {t: TransitionCounter() for t in Transition}
    )
    prefetch_issued: int = 0
    prefetch_completed: int = 0
    prefetch_partial: int = 0
    prefetch_timed_out: int = 0
    prefetch_refused: int = 0
    prefetch_skipped: int = 0  # shorter than prefetch_threshold
    storage_errors: int = 0  # the runtime's own L3 faults (write-backs past their deadline)
    corrupt_pages: int = 0

    def add_hits(self, tokens_by_tier: dict[Tier, int], page_size: int) -> None:
        """Count one request's hit, by the tier each token came from."""
        for tier, tokens in tokens_by_tier.items():
            if tokens:
                self.hit_tokens[tier] += tokens
                self.hit_pages[tier] += tokens // page_size


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class TierStats(_Frozen):
    """One tier's hits and occupancy, in pages (tokens where named)."""

    hit_pages: int = 0
    hit_tokens: int = 0
    capacity_pages: int | None = None  # None: unbounded or unknown (L3)
    used_pages: int = 0
    locked_pages: int = 0
    evictable_pages: int = 0


class TransitionStats(_Frozen):
    """Totals of one transition, with its average bandwidth."""

    count: int = 0
    pages: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: int = 0
    # Backups: found no L2 room, or deferred while the copies were behind (the pin limit);
    # retried later with success; given up (retry queue full).
    # Loads: too short or no L1 room; waited for another request's load of their pages.
    skipped: int = 0
    retried: int = 0
    dropped: int = 0
    waited: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def bandwidth_bytes_per_s(self) -> float:
        """Bytes moved per second spent moving them (0 before the first move)."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


class PrefetchStats(_Frozen):
    """What happened to L3 prefetches."""

    issued: int = 0
    completed: int = 0
    partial: int = 0
    timed_out: int = 0
    refused: int = 0
    skipped: int = 0


class StorageStats(_Frozen):
    """L3 faults: each was a miss or a failed write, never wrong data."""

    errors: int = 0
    corrupt_pages: int = 0
    # Worker threads a cut call left stuck in a blocking call (their pages quarantined until
    # they return): how many ever were, and how many still are.
    threads_left_behind: int = 0
    threads_stuck: int = 0


class QueueStats(_Frozen):
    """A bounded queue between stages."""

    depth: int = 0
    capacity: int = 0


class KVPublisherStats(_Frozen):
    """The ZMQ KV event publisher: every batch is published or counted in ``dropped``."""

    published: int = 0  # batches sent on the PUB socket
    dropped: int = 0  # sequence numbers that never reached the wire (a gap subscribers see)
    queued: int = 0  # batches waiting for the publisher thread now
    queue_capacity: int = 0  # ``max_queue_size``
    replays: int = 0  # replay requests answered
    replays_malformed: int = 0  # of the wrong shape (ignored) or start length (answered)
    replayed: int = 0  # batches resent by replays


class CacheStats(_Frozen):
    """A snapshot of ``cache.stats()``; ``model_dump(mode="json")`` is JSON-ready."""

    requests: int = 0
    tiers: dict[Tier, TierStats]
    transitions: dict[Transition, TransitionStats]
    prefetch: PrefetchStats = PrefetchStats()
    storage: StorageStats = StorageStats()
    queues: dict[str, QueueStats] = {}
    events_published: int = 0  # KV event batches made while someone listened
    events_dropped: int = 0  # batches a listener lost (a stream or the publisher was full)
    kv_publisher: KVPublisherStats | None = None  # when kv_events publishes over ZMQ
    tp_rounds: int = 0  # tensor-parallel agreement rounds (hits and prefetches)
    tp_unpaired_rounds: int = 0  # of those, reached from different requests: nothing used
    # Background jobs that failed (rolled back and contained: the cache went on), by job:
    # backup, load, write_back, release, prefetch.
    background_failures: dict[str, int] = {}
    degraded: list[str] = []  # tiers whose jobs failed the last 8 times in a row

    @classmethod
    def from_counters(
        cls,
        counters: Counters,
        occupancy: dict[Tier, TierStats],
        *,
        queues: dict[str, QueueStats] | None = None,
        events_published: int = 0,
        events_dropped: int = 0,
        kv_publisher: KVPublisherStats | None = None,
        tp_rounds: int = 0,
        tp_unpaired_rounds: int = 0,
        background_failures: dict[str, int] | None = None,
        degraded: list[str] | None = None,
    ) -> CacheStats:
        """Combine the live counters with the tiers' current occupancy."""
        tiers = {
            tier: occupancy.get(tier, TierStats()).model_copy(
                update={
                    "hit_pages": counters.hit_pages[tier],
                    "hit_tokens": counters.hit_tokens[tier],
                }
            )
            for tier in Tier
        }
        transitions = {
            name: TransitionStats(**asdict(c)) for name, c in counters.transitions.items()
        }
        return cls(
            requests=counters.requests,
            tiers=tiers,
            transitions=transitions,
            prefetch=PrefetchStats(
                issued=counters.prefetch_issued,
                completed=counters.prefetch_completed,
                partial=counters.prefetch_partial,
                timed_out=counters.prefetch_timed_out,
                refused=counters.prefetch_refused,
                skipped=counters.prefetch_skipped,
            ),
            storage=StorageStats(
                errors=counters.storage_errors, corrupt_pages=counters.corrupt_pages
            ),
            queues=queues or {},
            events_published=events_published,
            events_dropped=events_dropped,
            kv_publisher=kv_publisher,
            tp_rounds=tp_rounds,
            tp_unpaired_rounds=tp_unpaired_rounds,
            background_failures=background_failures or {},
            degraded=degraded or [],
        )
