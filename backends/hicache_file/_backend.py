"""The file backend: one file a page under a two-level sharded directory tree.

``{path}/{d[0:2]}/{d[2:4]}/{d}.kv`` where ``d`` is the hex blake2b-128 digest of the
namespaced key: no caller key can escape ``path``, and no directory holds more than
1/65536 of the pages. No operation scans a directory: the one walk of the store is the
survey that the first call starts (``_survey``), which removes the temp files of killed
writers and, with ``capacity_bytes``, lists the page files for the capacity index.

The store may be changed from outside: a page found gone (by a read or an exists) leaves the
capacity index, and a page whose place holds something else than a regular file is a miss
of that page alone, removed so that the page can be written again.
"""

from __future__ import annotations

import contextlib
import enum
import os
from typing import Any

import anyio

from hicache_async.errors import ConfigError
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.storage import HiCacheStorage, HiCacheStorageConfig, PageBuffer, error_kind
from hicache_async.storage.codec import TRAILER_SIZE, key_digest
from hicache_async.storage.threads import run_in_threads
from hicache_file._lru import LruIndex
from hicache_file._options import FileOptions, make_root
from hicache_file._pageio import (
    NotAPageFileError,
    Written,
    discard_entry,
    is_page_file,
    read_page,
    remove_quietly,
    write_page,
)
from hicache_file._survey import Survey, SurveyResult

__all__ = ["FileStorage", "SurveyState"]

# One worker thread per this many bytes of a batch (up to io_threads): a smaller share costs
# more in dispatch than it gains in parallel copies.
_WORKER_BYTES = 4 << 20


class SurveyState(enum.Enum):
    """Where the one walk of the store stands."""

    PENDING = "pending"  # not started: no call yet
    RUNNING = "running"  # walking in its thread (calls wait for it only for a capacity index)
    DONE = "done"  # ended, and its result folded in


