"""The ``HiCache`` facade: builds the tiers, runs their background tasks, hands out sessions.

```python
async with HiCache.open(config) as cache:
    async with cache.session(tokens) as s:
        ...
```

Everything the index owns is touched on the event loop thread only. The background tasks (the
event poller, the backup worker, the write-back pipeline, the KV event publisher) live in one
task group owned by the cache: leaving the ``async with`` block drains them for up to
``drain_timeout`` seconds, cancels what is left, and closes the L3 backend.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import warnings
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import anyio
import torch
import torch.distributed as dist
from anyio.abc import TaskGroup

from hicache_async._state import OPEN as _OPEN
from hicache_async._state import CacheState
from hicache_async.config import HiCacheConfig, WritePolicy
from hicache_async.errors import ClosedError, ConfigError, HiCacheError, IndexStateError
from hicache_async.events import (
    AllBlocksCleared,
    BlockRemoved,
    EventHub,
    EventStream,
    StorageMedium,
)
from hicache_async.health import Health
from hicache_async.memory.allocator import PagedAllocator
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.metrics import (
    CacheStats,
    Counters,
    QueueStats,
    StorageStats,
    Tier,
    TierStats,
    Transition,
)
from hicache_async.radix import (
    TOKEN_BYTES,
    MatchResult,
    NodeState,
    RadixKey,
    RadixTree,
    TreeNode,
    check_token_ids,
)
from hicache_async.radix import Tier as RadixTier
from hicache_async.session import Session, check_priority
from hicache_async.storage import HiCacheStorage, HiCacheStorageConfig, create_storage
from hicache_async.tiers._events import stored_event
from hicache_async.tiers._l1 import EngineWrapper, build_l1
from hicache_async.tiers._pending import Pending
from hicache_async.tiers._span import span_chain
from hicache_async.tiers.backup import Backup, BackupJob
from hicache_async.tiers.consensus import RankConsensus, wait_in_thread
from hicache_async.tiers.device import DeviceTier
from hicache_async.tiers.host import HostTier
from hicache_async.tiers.load import Load
from hicache_async.tiers.prefetch import Prefetcher
from hicache_async.tiers.room import RoomQueue
from hicache_async.tiers.write_back import WriteBack

if TYPE_CHECKING:  # the publisher needs the zmq extra; only imported when configured
    from hicache_async.kv_publisher import ZmqEventPublisher

__all__ = ["CacheState", "HiCache"]

log = logging.getLogger(__name__)


_MAX_UNBACKED = 4096  # paths waiting for a backup retry (see HiCache._unbacked)


class HiCache:
    """A hierarchical KV cache on the caller's event loop. Open it with :meth:`open`."""

    def __init__(
        self,
        config: HiCacheConfig,
        *,
        storage: HiCacheStorage | None = None,
        process_group: dist.ProcessGroup | None = None,
        model_name: str | None = None,
        drain_timeout: float = 10.0,
        wrap_engine: EngineWrapper | None = None,
    ) -> None:
        self.config = config
        self.layout = config.layout
        self.page_size = config.layout.page_size
        self.token_bytes = TOKEN_BYTES
        self.drain_timeout = drain_timeout
        self.state = CacheState.NEW
        self.counters = Counters()
        self.health = Health()  # background jobs' failures: contained, counted, logged
        self._sessions_created = 0  # a session's ordinal tags its tensor-parallel rounds
        self.hub = EventHub(data_parallel_rank=config.data_parallel_rank)
        device = config.resolve_device()
        self.tree = RadixTree(self.page_size, config.eviction_policy, device=device)
        self.host_pool: HostKVPool | None = None
        self.host_tier: HostTier | None = None
        if config.host_enabled:
            self.host_pool = HostKVPool(self.layout, config.resolved_host_pages, config.host_layout)
            self.host_tier = HostTier(
                self.tree, self.host_pool, self.hub, headroom=config.eviction_headroom
            )
        self.l1 = build_l1(config, device, self.host_pool, wrap_engine)
        self.device_pool = self.l1.pool
        # Read on every request, so kept as plain attributes: the allocator pages come from is
        # on the CPU, so slots move only when L1 is elsewhere; write_through_selective counts
        # hits on every match, write_through backs up on every insert.
        self._device_allocator = self.l1.allocator
        self._slots_move = self.device_pool.device.type != "cpu"
        self._backs_up_on_hit = config.write_policy is WritePolicy.WRITE_THROUGH_SELECTIVE
        self._backs_up_on_insert = config.write_policy is WritePolicy.WRITE_THROUGH
        self.device_tier = DeviceTier(
            self.tree,
            self.l1.allocator,
            self.page_size,
            self.hub,
            host_allocator=self.host_pool.allocator if self.host_pool else None,
            headroom=config.eviction_headroom,
            keep_unbacked=config.write_policy is WritePolicy.WRITE_BACK and config.host_enabled,
        )
        self.room = RoomQueue(self.tree, self.device_tier)  # requests waiting for L1 pages
        self._sessions_open = 0  # entered and not closed: all waiting for room is a deadlock
        # Tensor parallelism: ranks agree (MIN) on each session's hit and on prefetched pages,
        # in tagged rounds that sessions make in lockstep (see consensus.py). L3 writes are
        # not agreed: a rank's write-back jobs follow its own tree, whose nodes split and
        # back up differently from the other ranks', so per-job rounds would not pair up
        # (a rank with one job more waits for ever); what a prefetch uses is agreed anyway.
        # The counts are CPU tensors (a gloo group, as SGLang's TP CPU group), so a worker
        # thread blocked in work.wait() awaits each round: ~3x sooner than the poller.
        self.consensus: RankConsensus | None = None
        if process_group is not None:
            self.consensus = RankConsensus(process_group, waiter=wait_in_thread)
        agree = self.consensus.agree_round if self.consensus is not None else None
        self.storage = storage
        if model_name is not None:  # the keyword from before model_name was a config field
            warnings.warn(
                "HiCache(model_name=...) is deprecated: set HiCacheConfig(model_name=...) or "
                "HICACHE_MODEL_NAME (the keyword still overrides the config's model_name)",
                DeprecationWarning,
                stacklevel=2,
            )
            self.config = config = config.model_copy(update={"model_name": model_name})
        if self.storage is None and config.storage_enabled:
            rank = dist.get_rank(process_group) if process_group is not None else 0
            size = dist.get_world_size(process_group) if process_group is not None else 1
            self.storage = create_storage(
                config.storage_backend,
                HiCacheStorageConfig(
                    tp_rank=rank,
                    tp_size=size,
                    is_mla_model=self.layout.use_mla,
                    is_page_first_layout=self.host_pool is not None
                    and self.host_pool.is_page_first,
                    model_name=config.model_name,
                    extra_config=config.storage_options,
                    layout_fingerprint=self.layout.fingerprint_digest,
                ),
            )
        self.write_back: WriteBack | None = None
        self.prefetcher: Prefetcher | None = None
        if self.storage is not None:
            if self.host_pool is None or self.host_tier is None:
                raise HiCacheError("L3 storage needs an L2 host pool")
            self.storage.register_mem_pool_host(self.host_pool)
            medium = (
                StorageMedium.DISK if config.storage_backend == "file" else StorageMedium.EXTERNAL
            )
            self.write_back = WriteBack(
                self.tree, self.storage, self.counters, self.hub, medium=medium, health=self.health
            )
            self.storage.removal_listener = self._l3_removed
            self.write_back.on_release = self._l2_unpinned
            self.prefetcher = Prefetcher(
                self.tree,
                self.host_tier,
                self.storage,
                self.counters,
                self.hub,
                threshold_tokens=config.prefetch_threshold,
                capacity_pages=config.resolved_prefetch_capacity_pages,
                max_wait_s=config.prefetch_wait_complete_timeout,
                agree=agree,
            )
        self.backup: Backup | None = None
        self.loader: Load | None = None
        if self.host_tier is not None and self.l1.engine is not None:
            self.loader = Load(
                self.tree,
                self.device_tier,
                self.l1.engine,
                self.counters,
                self.hub,
                bytes_per_page=self.layout.bytes_per_page,
            )
            self.backup = Backup(
                self.tree,
                self.host_tier,
                self.l1.engine,
                self.counters,
                self.hub,
                write_back=self.write_back,
            )
        send, receive = anyio.create_memory_object_stream[BackupJob](max_buffer_size=1024)
        self._backups = (send, receive)
        # Paths whose backup found L2 full of locked pages (or the queue full), with the hit
        # count their policy asks for: retried when a later request's backups are scheduled
        # or an L3 write releases its pages, once L2 has room, so a busy spell does not leave
        # them out of L2 (and L3) for good. Bounded: past it the oldest is given up.
        self._unbacked: collections.deque[tuple[TreeNode, int]] = collections.deque()
        self._backup_totals = self.counters.transitions[Transition.BACKUP]
        self.backup_batch = 256  # backups moved by one engine call
        # Counted in the L1 pages that backups queued or being copied pin until copied. Past
        # ``backup_pin_limit`` pinned pages a new backup waits in ``_unbacked`` instead: when
        # copies fall behind the inserts, a longer queue would pin L1 until requests stall
        # waiting for room (measured: 10 s of waits in a 2 s run at 70% of capacity), and what
        # it would protect is only L2 coverage.
        self._backups_pending = Pending()
        self.backup_pin_limit = max(1, self.l1.allocator.usable // 4)
        self._stack: AsyncExitStack | None = None
        self.publisher: ZmqEventPublisher | None = None  # while open: its bound endpoints
        self._tg: TaskGroup | None = None

    # -- lifecycle ------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def open(cls, config: HiCacheConfig, **options: Any) -> AsyncIterator[HiCache]:
        """Build a cache, start its background tasks, and close it when the block ends."""
        async with cls(config, **options) as cache:
            yield cache

    async def __aenter__(self) -> Self:
        if self.state is not CacheState.NEW:
            raise HiCacheError(f"a cache is opened once; this one is {self.state.value}")
        if self.storage is not None and self.storage.asyncio_only and not _on_asyncio():
            raise ConfigError(
                f"storage_backend={self.storage.name!r} runs on asyncio only (its client is "
                f"asyncio-native); open the cache under asyncio, or use another L3 backend "
                f"(e.g. file) on trio"
            )
        async with AsyncExitStack() as stack:
            self._tg = await stack.enter_async_context(anyio.create_task_group())
            await self.l1.start(self._tg)
            self._tg.start_soon(self._backup_worker)
            if self.write_back is not None:
                self._tg.start_soon(self.write_back.run)
            if self.config.kv_events is not None and self.config.kv_events.publisher == "zmq":
                from hicache_async.kv_publisher import ZmqEventPublisher

                self.publisher = await stack.enter_async_context(
                    ZmqEventPublisher.open(self.config.kv_events, self.hub)
                )
            self._stack = stack.pop_all()
        self.state = CacheState.OPEN
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Drain background work (up to ``drain_timeout``), cancel the rest, close L3.

        Idempotent; completes even when the caller is cancelled."""
        if self.state in (CacheState.CLOSING, CacheState.CLOSED) or self._stack is None:
            self.state = CacheState.CLOSED
            return
        self.state = CacheState.CLOSING
        self.room.close()  # requests waiting for L1 room raise ClosedError now
        stack, self._stack = self._stack, None
        with anyio.CancelScope(shield=True), anyio.move_on_after(self.drain_timeout):
            await self.drain()
        self._backups[0].close()
        if self.write_back is not None:
            self.write_back.close()
        assert self._tg is not None
        self._tg.cancel_scope.cancel()
        try:
            await stack.aclose()  # leaves the task group: every background task has ended
        finally:
            with anyio.CancelScope(shield=True):
                if self.storage is not None:
                    if self.storage.stats.threads_stuck:  # nothing to wait for: say so
                        log.warning(
                            "closing with %d L3 worker threads still stuck in blocking calls; "
                            "they are left behind (the process may not exit until they return)",
                            self.storage.stats.threads_stuck,
                        )
                    await self.storage.aclose()
            self.hub.close()
            self.state = CacheState.CLOSED

    @property
    def backups_retried(self) -> int:
        """Backups that found no room at first and were made on a retry."""
        return self._backup_totals.retried

    @property
    def backups_dropped(self) -> int:
        """Backups given up: waiting for a retry past the bound (4,096 paths)."""
        return self._backup_totals.dropped

    async def drain(self) -> None:
        """Wait until every prefetch, queued backup and L3 write-back has finished."""
        stages = [self._backups_pending]
        if self.prefetcher is not None:
            stages.insert(0, self.prefetcher.running)
        if self.write_back is not None:
            stages.append(self.write_back.pending)
        # Each stage can feed another (a backup queues a write-back; a write-back's release
        # retries skipped backups): done only when all are idle at once.
        while any(stage.count for stage in stages):
            for stage in stages:
                await stage.wait_idle()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if getattr(self, "state", None) is CacheState.OPEN:
            _warn(f"{self!r} was never closed", ResourceWarning, stacklevel=1, source=self)

    def check(self) -> None:
        """Verify the index and the pools agree; call once every request has ended and
        :meth:`drain` returned. Raises :class:`IndexStateError` naming what is off: the
        tree's invariants (a full recount), a lock still held, a page allocated that no node
        holds (leaked) or held by no allocation."""
        tree, ps = self.tree, self.page_size
        tree.check()
        problems = []
        for tier, allocator, extra in self._pools():
            locked = tree.protected_size(tier) // ps
            if locked:
                problems.append(f"{locked} {tier.value} pages still locked")
            held = tree.total_size(tier) // ps + extra
            if allocator.used != held:
                problems.append(
                    f"{tier.value} allocator has {allocator.used} pages in use, the tree and "
                    f"in-flight work hold {held}"
                )
        if problems:
            raise IndexStateError("; ".join(problems))

    def _pools(self) -> list[tuple[RadixTier, PagedAllocator, int]]:
        """(tier, allocator, pages in use outside the tree) per tier: a prefetch's pages are
        reserved before they are inserted, and quarantined ones until their thread returns."""
        pools = [(RadixTier.DEVICE, self.l1.allocator, 0)]
        if self.host_pool is not None:
            inflight = self.prefetcher.inflight_pages if self.prefetcher is not None else 0
            pools.append((RadixTier.HOST, self.host_pool.allocator, inflight))
        return pools

    def _l3_removed(self, keys: list[str]) -> None:
        """The backend dropped pages by itself (its capacity): tell the routers."""
        if self.hub.active and self.write_back is not None:
            self.hub.emit([BlockRemoved(tuple(keys), self.write_back.medium)])

    def _check_open(self) -> None:
        if self.state is not _OPEN:
            raise ClosedError(f"the cache is {self.state.value}; open it with HiCache.open()")

    @property
    def _task_group(self) -> TaskGroup:
        self._check_open()
        assert self._tg is not None
        return self._tg

    # -- requests -------------------------------------------------------------------------

    def key(self, tokens: Sequence[int] | torch.Tensor, extra_key: str | None = None) -> RadixKey:
        """The radix key of a prompt (tokens as a list, array or integer tensor); ids outside
        ``[0, 2**31)`` and an ``extra_key`` that is not UTF-8 are a :class:`RadixInputError`."""
        key = RadixKey(tokens, extra_key)
        check_token_ids(key.data)
        return key

    def session(
        self,
        tokens: Sequence[int] | torch.Tensor,
        extra_key: str | None = None,
        *,
        priority: int = 0,
    ) -> Session:
        """A request's session: ``async with cache.session(tokens) as s: ...``."""
        if self.state is not _OPEN:
            self._check_open()
        key = RadixKey(tokens, extra_key)
        check_token_ids(key.data)  # refused here, not in a background task hashing pages
        if priority.__class__ is not int:  # the usual case costs one identity test
            check_priority(priority)
        return Session(self, key, priority)

    def events(self, max_batches: int = 10_000) -> EventStream:
        """A bounded stream of KV event batches from now on (``async with`` it to close)."""
        return self.hub.subscribe(max_batches)

    async def clear(self, *, storage: bool = False) -> None:
        """Drop every page from L1 and L2 (and from L3 when ``storage``), once background
        work has drained. Requests must have ended: a held page is a :class:`HiCacheError`."""
        self._check_open()
        await self.drain()
        tree = self.tree
        if tree.protected_size(RadixTier.DEVICE) or tree.protected_size(RadixTier.HOST):
            raise HiCacheError("clear() while requests hold cached pages; let them finish first")
        # Everything goes: one AllBlocksCleared. L3 keeps its pages: per-page removals from L1
        # and L2, as no consumer's AllBlocksCleared names tiers (they read it as clear-all).
        everything = storage or self.storage is None
        self.device_tier.evict(self.l1.allocator.usable, keep_host=False, emit=not everything)
        if self.host_tier is not None and self.host_pool is not None:
            self.host_tier.evict(self.host_pool.allocator.usable, emit=not everything)
        self._unbacked.clear()  # every node left the tree
        if storage and self.storage is not None:
            await self.storage.clear()
        if everything:
            self.hub.emit([AllBlocksCleared()])

    # -- the lower level (for frameworks with their own scheduler) -------------------------

    def match_prefix(self, key: RadixKey) -> MatchResult:
        """The longest cached prefix of ``key`` (device part, then host part): the tree's
        match, which counts a hit on every node it matched. A framework that uses the match
        calls :meth:`after_match` with it, so ``write_through_selective`` backs the prefix up
        from its second hit (a peek at the tree, e.g. in a test, need not)."""
        self._check_open()
        return self.tree.match_prefix(key)

    async def ensure_device_room(self, pages: int) -> bool:
        """Free ``pages`` L1 pages now (evicting), waiting for backups in flight when they pin
        what would be evicted; False if even that is not enough. Under ``write_back``, the
        pages about to be evicted are backed up first, so they move to L2 instead of being
        lost (L1 eviction never drops a page without a host copy there: a victim whose
        backup could not be made stays). Like every reservation, it evicts the tier's
        headroom beyond the shortfall."""
        allocator = self.l1.allocator
        while True:
            short = pages - allocator.available
            if short <= 0:
                return True
            short += self.device_tier.headroom
            backed = await self._back_up_victims(short) if self.device_tier.keep_unbacked else 0
            freed = self.device_tier.evict(short)
            if allocator.available >= pages:
                return True
            if freed or backed:
                continue  # progress: the victims' parents may be evictable leaves now
            if not self._backups_pending.count:
                return False
            # The next finished backup unpins its pages; waiting for none to be pending
            # starved this request while new requests kept adding backups.
            await self._backups_pending.wait_progress()

    async def _back_up_victims(self, short: int) -> int:
        """Back up the unbacked nodes among the next ``short`` pages' worth of L1 victims, in
        one copy; how many backups landed (0 when the copy failed: counted, rolled back)."""
        if self.backup is None or short <= 0:
            return 0
        tokens = short * self.page_size
        jobs = []
        for node in self.tree.eviction_candidates(max(1, short)):
            if tokens <= 0:
                break
            tokens -= node.num_tokens
            job = self.backup.reserve(node)  # None when it has a host copy, or L2 is full
            if job is not None:
                jobs.append(job)
        if not jobs:
            return 0
        with self.health.contain("backup"):  # a failed copy: the victims stay on L1 only
            await self.backup.run_batch(jobs)  # one copy for all (rolled back together)
            return len(jobs)
        return 0

    def after_insert(self, key: RadixKey, new_tokens: int) -> None:
        """Call after ``tree.insert(key, ...)`` put ``new_tokens`` new tokens on L1 (the
        insert's length minus what it returned): emits their ``BlockStored(GPU)`` and, under
        ``write_through``, schedules their backup. Sessions do this themselves.

        Only whole pages are announced, each once: the tree keeps no partial last page, so
        the new part runs from what the insert found cached (whole pages) to the key's last
        whole page, whether ``new_tokens`` counts the partial tail or not."""
        write_through = self._backs_up_on_insert
        if new_tokens <= 0 or not (write_through or self.hub.active):
            return  # nothing to announce, nothing to back up
        size, length = self.page_size, len(key)
        new_tokens = length // size * size - (length - new_tokens) // size * size
        if new_tokens <= 0:
            return  # the tail was partial: no new whole page
        last = self.tree.find(key)  # not match_prefix: announcing is no hit of the pages
        if self.hub.active:
            span = span_chain(last, new_tokens)
            self.hub.emit([stored_event(self.tree, node, StorageMedium.GPU) for node in span])
        if write_through:
            self._schedule_backups(last, hits=0)

    def after_match(self, match: MatchResult) -> None:
        """Call with a match a request uses, from :meth:`match_prefix` or
        ``tree.match_prefix(key)`` (the tree counted the hit on every node it matched): under
        ``write_through_selective``, schedules the backup of the matched device nodes hit at
        least twice, as a session's match does; under the other policies, nothing. Sessions,
        the scheduler-level API included, do this themselves."""
        self._check_open()
        if self._backs_up_on_hit:
            self._schedule_backups(match.last_device_node, hits=2)

    def _after_match(self, match: MatchResult) -> None:
        """:meth:`after_match` for sessions, which checked the cache is open."""
        if self._backs_up_on_hit:
            self._schedule_backups(match.last_device_node, hits=2)

    def _schedule_backups(self, last: TreeNode, *, hits: int) -> None:
        """Reserve backups of the device-only nodes on the path to ``last`` hit at least
        ``hits`` times (parents first: a prefix is useful without its suffix)."""
        if self.backup is None:
            return
        if self._unbacked:
            self._retry_backups()
        if not self._reserve_backups(last, hits):
            self._unbacked.append((last, hits))
            if len(self._unbacked) > _MAX_UNBACKED:
                self._unbacked.popleft()
                self._backup_totals.dropped += 1

    def _reserve_backups(self, last: TreeNode, hits: int) -> bool:
        """Reserve and queue the backups :meth:`_schedule_backups` asks for; False when L2 or
        the queue had no room for one of them (the rest of the path is left for a retry)."""
        assert self.backup is not None
        todo = []
        node: TreeNode | None = last
        while node is not None and node.parent is not None:
            if node.state is NodeState.DEVICE and node.hit_count >= hits:
                todo.append(node)
            node = node.parent
        size = self.page_size
        for node in reversed(todo):
            pages = node.num_tokens // size
            pinned = self._backups_pending.count
            if pinned and pinned + pages > self.backup_pin_limit:
                self._backup_totals.skipped += 1  # copies are behind: retried as they land
                return False
            job = self.backup.reserve(node)  # pinned now, copied by the backup worker
            if job is None:  # no room on L2 (``todo`` holds DEVICE nodes only)
                return False
            try:
                self._backups[0].send_nowait(job)
            except (anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError):
                self.backup.rollback(job)  # full, or the cache is closing: no backup now
                return False
            self._backups_pending.add(pages)
        return True

    def _l2_unpinned(self) -> None:
        """An L3 write released its host pages: L2 has room for deferred backups, and L1
        victims that waited for a backup (``write_back``) can move there."""
        self._retry_backups()
        if self.room.waiting:
            self.room.notify()

    def queue_victim_backups(self, pages: int) -> None:
        """Under ``write_back``, back up the next ``pages`` pages' worth of L1 victims in the
        background: a synchronous reservation (a scheduler's step) cannot wait for them, and
        L1 never evicts a page without a host copy, so without this a later step would find
        no room either."""
        if self.backup is None or not self.device_tier.keep_unbacked or self.state is not _OPEN:
            return
        tokens = (pages + self.device_tier.headroom) * self.page_size
        for node in self.tree.eviction_candidates(max(1, pages)):
            if tokens <= 0:
                break
            if node.state is not NodeState.DEVICE:
                continue  # backed up already, or on its way
            tokens -= node.num_tokens
            if not self._reserve_backups(node, hits=0):
                break

    def _retry_backups(self) -> None:
        """Retry the paths whose backups found no room, oldest first, while L2 can take them
        (when a request schedules backups, when a backup batch lands and when an L3 write
        releases its host pages)."""
        if self.backup is None or self.state is not _OPEN:
            return
        if self._backups_pending.count >= self.backup_pin_limit:
            return  # copies are behind: the next landed batch retries
        host = self.host_pool.allocator if self.host_pool is not None else None
        while self._unbacked and host is not None:
            if not host.available and not self.tree.evictable_size(RadixTier.HOST):
                return  # nothing L2 could free now: a reservation would only fail again
            last, hits = self._unbacked[0]
            if last.state is NodeState.REMOVED:
                self._unbacked.popleft()
                continue
            if not self._reserve_backups(last, hits):
                return
            self._unbacked.popleft()
            self._backup_totals.retried += 1

    async def _backup_worker(self) -> None:
        assert self.backup is not None or not self._backups_pending.count
        receive = self._backups[1]
        async with receive:
            async for first in receive:
                jobs = [first]
                while len(jobs) < self.backup_batch:  # one copy for everything queued
                    try:
                        jobs.append(receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                try:
                    if self.backup is not None:
                        with self.health.contain("backup"):  # rolled back, counted; go on
                            await self.backup.run_batch(jobs)
                finally:
                    self._backups_pending.done(sum(job.tokens for job in jobs) // self.page_size)
                if self._unbacked:  # pages unpinned: deferred backups may fit now
                    self._retry_backups()

    # -- numbers --------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        """A JSON-ready snapshot of hits, occupancy, transitions, queues and faults."""
        ps, tree = self.page_size, self.tree

        def occupancy_of(allocator: PagedAllocator, tier: RadixTier) -> TierStats:
            return TierStats(
                capacity_pages=allocator.usable,
                used_pages=allocator.used,
                locked_pages=tree.protected_size(tier) // ps,
                evictable_pages=tree.evictable_size(tier) // ps,
            )

        occupancy = {Tier.DEVICE: occupancy_of(self.l1.allocator, RadixTier.DEVICE)}
        if self.host_pool is not None:
            occupancy[Tier.HOST] = occupancy_of(self.host_pool.allocator, RadixTier.HOST)
        queues = {
            "backup": QueueStats(
                depth=self._backups[1].statistics().current_buffer_used,
                capacity=int(self._backups[1].statistics().max_buffer_size),
            )
        }
        if self.write_back is not None:
            queues["write_back"] = QueueStats(
                depth=self.write_back.depth, capacity=self.write_back.capacity
            )
        snapshot = CacheStats.from_counters(
            self.counters,
            occupancy,
            queues=queues,
            events_published=self.hub.published,
            events_dropped=self.hub.dropped,
            kv_publisher=self.publisher.stats() if self.publisher is not None else None,
            tp_rounds=self.consensus.rounds if self.consensus is not None else 0,
            tp_unpaired_rounds=self.consensus.unpaired if self.consensus is not None else 0,
            background_failures=dict(self.health.failures),
            degraded=self.health.degraded,
        )
        if self.storage is None:
            return snapshot
        # The runtime's own faults (write-backs past their deadline) plus the backend's.
        backend = self.storage.stats
        storage = StorageStats(
            errors=snapshot.storage.errors + backend.error_count,
            corrupt_pages=snapshot.storage.corrupt_pages + backend.errors.get("corrupt", 0),
            threads_left_behind=backend.threads_left_behind,
            threads_stuck=backend.threads_stuck,
        )
        return snapshot.model_copy(update={"storage": storage})

    def __repr__(self) -> str:
        return (
            f"HiCache(state={self.state.value}, device_pages={self.config.device_pages}, "
            f"host_pages={self.config.resolved_host_pages}, "
            f"storage={self.config.storage_backend!r})"
        )


def _on_asyncio() -> bool:
    """Whether the calling task runs on an asyncio loop (not trio)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
