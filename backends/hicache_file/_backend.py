"""The file backend: pages appended to segment files, found through a shared SQLite index.

``{path}/index.sqlite3`` maps each page's key digest to its place in a segment file
``{path}/segments/{id}.seg`` (see ``_store``, ``_index``, ``_segments``). Every process that
opens the directory uses the same index, so each reads the others' pages as soon as their
batch is acknowledged, and ``capacity_bytes`` bounds the directory as a whole. A batch costs
one lookup, one ``pwritev`` and one transaction, not a file per page; nothing on the hot path
lists a directory (the recovery at open reads the small ``segments`` directory once).

A store of the one-file-a-page layout (``{path}/{d[0:2]}/{d[2:4]}/{d}.kv``) stays readable:
pages the index does not hold are looked for there; they are never written again, and
``clear()`` removes them.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import anyio

from hicache_async.errors import ConfigError
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.storage import HiCacheStorage, HiCacheStorageConfig, PageBuffer, error_kind
from hicache_async.storage.codec import key_digest
from hicache_async.storage.threads import run_in_threads
from hicache_file._index import footprint
from hicache_file._options import FileOptions, make_root
from hicache_file._store import ReadPlan, Recovered, Side, Store, WriteResult

__all__ = ["FileStorage", "OpenState"]

T = TypeVar("T")

# One worker thread per this many bytes of a read batch (up to io_threads): a smaller share
# costs more in dispatch than it gains in parallel copies.
_WORKER_BYTES = 4 << 20
# Batches of this many bytes get a second worker that hashes them while the first writes.
_HASH_AHEAD = 4 << 20


def _big(buffers: list[PageBuffer]) -> bool:
    return sum(sum(map(len, b)) for b in buffers) >= _HASH_AHEAD


class OpenState(enum.Enum):
    """Where opening the store stands."""

    PENDING = "pending"  # no call yet
    OPENING = "opening"  # the index is being opened and what killed writers left recovered
    OPEN = "open"  # ready
    CLOSED = "closed"  # the index is closed


class FileStorage(HiCacheStorage):
    """Pages in segment files, read with ``preadv`` into host pages and checked on every read."""

    name = "file"
    options_model = FileOptions

    def __init__(self, config: HiCacheStorageConfig, options: FileOptions | None = None) -> None:
        super().__init__(config, options)
        opts = self.options
        assert isinstance(opts, FileOptions)
        self.file_options = opts
        self.root = make_root(opts.path)
        self._store = Store(
            self.root,
            fsync=opts.fsync,
            segment_bytes=opts.segment_bytes,
            capacity=opts.capacity_bytes,
        )
        self._limiter: anyio.CapacityLimiter | None = None
        self._open_state = OpenState.PENDING
        self._opened: anyio.Event | None = None
        self._recovered = Recovered()
        self._repaired = 0  # entries that were no segment file, removed

    def register_mem_pool_host(self, pool: HostKVPool) -> None:
        """Read and write pages of ``pool``; a capacity must hold at least one of its pages."""
        capacity = self.file_options.capacity_bytes
        if isinstance(pool, HostKVPool) and capacity is not None:
            page = footprint(pool.layout.bytes_per_page)
            if capacity < page:
                raise ConfigError(
                    f"file storage: capacity_bytes={capacity} holds no page (a page of this "
                    f"layout takes {page} bytes on the disk); set capacity_bytes to at least "
                    f"{page}, or leave it unset for no limit"
                )
        super().register_mem_pool_host(pool)

    def locate(self, key: str) -> tuple[str, int, int] | None:
        """Where the page of a namespaced ``key`` lies (segment file, offset, length), or
        ``None``; blocking (for tests and tools)."""
        return self._store.locate(key)

    def _threads(self) -> anyio.CapacityLimiter:
        # Created on first use: a limiter belongs to the running event loop.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.file_options.io_threads)
        return self._limiter

    # -- opening --------------------------------------------------------------------------

    async def wait_open(self) -> Recovered:
        """Open the store now if no call did yet; what its recovery found."""
        self._check_open()
        await self._ready()
        return self._recovered

    async def _ready(self) -> None:
        # Every primitive starts here: the first opens the index and recovers (in a thread;
        # proportional to the number of segments, not of pages); the others wait for it.
        if self._open_state is OpenState.OPEN:
            return
        if self._open_state is OpenState.PENDING:
            self._open_state = OpenState.OPENING
            self._opened = anyio.Event()
            try:
                self._recovered = await anyio.to_thread.run_sync(
                    self._store.open, limiter=self._threads()
                )
            except BaseException:
                self._open_state = OpenState.PENDING
                self._opened.set()
                raise
            self._open_state = OpenState.OPEN
            self._opened.set()
            return
        assert self._opened is not None
        await self._opened.wait()  # another call is opening it
        await self._ready()  # open now, or try again if that one failed

    # -- the primitives -------------------------------------------------------------------

    async def _in_thread(self, fn: Callable[[], T]) -> T:
        # One blocking call in a worker thread, with run_in_threads' rules: a cancelled caller
        # waits for it (or, inside leave_stuck_threads, leaves a stuck one behind).
        out: list[T] = []
        await run_in_threads(lambda _i: out.append(fn()), 1, limiter=self._threads(), workers=1)
        return out[0]

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await self._ready()
        store, codec = self._store, self.codec
        total = sum(sum(map(len, b)) for b in buffers)
        workers = max(1, min(self.file_options.io_threads, total // _WORKER_BYTES))
        # One dispatch: the first worker looks the batch up (the others wait for it), then
        # all take runs; there are at most as many runs as pages.
        planned: list[ReadPlan] = []
        lock = threading.Lock()

        def work(r: int) -> None:
            with lock:
                if not planned:
                    planned.append(store.plan(keys))
            plan = planned[0]
            if r < len(plan.runs):
                store.read_run(plan, plan.runs[r], buffers, codec)

        await run_in_threads(work, len(keys), limiter=self._threads(), workers=workers)
        plan = planned[0]
        missed = len(plan.found) < len(keys)
        if plan.bad or plan.gone_segments or (store.legacy and missed):

            def settle() -> tuple[list[BaseException], list[str]]:
                if store.legacy:
                    store.read_legacy(buffers, plan, codec)
                return store.settle(plan, buffers, codec)

            errors, removed = await self._in_thread(settle)
            for exc in errors:
                self.stats.record_error(error_kind(exc), exc)
            self._repaired += plan.repaired
            self._report_removed(removed)
        if store.note_hits(plan):  # enough recent hits to tell the LRU order about
            await self._in_thread(store.flush_touches)
        return plan.ok

    async def _write_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await self._ready()
        store, codec = self._store, self.codec
        # A big batch: a second worker computes the trailers (an xxh3 pass) while the first
        # writes; they are needed only for its commit. Whichever worker comes to them first
        # does them, so one that never starts (cancelled, one thread) costs nothing.
        trailers = Side(
            lambda: [codec.trailer(key_digest(k), b) for k, b in zip(keys, buffers, strict=True)]
        )
        results: list[WriteResult] = []
        helpers = 2 if self.file_options.io_threads > 1 and _big(buffers) else 1

        def work(i: int) -> None:
            if i == 0:
                results.append(store.write(keys, buffers, codec, trailers))
            else:
                trailers.run()

        await run_in_threads(work, helpers, limiter=self._threads(), workers=helpers)
        result = results[0]
        self.stats.set_skipped += result.skipped
        if result.error is not None:
            failed = result.stored.count(False)
            self.stats.record_error(error_kind(result.error), result.error, count=failed)
        self.stats.evicted_pages += len(result.removed_keys)
        self._report_removed(result.removed_keys)
        return result.stored

    async def _leading(self, keys: list[str]) -> int:
        await self._ready()
        store = self._store
        return await self._in_thread(lambda: store.leading(keys))

    async def _clear(self) -> None:
        await self._ready()
        await self._in_thread(self._store.clear)

    async def _aclose(self) -> None:
        if self._open_state is OpenState.OPENING:
            assert self._opened is not None
            await self._opened.wait()
        if self._open_state is OpenState.OPEN:
            await anyio.to_thread.run_sync(self._store.close, limiter=self._threads())
        self._open_state = OpenState.CLOSED

    def _report_removed(self, names: list[str]) -> None:
        # Pages of every namespace are in one index: report only this instance's.
        suffix = self.suffix
        self._removed([n for n in names if n.endswith(suffix)])

    def _extra_stats(self) -> dict[str, Any]:
        opts, rec = self.file_options, self._recovered
        stats: dict[str, Any] = {
            "path": self.root,
            "fsync": opts.fsync,
            "state": self._open_state.value,
            "segments_reclaimed": self._store.reclaimed,
            "bytes_cut": rec.bytes_cut,
            "orphan_files_removed": rec.orphan_files,
            "holes_punched_at_open": rec.holes_punched,
            "legacy_layout": self._store.legacy,
            "index_reset": rec.index_reset,
            "repaired_entries": self._repaired,
        }
        if opts.capacity_bytes is not None:
            stats["capacity_bytes"] = opts.capacity_bytes
        if self._open_state is OpenState.OPEN:
            stats.update(self._store.figures())
        return stats
