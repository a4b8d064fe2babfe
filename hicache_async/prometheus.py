"""Prometheus export of ``cache.stats()`` (needs the ``prometheus`` extra).

A collector reads a fresh snapshot on every scrape, so the exporter adds no work to the cache's
hot paths and can never disagree with ``stats()``::

    from prometheus_client import REGISTRY, start_http_server
    REGISTRY.register(StatsCollector(cache.stats))
    start_http_server(9400, addr="127.0.0.1")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from hicache_async.metrics import CacheStats

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the Prometheus exporter needs prometheus-client: pip install 'hicache-async[prometheus]'"
    ) from exc

__all__ = ["StatsCollector"]

_Family = CounterMetricFamily | GaugeMetricFamily


class StatsCollector(Collector):
    """Turns each :class:`CacheStats` snapshot into ``hicache_*`` metric families."""

    def __init__(self, stats: Callable[[], CacheStats], *, prefix: str = "hicache") -> None:
        self._stats = stats
        self._prefix = prefix

    def collect(self) -> Iterator[_Family]:
        s = self._stats()
        p = self._prefix

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(f"{p}_{name}", doc, labels=list(labels))

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{p}_{name}", doc, labels=list(labels))

        requests = counter("requests", "Requests matched against the cache")
        requests.add_metric([], s.requests)
        yield requests

        hits = counter("hit_tokens", "Prompt tokens served from each tier", ("tier",))
        hit_pages = counter("hit_pages", "Pages served from each tier", ("tier",))
        capacity = gauge("capacity_pages", "Pages a tier can hold", ("tier",))
        used = gauge("used_pages", "Pages a tier holds now", ("tier",))
        locked = gauge("locked_pages", "Pages in use by requests or in-flight moves", ("tier",))
        for tier, occupancy in s.tiers.items():
            hits.add_metric([tier.value], occupancy.hit_tokens)
            hit_pages.add_metric([tier.value], occupancy.hit_pages)
            if occupancy.capacity_pages is not None:
                capacity.add_metric([tier.value], occupancy.capacity_pages)
            used.add_metric([tier.value], occupancy.used_pages)
            locked.add_metric([tier.value], occupancy.locked_pages)
        yield from (hits, hit_pages, capacity, used, locked)

        moved = counter("transition_bytes", "Bytes moved by each transition", ("transition",))
        spent = counter("transition_seconds", "Seconds spent moving", ("transition",))
        failed = counter("transition_failures", "Moves that failed", ("transition",))
        skipped = counter("transition_skipped", "Moves not made for lack of room", ("transition",))
        for transition, totals in s.transitions.items():
            moved.add_metric([transition.value], totals.bytes)
            spent.add_metric([transition.value], totals.seconds)
            failed.add_metric([transition.value], totals.failures)
            skipped.add_metric([transition.value], totals.skipped)
        yield from (moved, spent, failed, skipped)

        prefetch = counter("prefetch", "L3 prefetches by outcome", ("outcome",))
        for outcome, value in s.prefetch.model_dump().items():
            prefetch.add_metric([outcome], value)
        yield prefetch

        errors = counter("storage_errors", "L3 operations that failed (counted as misses)")
        errors.add_metric([], s.storage.errors)
        corrupt = counter("corrupt_pages", "L3 pages that failed their check (never used)")
        corrupt.add_metric([], s.storage.corrupt_pages)
        left = counter(
            "storage_threads_left_behind",
            "L3 worker threads a cut call left stuck in a blocking call",
        )
        left.add_metric([], s.storage.threads_left_behind)
        stuck = gauge("storage_threads_stuck", "L3 worker threads stuck now (pages quarantined)")
        stuck.add_metric([], s.storage.threads_stuck)
        yield from (errors, corrupt, left, stuck)

        depth = gauge("queue_depth", "Items waiting in a bounded queue", ("queue",))
        for queue, q in s.queues.items():
            depth.add_metric([queue], q.depth)
        yield depth

        events = counter("events", "KV event batches by fate", ("fate",))
        events.add_metric(["published"], s.events_published)
        events.add_metric(["dropped"], s.events_dropped)
        yield events
        if s.kv_publisher is not None:
            pub = s.kv_publisher
            batches = counter("kv_publisher_batches", "ZMQ KV event batches by fate", ("fate",))
            batches.add_metric(["published"], pub.published)
            batches.add_metric(["dropped"], pub.dropped)
            replays = counter("kv_publisher_replays", "Replay requests by shape", ("request",))
            replays.add_metric(["answered"], pub.replays)
            replays.add_metric(["malformed"], pub.replays_malformed)
            resent = counter("kv_publisher_replayed_batches", "Batches resent by replays")
            resent.add_metric([], pub.replayed)
            yield from (batches, replays, resent)

        rounds = counter(
            "tp_rounds",
            "Tensor-parallel agreement rounds, by whether the ranks paired",
            ("paired",),
        )
        rounds.add_metric(["true"], s.tp_rounds - s.tp_unpaired_rounds)
        rounds.add_metric(["false"], s.tp_unpaired_rounds)
        yield rounds

        background = counter(
            "background_failures",
            "Background jobs that failed, rolled back and were contained, by job",
            ("job",),
        )
        for job, count in sorted(s.background_failures.items()):
            background.add_metric([job], count)
        degraded = gauge("tier_degraded", "1 while a tier's jobs keep failing", ("tier",))
        for name in ("device", "host", "storage"):
            degraded.add_metric([name], float(name in s.degraded))
        yield from (background, degraded)
