"""The Mooncake Store L3 backend (``mooncake``): pages in a Mooncake distributed store.

Pages move zero-copy: the host pool's memory is registered with the store client once, and
``batch_put_from_multi_buffers`` / ``batch_get_into_multi_buffers`` transfer a page straight
from / into its segments in the pool (one segment for the page-first layouts, one per layer
and plane for layer-first), followed by the 64-byte codec trailer from a small registered
arena. Every read is verified before it counts as a hit.

The store client's calls block (they release the GIL), so they run in worker threads bounded
by ``io_threads``; a cancelled batch starts no new call and waits for the one in flight, so
no thread writes into a host page after the coroutine returns. Mooncake does not report the
objects its own eviction drops, so those produce no ``BlockRemoved`` events.
"""

from __future__ import annotations

import ctypes
import os
import queue
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import anyio
import numpy as np

from hicache_async.errors import ConfigError, CorruptPageError, StorageError
from hicache_async.storage import HiCacheStorage, HiCacheStorageConfig, PageBuffer
from hicache_async.storage.codec import TRAILER_SIZE, checksum, key_digest
from hicache_async.storage.threads import run_in_threads
from hicache_mooncake._options import MooncakeOptions

__all__ = ["MooncakeStorage", "describe_error"]

_INSTALL_HINT = (
    "the mooncake backend needs Mooncake's store client: pip install "
    "mooncake-transfer-engine (mooncake-transfer-engine-non-cuda on machines without CUDA); "
    "its TCP transport also needs libibverbs1 (apt-get install libibverbs1)"
)

_RETRIES_ENV = "MC_STORE_CLIENT_SETUP_RETRIES"
_USER_RETRIES = _RETRIES_ENV in os.environ  # the user's own setting wins over setup_retries

# Mooncake's error codes (mooncake-store's ErrorCode) that this backend tells apart.
_NOT_FOUND = -704
_ALREADY_EXISTS = -705
_ERRORS = {
    -200: "no available handle (the store is full)",
    -600: "invalid parameters (the stored object has another size)",
    _NOT_FOUND: "object not found",
    _ALREADY_EXISTS: "object already exists",
    -706: "object has a lease",
    -800: "transfer failed",
    -900: "master RPC failed",
}


def describe_error(code: int) -> str:
    """A readable name for a Mooncake error code."""
    return f"mooncake error {code}: {_ERRORS.get(code, 'see mooncake-store ErrorCode')}"


def _address(view: memoryview) -> int:
    # The address of a writable buffer's first byte (no copy).
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class _Outcome:
    """What a worker thread found for one page; filed in the stats on the loop."""

    __slots__ = ("error", "kind")

    def __init__(self, kind: str, error: str) -> None:
        self.kind = kind
        self.error = error


