"""Backup (L1 -> L2): copy a device node's pages to the host, then maybe on to L3.

reserve: host pages (evicting L2), the node device-locked and ``BACKING_UP``. move: the D2H
copy. commit: ``BOTH``, ``BlockStored(CPU_PINNED)``, unlock, hand the node to the write-back.
rollback: free the host pages, ``DEVICE`` again, unlock.
Commit and rollback cover the whole reserved span even if an insert split the node meanwhile
(see :func:`~hicache_async.tiers._span.span_chain`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from hicache_async.events import EventHub, StorageMedium
from hicache_async.metrics import Counters, Transition
from hicache_async.radix import NodeState, RadixTree, TreeNode
from hicache_async.tiers._events import stored_event
from hicache_async.tiers._span import span_chain
from hicache_async.tiers.copy import CopyEngine
from hicache_async.tiers.host import HostTier
from hicache_async.tiers.write_back import WriteBack

__all__ = ["Backup", "BackupJob"]


@dataclass(frozen=True, slots=True)
class BackupJob:
    """A reserved backup: the node is ``BACKING_UP`` and device-locked until it runs."""

    node: TreeNode
    tokens: int
    device_pages: torch.Tensor  # int64, one per page of ``node``
    host_pages: torch.Tensor


class Backup:
    """Runs backups; each one is a complete reserve -> move -> commit or rollback."""

    def __init__(
        self,
        tree: RadixTree,
        host: HostTier,
        engine: CopyEngine,
        counters: Counters,
        hub: EventHub,
        *,
        write_back: WriteBack | None = None,
    ) -> None:
        self.tree, self.host, self.engine = tree, host, engine
        self.counters, self.hub = counters, hub
        self.write_back = write_back
        self._totals = counters.transitions[Transition.BACKUP]

    @property
    def skipped(self) -> int:
        """Backups not made: no host pages could be reserved."""
        return self._totals.skipped

    def reserve(self, node: TreeNode) -> BackupJob | None:
        """Reserve host pages for ``node`` and pin it (sync, on the loop), so L1 eviction
        cannot take it before its copy ran; None when it needs no backup or L2 has no room."""
        if node.state is not NodeState.DEVICE:
            return None
        device_pages = node.device_pages
        if device_pages is None:
            return None
        tokens = node.num_tokens
        host_pages = self.host.reserve_pages(tokens // self.tree.page_size)
        if host_pages is None:
            self._totals.skipped += 1
            return None
        # Page tables all the way to the copy engine: no slot round trip per backup.
        job = BackupJob(node, tokens, device_pages.long(), host_pages)
        self.tree.start_backup_pages(node, host_pages)
        self.tree.lock(node)
        return job

    def rollback(self, job: BackupJob) -> None:
        """Undo :meth:`reserve` (sync): free the host pages, unpin the node."""
        self.tree.unlock(job.node)
        for part in span_chain(job.node, job.tokens):
            self.host.free(self.tree.cancel_backup(part))

    async def run(self, job: BackupJob) -> None:
        """Copy a reserved backup, then commit it (or roll it back on any error)."""
        await self.run_batch([job])

    async def run_batch(self, jobs: list[BackupJob]) -> None:
        """Copy reserved backups in one engine call, then commit each (or roll all back)."""
        start = time.perf_counter()
        device = torch.cat([job.device_pages for job in jobs]).cpu()
        host = torch.cat([job.host_pages for job in jobs])
        try:
            await self.engine.backup_pages(device, host)
        except BaseException:
            for job in jobs:
                self.rollback(job)
            self._totals.failures += len(jobs)
            raise
        stored = []
        for job in jobs:
            chain = span_chain(job.node, job.tokens)
            for part in chain:
                self.tree.finish_backup(part)
            self.tree.unlock(job.node)
            stored.extend(chain)
        pages = sum(job.tokens for job in jobs) // self.tree.page_size
        nbytes = pages * self.host.pool.bytes_per_page
        self._totals.add(pages, nbytes, time.perf_counter() - start)
        if self.hub.active:
            self.hub.emit([stored_event(self.tree, n, StorageMedium.CPU_PINNED) for n in stored])
        if self.write_back is not None:
            for node in stored:
                self.write_back.submit(node)

    async def backup(self, node: TreeNode) -> bool:
        """Back ``node`` up to L2 now; False when it needs none or L2 has no room."""
        job = self.reserve(node)
        if job is None:
            return False
        await self.run(job)
        return True
