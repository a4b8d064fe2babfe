"""Host write-back (L2 -> L3), and the host-lock release queue behind it.

A node whose pages reached L2 is written to L3 once. :meth:`WriteBack.submit` (sync, on the
loop) host-locks the node, so L2 eviction cannot free pages a write still reads, captures the
keys and slots, and queues the job on a bounded stream; when the stream is full the write is
dropped and counted rather than waiting (the caller is a commit, which never blocks).

The writer task batches queued jobs into ``batch_set_v1`` calls, each under a deadline. It does
not unlock: it hands each job with the backend's answer to the bounded release stream. The
release task takes them in order, agrees with the other tensor-parallel ranks on how many pages
every rank stored (MIN, when ``agree`` is given; a job that another rank released in another
order counts as not stored), emits ``BlockStored`` for those pages, and only then releases the
host lock. ``HiCache`` passes no ``agree``: its ranks' jobs follow their own trees, so one
round per job would not pair up across ranks; a caller whose ranks submit identical jobs in
the same order can pass one.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace

import anyio
import torch
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from hicache_async.events import BlockStored, EventHub, StorageMedium
from hicache_async.health import Health
from hicache_async.metrics import Counters, Transition
from hicache_async.radix import RadixTree, TreeNode
from hicache_async.storage import HiCacheStorage
from hicache_async.tiers._events import stored_event
from hicache_async.tiers._paged import leading
from hicache_async.tiers._pending import Pending

__all__ = ["WriteBack", "WriteJob"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WriteJob:
    """One node's pages on their way to L3. The node stays host-locked until released."""

    node: TreeNode
    keys: list[str]  # chained page hashes, one per page
    host_slots: torch.Tensor  # token slots of the host pool, whole pages
    event: BlockStored | None  # captured now (the node may split later); None: nobody listens


class WriteBack:
    """The L2 -> L3 pipeline: ``submit`` on the loop, ``run`` in the cache's task group."""

    def __init__(
        self,
        tree: RadixTree,
        storage: HiCacheStorage,
        counters: Counters,
        hub: EventHub,
        *,
        medium: StorageMedium,
        max_jobs: int = 256,
        batch_pages: int = 64,
        deadline_s: float = 30.0,
        agree: Callable[[int, Sequence[int]], Awaitable[list[int] | None]] | None = None,
        health: Health | None = None,
    ) -> None:
        self.tree, self.storage, self.counters, self.hub = tree, storage, counters, hub
        self.medium = medium
        self.batch_pages = batch_pages
        self.deadline_s = deadline_s
        self._agree = agree
        self.health = health or Health()  # a failed batch or release: counted, not raised
        send, receive = anyio.create_memory_object_stream[WriteJob](max_buffer_size=max_jobs)
        self._jobs: tuple[MemoryObjectSendStream[WriteJob], MemoryObjectReceiveStream[WriteJob]]
        self._jobs = (send, receive)
        done_send, done_receive = anyio.create_memory_object_stream[tuple[WriteJob, list[bool]]](
            max_buffer_size=max_jobs
        )
        self._done = (done_send, done_receive)
        self.dropped = 0  # jobs refused because the queue was full
        self.pending = Pending()  # jobs queued, being written or awaiting release
        # Called (sync, on the loop) after a job's host lock is released: L2 may have room again.
        self.on_release: Callable[[], None] | None = None

    @property
    def depth(self) -> int:
        """Jobs waiting for the writer."""
        return self._jobs[1].statistics().current_buffer_used

    @property
    def capacity(self) -> int:
        return int(self._jobs[1].statistics().max_buffer_size)

    def submit(self, node: TreeNode) -> bool:
        """Queue ``node``'s pages for L3 (call on the loop once its host copy is valid)."""
        host_slots = node.host_indices
        if host_slots is None or not node.state.host_valid:
            raise ValueError(f"{node!r} has no valid host copy to write back")
        job = WriteJob(
            node=node,
            keys=list(self.tree.page_hashes(node)),
            host_slots=host_slots,
            event=stored_event(self.tree, node, self.medium) if self.hub.active else None,
        )
        self.tree.lock_host(node)
        try:
            self._jobs[0].send_nowait(job)
        except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self.tree.unlock_host(node)
            self.dropped += 1
            return False
        self.pending.add()
        return True

    async def run(self) -> None:
        """The writer and the release task; returns once ``close`` was called and both drained."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._release)
            await self._write()

    def close(self) -> None:
        """Accept no more jobs; the tasks finish what is queued, then return."""
        self._jobs[0].close()

    async def _write(self) -> None:
        send_done, jobs = self._done[0], self._jobs[1]
        async with send_done, jobs:
            async for first in jobs:
                batch = [first, *self._more(len(first.keys))]
                flags = [False] * sum(len(job.keys) for job in batch)
                with self.health.contain("write_back"):  # nothing stored; released below
                    flags = await self._store(batch)
                offset = 0
                for job in batch:
                    n = len(job.keys)
                    await send_done.send((job, flags[offset : offset + n]))
                    offset += n

    def _more(self, pages: int) -> list[WriteJob]:
        """Queued jobs that fit in the same backend call."""
        more: list[WriteJob] = []
        while pages < self.batch_pages:
            try:
                job = self._jobs[1].receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            more.append(job)
            pages += len(job.keys)
        return more

    async def _store(self, batch: list[WriteJob]) -> list[bool]:
        keys = [key for job in batch for key in job.keys]
        slots = torch.cat([job.host_slots for job in batch])
        start = time.perf_counter()
        stats = self.counters.transitions[Transition.WRITE_BACK]
        flags = [False] * len(keys)
        with anyio.move_on_after(self.deadline_s) as scope:
            flags = await self.storage.batch_set_v1(keys, slots)
        if scope.cancelled_caught:
            # The backend finished touching the pages before returning (its contract); the
            # write is unknown, so it counts as failed: a later backup writes it again.
            self.counters.storage_errors += 1
            log.warning(
                "L3 write-back of %d pages passed its %.1f s deadline", len(keys), self.deadline_s
            )
        good = sum(flags)
        stats.add(good, good * self._page_bytes(), time.perf_counter() - start)
        stats.failures += len(keys) - good
        return flags

    def _page_bytes(self) -> int:
        pool = self.storage.mem_pool_host
        return pool.bytes_per_page if pool is not None else 0

    async def _release(self) -> None:
        async with self._done[1]:
            async for job, flags in self._done[1]:
                try:
                    with self.health.contain("release"):  # the unlock below always runs
                        await self._acknowledge(job, flags)
                finally:
                    self.tree.unlock_host(job.node)
                    self.pending.done()
                if self.on_release is not None:
                    try:
                        self.on_release()
                    except Exception:  # the release queue must keep releasing
                        log.exception("a callback after an L3 write's release failed")

    async def _acknowledge(self, job: WriteJob, flags: list[bool]) -> None:
        """Agree how many of ``job``'s pages were stored and announce them."""
        stored = leading(flags)
        if self._agree is not None:
            # Tagged by the job's first page: jobs land in another order on another rank
            # when backups did, and then none counts as stored.
            tag = zlib.crc32(job.keys[0].encode()) if job.keys else 0
            agreed = await self._agree(tag, [stored])
            stored = agreed[0] if agreed is not None else 0
        if stored and job.event is not None:
            self._emit(job.event, stored)

    def _emit(self, event: BlockStored, pages: int) -> None:
        size = self.tree.page_size
        self.hub.emit(
            [
                replace(
                    event,
                    block_hashes=event.block_hashes[:pages],
                    token_ids=event.token_ids[: pages * size],
                )
            ]
        )