class FileStorage(HiCacheStorage):
    """Pages as files, read with ``preadv`` into host pages and checked on every read."""

    name = "file"
    options_model = FileOptions

    def __init__(self, config: HiCacheStorageConfig, options: FileOptions | None = None) -> None:
        super().__init__(config, options)
        opts = self.options
        assert isinstance(opts, FileOptions)
        self.file_options = opts
        self.root = make_root(opts.path)
        self._limiter: anyio.CapacityLimiter | None = None
        self._index = LruIndex(opts.capacity_bytes) if opts.capacity_bytes else None
        self._survey = Survey(self.root, sizes=self._index is not None)
        self._survey_state = SurveyState.PENDING
        self._surveyed = SurveyResult()  # what the folded survey found
        self._repaired = 0  # entries that were no page file, removed

    def register_mem_pool_host(self, pool: HostKVPool) -> None:
        """Read and write pages of ``pool``; a capacity must hold at least one of its pages."""
        capacity = self.file_options.capacity_bytes
        if isinstance(pool, HostKVPool) and capacity is not None:
            page_file = pool.layout.bytes_per_page + TRAILER_SIZE
            if capacity < page_file:
                raise ConfigError(
                    f"file storage: capacity_bytes={capacity} holds no page (a page file of "
                    f"this layout is {page_file} bytes); set capacity_bytes to at least "
                    f"{page_file}, or leave it unset for no limit"
                )
        super().register_mem_pool_host(pool)

    def path_of(self, key: str) -> str:
        """The file of a namespaced ``key`` (whether it exists or not)."""
        return self._path(key_digest(key).hex())

    def _path(self, hexdigest: str) -> str:
        return f"{self.root}/{hexdigest[:2]}/{hexdigest[2:4]}/{hexdigest}.kv"

    def _threads(self) -> anyio.CapacityLimiter:
        # Created on first use: a limiter belongs to the running event loop.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.file_options.io_threads)
        return self._limiter

    def _workers(self, buffers: list[PageBuffer]) -> int:
        total = sum(sum(map(len, b)) for b in buffers)
        return max(1, min(self.file_options.io_threads, total // _WORKER_BYTES))

    # -- the survey -----------------------------------------------------------------------

    async def wait_survey(self) -> SurveyResult:
        """Wait for the walk of the store (started now if no call started it) and fold it in;
        what it found."""
        self._check_open()
        await self._ready(wait=True)
        return self._surveyed

    async def _ready(self, *, wait: bool = False) -> None:
        # Every primitive starts here: the first starts the survey. A capacity index needs
        # every page file, so with one the calls wait for it (as for the index scan before).
        if self._survey_state is SurveyState.PENDING:
            self._survey_state = SurveyState.RUNNING
            self._survey.start()
        if self._survey_state is SurveyState.RUNNING:
            if wait or self._index is not None:
                await self._survey.wait()
            if self._survey.done and self._fold():
                await self._evict()

    def _fold(self) -> bool:
        # On the loop, once: the survey's result into the index and the counters. False when
        # another caller folded it meanwhile.
        if self._survey_state is not SurveyState.RUNNING:
            return False
        self._survey_state = SurveyState.DONE
        result = self._surveyed = self._survey.result
        if result.error is not None:
            self.stats.record_error(error_kind(result.error), result.error)
        elif self._index is not None:
            self._index.fill(result.pages, result.page_bytes)
        return True

    async def _end_survey(self) -> None:
        if self._survey_state is SurveyState.RUNNING:
            self._survey.stop()
            await self._survey.wait()
            self._fold()
        self._survey_state = SurveyState.DONE

    # -- the primitives -------------------------------------------------------------------

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await self._ready()
        # Digests and paths are computed in the worker threads: that keeps ~1.5 us a page off
        # the loop, overlapped with the other threads' copies.
        paths: list[str] = [""] * len(keys)
        found = [False] * len(keys)
        errors: list[BaseException | None] = [None] * len(keys)
        removed = [False] * len(keys)
        codec = self.codec

        def work(i: int) -> None:
            digest = key_digest(keys[i])
            paths[i] = self._path(digest.hex())
            try:
                found[i] = read_page(paths[i], digest, buffers[i], codec)
            except Exception as exc:
                errors[i] = exc
                # A page that fails its check, or is no page file, is removed, so the key can
                # be written again.
                removed[i] = discard_entry(paths[i])

        await run_in_threads(
            work, len(keys), limiter=self._threads(), workers=self._workers(buffers)
        )
        for i, exc in enumerate(errors):
            if exc is not None:
                self.stats.record_error(error_kind(exc), exc)
                self._repaired += isinstance(exc, NotAPageFileError) and removed[i]
            if paths[i] and self._index is not None:
                if found[i]:
                    self._index.touch(paths[i], sum(len(s) for s in buffers[i]) + TRAILER_SIZE)
                    self._index.keys[paths[i]] = keys[i]
                else:  # gone (removed from outside, or just now): no longer on the disk
                    self._index.discard(paths[i])
        return found

    async def _write_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await self._ready()
        paths: list[str] = [""] * len(keys)
        written: list[Written | None] = [None] * len(keys)  # None: not done (failed or stopped)
        errors: list[BaseException | None] = [None] * len(keys)
        codec, fsync = self.codec, self.file_options.fsync

        def work(i: int) -> None:
            digest = key_digest(keys[i])
            paths[i] = self._path(digest.hex())
            try:
                written[i] = write_page(paths[i], digest, buffers[i], codec, fsync)
            except Exception as exc:
                errors[i] = exc

        await run_in_threads(
            work, len(keys), limiter=self._threads(), workers=self._workers(buffers)
        )
        stored = []
        for i, outcome in enumerate(written):
            if errors[i] is not None:
                self.stats.record_error(error_kind(errors[i]), errors[i])  # type: ignore[arg-type]
            if outcome is Written.SKIPPED:
                self.stats.set_skipped += 1
            self._repaired += outcome is Written.REPAIRED
            if outcome is not None and self._index is not None:
                self._index.touch(paths[i], sum(len(s) for s in buffers[i]) + TRAILER_SIZE)
                self._index.keys[paths[i]] = keys[i]
            stored.append(outcome is not None)
        await self._evict()
        return stored

    async def _leading(self, keys: list[str]) -> int:
        await self._ready()
        paths = [self.path_of(k) for k in keys]

        def count() -> int:
            for i, path in enumerate(paths):
                if not is_page_file(path):
                    return i
            return len(paths)

        leading = await anyio.to_thread.run_sync(count, limiter=self._threads())
        if leading < len(paths) and self._index is not None:
            self._index.discard(paths[leading])  # gone from the disk, if it was there
        return leading

    async def _clear(self) -> None:
        # A walk of a store being emptied would find nothing worth keeping.
        await self._end_survey()
        root = self.root

        def remove_all() -> None:
            for top, dirs, files in os.walk(root, topdown=False):
                for name in files:
                    remove_quietly(os.path.join(top, name))
                for name in dirs:
                    # A concurrent writer may have filled it again: keep it then.
                    with contextlib.suppress(OSError):
                        os.rmdir(os.path.join(top, name))

        await anyio.to_thread.run_sync(remove_all, limiter=self._threads())
        if self._index is not None:
            self._index.clear()

    async def _aclose(self) -> None:
        await self._end_survey()

    async def _evict(self) -> None:
        if self._index is None or self._survey_state is not SurveyState.DONE:
            return
        victims = self._index.over_capacity()
        if not victims:
            return

        def remove(paths: list[str]) -> None:
            for path in paths:
                remove_quietly(path)

        await anyio.to_thread.run_sync(remove, victims, limiter=self._threads())
        self.stats.evicted_pages += len(victims)
        # Keys are known for pages this process wrote (a file holds only its key's digest).
        gone = [self._index.keys.pop(path, None) for path in victims]
        self._removed([key for key in gone if key is not None])

    def _extra_stats(self) -> dict[str, Any]:
        surveyed = self._surveyed
        stats: dict[str, Any] = {
            "path": self.root,
            "fsync": self.file_options.fsync,
            "survey": self._survey_state.value,
            "swept_temp_files": surveyed.swept_files,
            "swept_temp_bytes": surveyed.swept_bytes,
            "sweep_failures": surveyed.sweep_failures,
            "repaired_entries": self._repaired,
        }
        if self._index is not None:
            stats["capacity_bytes"] = self._index.capacity_bytes
            stats["used_bytes"] = self._index.used_bytes
            stats["indexed_pages"] = len(self._index)
        return stats
