"""The soak's residency ledger: which pages each tier holds, from the cache's KV events.

Under ``write_back`` a page leaves L1 only once it was backed up (``docs/runtime.md``: "every
eviction"), so a ``BlockRemoved(GPU)`` of a page that neither L2 nor L3 holds is a page lost
from every tier. The ledger counts those. It follows the events in order; if its stream fell
behind and lost batches, it says so instead of guessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hicache_async.events import (
    AllBlocksCleared,
    BlockStored,
    EventBatch,
    EventStream,
    KVEvent,
    StorageMedium,
)

__all__ = ["Ledger"]

_L3 = (StorageMedium.DISK, StorageMedium.EXTERNAL)


@dataclass
class Ledger:
    """Pages on L2 and L3 by hash, and the L1 evictions that lost a page."""

    check_losses: bool  # write_back: every L1 eviction must keep a copy
    host: set[str] = field(default_factory=set)
    storage: set[str] = field(default_factory=set)
    lost: int = 0
    examples: list[str] = field(default_factory=list)  # the first few lost hashes
    events: int = 0

    async def follow(self, stream: EventStream) -> None:
        """Apply every batch of ``stream`` as it comes (until it ends or is cancelled)."""
        async for batch in stream:
            self.apply(batch)

    def apply(self, batch: EventBatch) -> None:
        for event in batch.events:
            self.events += 1
            self._apply(event)

    def _apply(self, event: KVEvent) -> None:
        if isinstance(event, AllBlocksCleared):
            if event.medium in (None, StorageMedium.CPU_PINNED):
                self.host.clear()
            if event.medium is None or event.medium in _L3:
                self.storage.clear()
            return
        where = self._tier(event.medium)
        if isinstance(event, BlockStored):
            if where is not None:
                where.update(event.block_hashes)
            return
        if where is not None:  # a BlockRemoved from L2 or L3
            where.difference_update(event.block_hashes)
        elif self.check_losses:  # a BlockRemoved from L1
            for block in event.block_hashes:
                if block not in self.host and block not in self.storage:
                    self.lost += 1
                    if len(self.examples) < 5:
                        self.examples.append(block)

    def _tier(self, medium: StorageMedium) -> set[str] | None:
        if medium is StorageMedium.CPU_PINNED:
            return self.host
        if medium in _L3:
            return self.storage
        return None  # GPU