class MooncakeStorage(HiCacheStorage):
    """Pages in Mooncake Store, moved zero-copy from and into registered host pages."""

    name = "mooncake"
    options_model = MooncakeOptions

    def __init__(
        self, config: HiCacheStorageConfig, options: MooncakeOptions | None = None
    ) -> None:
        super().__init__(config, options)
        opts = self.options
        assert isinstance(opts, MooncakeOptions)
        self.mooncake_options = opts
        try:
            from mooncake.store import MooncakeDistributedStore, ReplicateConfig
        except ImportError as exc:
            raise ConfigError(f"{_INSTALL_HINT} ({exc})") from exc
        self._store: Any = MooncakeDistributedStore()
        self._replicate: Any = ReplicateConfig()
        self._replicate.replica_num = opts.replicas
        self._connected = False
        self._failed_at: float | None = None  # when the last connect failed (monotonic)
        self._failure = ""
        self._connect_lock: anyio.Lock | None = None
        self._limiter: anyio.CapacityLimiter | None = None
        # Buffers registered with the client, by address (the pool, the trailer arenas).
        self._registered: dict[int, int] = {}
        # One trailer arena per worker thread: at most io_threads store calls run at once.
        self._arenas: queue.SimpleQueue[np.ndarray[Any, Any]] = queue.SimpleQueue()
        self._arena_list = [
            np.zeros(opts.batch_keys * TRAILER_SIZE, dtype=np.uint8) for _ in range(opts.io_threads)
        ]
        for arena in self._arena_list:
            self._arenas.put(arena)

    # -- connection -----------------------------------------------------------------------

    async def _ready(self) -> None:
        """Connect on first use (in a thread: setup takes a while) and register buffers: the
        arenas, and the host pool registered last (a new pool replaces the old one here)."""
        if self._connect_lock is None:
            self._connect_lock = anyio.Lock()
        async with self._connect_lock:
            if not self._connected:
                await self._connect()
            wanted = [(a.ctypes.data, a.nbytes) for a in self._arena_list]
            if self.mem_pool_host is not None:
                pool = self.mem_pool_host
                wanted.append((pool.buffer.data_ptr(), pool.nbytes))
            stale = [ptr for ptr in self._registered if (ptr, self._registered[ptr]) not in wanted]
            missing = [(ptr, size) for ptr, size in wanted if self._registered.get(ptr) != size]
            if stale or missing:  # a new pool was registered (the old one may be gone)
                await self._call(lambda: self._register(stale, missing))

    async def _connect(self) -> None:
        # A master that is down costs seconds per attempt: after a failure, calls are misses
        # at once until reconnect_interval has passed.
        now = time.monotonic()
        wait = self.mooncake_options.reconnect_interval
        if self._failed_at is not None and now - self._failed_at < wait:
            raise StorageError(self._failure)
        try:
            await self._call(self._setup)
        except StorageError as exc:
            self._failed_at, self._failure = time.monotonic(), str(exc)
            raise
        self._connected, self._failed_at = True, None

    def _setup(self) -> None:
        opts = self.mooncake_options
        if not _USER_RETRIES:  # Mooncake reads its retry count from the environment only
            os.environ[_RETRIES_ENV] = str(opts.setup_retries)
        rc = self._store.setup(
            opts.local_hostname,
            opts.metadata_server,
            opts.global_segment_size,
            opts.local_buffer_size,
            opts.protocol,
            opts.device_name,
            opts.master_server_address,
        )
        if rc != 0:
            raise StorageError(
                f"mooncake setup failed ({rc}): is mooncake_master running at "
                f"{opts.master_server_address} (metadata {opts.metadata_server})?"
            )

    def _register(self, stale: list[int], buffers: list[tuple[int, int]]) -> None:
        for ptr in stale:
            self._store.unregister_buffer(ptr)
            del self._registered[ptr]
        for ptr, size in buffers:
            rc = self._store.register_buffer(ptr, size)
            if rc != 0:
                raise StorageError(f"mooncake register_buffer failed: {describe_error(rc)}")
            self._registered[ptr] = size

    def _threads(self) -> anyio.CapacityLimiter:
        if self._limiter is None:  # created on first use: it belongs to the running loop
            self._limiter = anyio.CapacityLimiter(self.mooncake_options.io_threads)
        return self._limiter

    async def _call(self, fn: Callable[[], None]) -> None:
        await run_in_threads(lambda _i: fn(), 1, limiter=self._threads(), workers=1)

    async def _chunked(self, count: int, fn: Callable[[int, int], None]) -> None:
        """Run ``fn(lo, hi)`` over ``batch_keys``-sized slices of ``range(count)`` in threads."""
        step = self.mooncake_options.batch_keys
        bounds = [(lo, min(lo + step, count)) for lo in range(0, count, step)]
        await run_in_threads(
            lambda i: fn(*bounds[i]),
            len(bounds),
            limiter=self._threads(),
            workers=self.mooncake_options.io_threads,
        )

    # -- the primitives -------------------------------------------------------------------

    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await self._ready()
        names = self._names(keys)
        found = [False] * len(keys)
        outcomes: list[_Outcome | None] = [None] * len(keys)
        codec = self.codec

        def read(lo: int, hi: int) -> None:
            arena = self._arenas.get()
            try:
                base = arena.ctypes.data
                ptrs, sizes = self._segments(buffers[lo:hi], base)
                codes = self._store.batch_get_into_multi_buffers(names[lo:hi], ptrs, sizes)
                for j, code in enumerate(codes):
                    i = lo + j
                    size = sum(sizes[j])
                    if code == size:
                        trailer = arena[j * TRAILER_SIZE : (j + 1) * TRAILER_SIZE].data
                        payload = size - TRAILER_SIZE
                        try:
                            want = codec.check_trailer(trailer, key_digest(keys[i]), payload)
                            if want != checksum(buffers[i]):
                                raise CorruptPageError("the payload fails its checksum")
                        except CorruptPageError as exc:
                            outcomes[i] = _Outcome("corrupt", str(exc))
                        else:
                            found[i] = True
                    elif code != _NOT_FOUND:
                        outcomes[i] = _Outcome("backend", describe_error(int(code)))
            finally:
                self._arenas.put(arena)

        await self._chunked(len(keys), read)
        corrupt = self._file(outcomes)
        if corrupt:  # removed, so that the page can be written again
            await self._remove([names[i] for i in corrupt])
        return found

    async def _write_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        await self._ready()
        names = self._names(keys)
        stored = [False] * len(keys)
        outcomes: list[_Outcome | None] = [None] * len(keys)
        skipped = [0]
        codec = self.codec

        def write(lo: int, hi: int) -> None:
            # Mooncake overwrites an existing key, so existing pages are filtered out first.
            exists = self._store.batch_is_exist(names[lo:hi])
            todo = [lo + j for j, e in enumerate(exists) if e != 1]
            for j, e in enumerate(exists):
                if e == 1:
                    stored[lo + j] = True
                    skipped[0] += 1
            if not todo:
                return
            arena = self._arenas.get()
            try:
                for n, i in enumerate(todo):
                    trailer = codec.trailer(key_digest(keys[i]), buffers[i])
                    arena[n * TRAILER_SIZE : (n + 1) * TRAILER_SIZE] = np.frombuffer(
                        trailer, dtype=np.uint8
                    )
                ptrs, sizes = self._segments([buffers[i] for i in todo], arena.ctypes.data)
                codes = self._store.batch_put_from_multi_buffers(
                    [names[i] for i in todo], ptrs, sizes, self._replicate
                )
            finally:
                self._arenas.put(arena)
            for i, code in zip(todo, codes, strict=True):
                if code == 0:
                    stored[i] = True
                elif code == _ALREADY_EXISTS:  # a concurrent writer of the same key won
                    stored[i] = True
                    skipped[0] += 1
                else:
                    outcomes[i] = _Outcome("backend", describe_error(int(code)))

        await self._chunked(len(keys), write)
        self._file(outcomes)
        self.stats.set_skipped += skipped[0]
        return stored

    async def _leading(self, keys: list[str]) -> int:
        await self._ready()
        names = self._names(keys)
        answers: list[int] = []

        def exists() -> None:
            answers.extend(int(e) for e in self._store.batch_is_exist(names))

        await self._call(exists)
        for i, answer in enumerate(answers):
            if answer != 1:
                if answer < 0:
                    self.stats.record_error("backend", describe_error(answer))
                return i
        return len(keys)

    async def _clear(self) -> None:
        await self._ready()
        pattern = "^" + re.escape(self.mooncake_options.prefix)
        result: list[int] = []
        # force: objects read in the last few seconds hold a lease that blocks removal.
        await self._call(lambda: result.append(self._store.remove_by_regex(pattern, force=True)))
        if result[0] < 0:
            raise StorageError(f"mooncake clear failed: {describe_error(result[0])}")

    async def _aclose(self) -> None:
        def close() -> None:
            for ptr in list(self._registered):
                self._store.unregister_buffer(ptr)
            self._registered.clear()
            self._store.close()

        if self._connected:
            await self._call(close)

    def _extra_stats(self) -> dict[str, Any]:
        opts = self.mooncake_options
        return {
            "master": opts.master_server_address,
            "protocol": opts.protocol,
            "prefix": opts.prefix,
            "global_segment_size": opts.global_segment_size,
        }

    # -- helpers --------------------------------------------------------------------------

    def _names(self, keys: list[str]) -> list[str]:
        prefix = self.mooncake_options.prefix
        return [prefix + key for key in keys]

    @staticmethod
    def _segments(
        buffers: Sequence[PageBuffer], arena: int
    ) -> tuple[list[list[int]], list[list[int]]]:
        """Per page: the addresses and sizes of its segments, then of its trailer slot."""
        ptrs: list[list[int]] = []
        sizes: list[list[int]] = []
        for n, buffer in enumerate(buffers):
            ptrs.append([*(_address(s) for s in buffer), arena + n * TRAILER_SIZE])
            sizes.append([*(len(s) for s in buffer), TRAILER_SIZE])
        return ptrs, sizes

    def _file(self, outcomes: list[_Outcome | None]) -> list[int]:
        """Count the workers' errors; the indices of the corrupt pages."""
        corrupt = []
        for i, outcome in enumerate(outcomes):
            if outcome is not None:
                self.stats.record_error(outcome.kind, outcome.error)
                if outcome.kind == "corrupt":
                    corrupt.append(i)
        return corrupt

    async def _remove(self, names: list[str]) -> None:
        await self._call(lambda: self._store.batch_remove(names, force=True))
