from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, generate_latest

from hicache_async.metrics import CacheStats, Counters, QueueStats, Tier, TierStats, Transition
from hicache_async.prometheus import StatsCollector


def snapshot() -> CacheStats:
    counters = Counters(requests=5)
    counters.hit_pages[Tier.HOST] += 3
    counters.hit_tokens[Tier.HOST] += 48
    counters.transitions[Transition.LOAD].add(pages=3, nbytes=3000, seconds=0.5)
    counters.prefetch_timed_out += 1
    counters.corrupt_pages += 2
    occupancy = {Tier.DEVICE: TierStats(capacity_pages=100, used_pages=40, locked_pages=8)}
    return CacheStats.from_counters(
        counters,
        occupancy,
        queues={"write_back": QueueStats(depth=2, capacity=64)},
        events_published=7,
    )


def test_snapshot_combines_counters_and_occupancy_and_is_json() -> None:
    stats = snapshot()
    assert stats.tiers[Tier.DEVICE].used_pages == 40
    assert stats.tiers[Tier.HOST].hit_tokens == 48
    assert stats.tiers[Tier.STORAGE].capacity_pages is None
    load = stats.transitions[Transition.LOAD]
    assert load.bandwidth_bytes_per_s == 6000.0
    assert stats.transitions[Transition.BACKUP].bandwidth_bytes_per_s == 0.0
    doc = json.loads(stats.model_dump_json())
    assert doc["tiers"]["host"]["hit_pages"] == 3
    assert doc["transitions"]["load"]["bandwidth_bytes_per_s"] == 6000.0
    assert doc["prefetch"]["timed_out"] == 1
    assert doc["storage"]["corrupt_pages"] == 2


def test_prometheus_collector_reads_a_fresh_snapshot() -> None:
    registry = CollectorRegistry()
    calls = []

    def stats() -> CacheStats:
        calls.append(1)
        return snapshot()

    registry.register(StatsCollector(stats))
    text = generate_latest(registry).decode()
    assert 'hicache_hit_tokens_total{tier="host"} 48.0' in text
    assert 'hicache_used_pages{tier="device"} 40.0' in text
    assert 'hicache_transition_bytes_total{transition="load"} 3000.0' in text
    assert 'hicache_transition_skipped_total{transition="load"} 0.0' in text
    assert 'hicache_prefetch_total{outcome="timed_out"} 1.0' in text
    assert 'hicache_queue_depth{queue="write_back"} 2.0' in text
    assert 'hicache_capacity_pages{tier="storage"}' not in text  # unbounded: no sample
    generate_latest(registry)
    assert len(calls) >= 2
