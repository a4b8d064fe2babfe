"""The file backend: one file a page under a two-level sharded directory tree.

``{path}/{d[0:2]}/{d[2:4]}/{d}.kv`` where ``d`` is the hex blake2b-128 digest of the
namespaced key: no caller key can escape ``path``, and no directory holds more than
1/65536 of the pages. No operation scans a directory (only the one-time capacity index build).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import anyio

from hicache_async.storage import HiCacheStorage, HiCacheStorageConfig, PageBuffer, error_kind
from hicache_async.storage.codec import TRAILER_SIZE, key_digest
from hicache_async.storage.threads import run_in_threads
from hicache_file._lru import LruIndex, scan_store
from hicache_file._options import FileOptions
from hicache_file._pageio import read_page, remove_quietly, write_page

__all__ = ["FileStorage"]

# One worker thread per this many bytes of a batch (up to io_threads): a smaller share costs
# more in dispatch than it gains in parallel copies.
_WORKER_BYTES = 4 << 20


class FileStorage(HiCacheStorage):
    """Pages as files, read with ``preadv`` into host pages and checked on every read."""

    name = "file"
    options_model = FileOptions

    def __init__(self, config: HiCacheStorageConfig, options: FileOptions | None = None) -> None:
        super().__init__(config, options)
        opts = self.options
        assert isinstance(opts, FileOptions)
        self.file_options = opts
        self.root = str(opts.path.expanduser().resolve())
        os.makedirs(self.root, exist_ok=True)
        self._limiter: anyio.CapacityLimiter | None = None
        self._index = LruIndex(opts.capacity_bytes) if opts.capacity_bytes else None
        self._index_built = False
        self._index_lock: anyio.Lock | None = None

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

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await self._build_index()
        # Digests and paths are computed in the worker threads: that keeps ~1.5 us a page off
        # the loop, overlapped with the other threads' copies.
        paths: list[str] = [""] * len(keys)
        found = [False] * len(keys)
        errors: list[BaseException | None] = [None] * len(keys)
        codec = self.codec

        def work(i: int) -> None:
            digest = key_digest(keys[i])
            paths[i] = self._path(digest.hex())
            try:
                found[i] = read_page(paths[i], digest, buffers[i], codec)
            except Exception as exc:
                errors[i] = exc
                # A page that fails its check is removed, so the key can be written again.
                remove_quietly(paths[i])

        await run_in_threads(
            work, len(keys), limiter=self._threads(), workers=self._workers(buffers)
        )
        for i, exc in enumerate(errors):
            if exc is not None:
                self.stats.record_error(error_kind(exc), exc)
                if self._index is not None and paths[i]:
                    self._index.discard(paths[i])
            elif found[i] and self._index is not None and paths[i]:
                self._index.touch(paths[i], sum(len(s) for s in buffers[i]) + TRAILER_SIZE)
                self._index.keys[paths[i]] = keys[i]
        return found

    async def _write_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await self._build_index()
        paths: list[str] = [""] * len(keys)
        written: list[bool | None] = [None] * len(keys)  # None: not done (failed or stopped)
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
            if outcome is False:
                self.stats.set_skipped += 1
            if outcome is not None and self._index is not None:
                self._index.touch(paths[i], sum(len(s) for s in buffers[i]) + TRAILER_SIZE)
                self._index.keys[paths[i]] = keys[i]
            stored.append(outcome is not None)
        await self._evict()
        return stored

    async def _leading(self, keys: list[str]) -> int:
        paths = [self.path_of(k) for k in keys]

        def count() -> int:
            for i, path in enumerate(paths):
                if not os.path.exists(path):
                    return i
            return len(paths)

        return await anyio.to_thread.run_sync(count, limiter=self._threads())

    async def _clear(self) -> None:
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

    async def _build_index(self) -> None:
        if self._index is None or self._index_built:
            return
        if self._index_lock is None:
            self._index_lock = anyio.Lock()
        async with self._index_lock:
            if self._index_built:
                return
            found = await anyio.to_thread.run_sync(scan_store, self.root, limiter=self._threads())
            for _mtime, path, size in found:
                self._index.touch(path, size)
            self._index_built = True
        await self._evict()

    async def _evict(self) -> None:
        if self._index is None:
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
        stats: dict[str, Any] = {"path": self.root, "fsync": self.file_options.fsync}
        if self._index is not None:
            stats["capacity_bytes"] = self._index.capacity_bytes
            stats["used_bytes"] = self._index.used_bytes
            stats["indexed_pages"] = len(self._index)
        return stats
