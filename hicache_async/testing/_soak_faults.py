"""The soak's faults: storage wrappers and a faulty copy engine per cache instance, with
rates drawn from the run's seed, and a controller task that pauses, releases and brings down
the storage at random moments."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

import anyio

from hicache_async.cache import HiCache
from hicache_async.storage import HiCacheStorage
from hicache_async.testing.faults import (
    CorruptingStorage,
    FaultyTransferEngine,
    FlakyStorage,
    SlowStorage,
    StallingStorage,
)
from hicache_async.transfer import TransferEngine

__all__ = ["FAULT_KINDS", "SegmentFaults", "install_faulty_engine"]

# Every fault kind the soak injects (``--faults`` picks among them).
FAULT_KINDS = (
    "flaky",  # storage calls fail (a StorageError), and short outages (every call fails)
    "slow",  # storage calls run late
    "corrupt",  # pages read back with a flipped byte
    "stall",  # storage calls hang until released (or for long), and short pauses
    "copy_fail",  # L1 <-> L2 copies fail
    "copy_slow",  # L1 <-> L2 copies run late
    "cancel",  # requests cancelled after a random delay or at a random suspension
    "bad",  # bad requests mixed in
)


def install_faulty_engine(cache: HiCache, engine: FaultyTransferEngine) -> None:
    """Make an open ``cache``'s tiers copy through ``engine`` (which wraps ``cache.l1.engine``).

    For tests that decide on a fault after the cache was built; otherwise pass
    ``HiCache(config, wrap_engine=...)``, which builds the tiers on the wrapped engine."""
    cache.l1.engine = engine
    if cache.loader is not None:
        cache.loader.engine = engine
    if cache.backup is not None:
        cache.backup.engine = engine


@dataclass
class SegmentFaults:
    """The fault wrappers of one cache instance, and what they injected."""

    kinds: frozenset[str]
    rng: random.Random
    stall_s: float
    flaky: FlakyStorage | None = None
    slow: SlowStorage | None = None
    corrupt: CorruptingStorage | None = None
    stall: StallingStorage | None = None
    engine: FaultyTransferEngine | None = None
    events: Counter[str] = field(default_factory=Counter)  # outages, pauses, releases

    def wrap(self, storage: HiCacheStorage) -> HiCacheStorage:
        """``storage`` inside the wrappers this segment's fault kinds ask for (each storage
        fault kind is on in three segments of four, so L3 also serves some clean ones)."""
        rng = self.rng
        kinds = {kind for kind in sorted(self.kinds) if rng.random() < 0.75}
        if "stall" in kinds:
            rate = rng.uniform(0.005, 0.03)
            storage = self.stall = StallingStorage(
                storage, rate=rate, stall_s=self.stall_s, seed=rng.randrange(2**32)
            )
        if "slow" in kinds:
            storage = self.slow = SlowStorage(
                storage, delay=rng.uniform(0.0005, 0.008), per_page=rng.uniform(0.0, 0.0003)
            )
        if "flaky" in kinds:
            storage = self.flaky = FlakyStorage(
                storage, fail_rate=rng.uniform(0.01, 0.08), seed=rng.randrange(2**32)
            )
        if "corrupt" in kinds:
            storage = self.corrupt = CorruptingStorage(
                storage, rate=rng.uniform(0.005, 0.03), seed=rng.randrange(2**32)
            )
        return storage

    def wrap_engine(self, inner: TransferEngine) -> TransferEngine:
        """The engine the cache's tiers copy through: ``inner``, faulty when copy faults are
        on (``HiCache(config, wrap_engine=faults.wrap_engine)``)."""
        fail, slow = "copy_fail" in self.kinds, "copy_slow" in self.kinds
        if not (fail or slow):
            return inner
        self.engine = FaultyTransferEngine(
            inner,
            fail_rate=self.rng.uniform(0.01, 0.06) if fail else 0.0,
            slow_rate=self.rng.uniform(0.05, 0.2) if slow else 0.0,
            delay=self.rng.uniform(0.001, 0.01),
            seed=self.rng.randrange(2**32),
        )
        return self.engine

    async def control(self) -> None:
        """Outages, pauses and releases at random moments, until cancelled."""
        rng = self.rng
        while True:
            await anyio.sleep(rng.uniform(0.1, 0.6))
            draw = rng.random()
            if self.flaky is not None and draw < 0.15:
                self.events["outages"] += 1
                self.flaky.down = True
                await anyio.sleep(rng.uniform(0.02, 0.2))
                self.flaky.down = False
            elif self.stall is not None and draw < 0.3:
                self.events["pauses"] += 1
                self.stall.paused = True
                await anyio.sleep(rng.uniform(0.02, 0.3))
                self.stall.paused = False
                self.stall.release()
            elif self.stall is not None and draw < 0.8:
                self.events["releases"] += 1
                self.stall.release()

    def quiesce(self) -> None:
        """Stop injecting storage faults and let every stalled call go (before the drain)."""
        if self.flaky is not None:
            self.flaky.fail_rate, self.flaky.down = 0.0, False
        if self.stall is not None:
            self.stall.rate, self.stall.paused = 0.0, False
            self.stall.release()

    def injected(self) -> Counter[str]:
        """Faults injected, by kind."""
        counts: Counter[str] = Counter()
        if self.flaky is not None:
            counts["flaky"] += self.flaky.injected
        if self.slow is not None:
            counts["slow"] += self.slow.delayed
        if self.corrupt is not None:
            counts["corrupt"] += self.corrupt.corrupted
        if self.stall is not None:
            counts["stall"] += self.stall.injected
        if self.engine is not None:
            counts["copy_fail"] += self.engine.failed
            counts["copy_slow"] += self.engine.slowed
        return counts
