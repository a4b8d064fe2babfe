"""The ``HiCacheStorage`` contract: what the runtime calls, and what a backend implements.

The public coroutines (``batch_get_v1``, ``batch_set_v1``, ``batch_exists``, ...) live here,
once: they check the caller's input (a caller bug is a clear exception), namespace the keys
(SGLang's suffix rule), turn host token slots into page views, and translate every backend
failure into a miss or a failed set plus a counted error (a backend failure never reaches the
caller of a batch op). A backend implements five small primitives on namespaced keys and
page buffers (lists of writable ``memoryview`` segments in canonical byte order):
``_read_pages``, ``_write_pages``, ``_leading``, ``_clear`` and ``_aclose``.
"""

from __future__ import annotations

import abc
import enum
import errno
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, ClassVar, Self

import anyio
import torch
from pydantic import BaseModel, ConfigDict

from hicache_async.errors import (
    ClosedError,
    ConfigError,
    CorruptPageError,
    LayoutError,
    StorageError,
)
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.memory.slots import slots_to_pages
from hicache_async.storage._config import (
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    namespace_suffix,
)
from hicache_async.storage._stats import StorageStats
from hicache_async.storage.codec import PageCodec

__all__ = ["HiCacheStorage", "NoOptions", "PageBuffer", "StorageState", "error_kind"]

PageBuffer = list[memoryview]
"""One page's bytes in canonical order, as one or more writable segments."""


class NoOptions(BaseModel):
    """The options model of a backend that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageState(enum.Enum):
    """Lifecycle of a backend instance."""

    OPEN = "open"  # usable
    CLOSED = "closed"  # aclose() ran; every further call raises ClosedError


def error_kind(exc: BaseException) -> str:
    """The counter an exception is filed under."""
    if isinstance(exc, CorruptPageError):
        return "corrupt"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "nospace"
    if isinstance(exc, StorageError):
        return "storage"
    if isinstance(exc, OSError):
        return "io"
    return "backend"


def _tensor_buffer(tensor: torch.Tensor) -> memoryview:
    # A flat byte view of a CPU tensor's memory (no copy when it is contiguous).
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise LayoutError("get/set take contiguous CPU tensors; pass tensor.contiguous().cpu()")
    view: memoryview = tensor.reshape(-1).view(torch.uint8).numpy().data
    return view


class HiCacheStorage(abc.ABC):
    """An L3 store of KV pages, keyed by strings (chained page hashes).

    Keys are namespaced here (see :func:`namespace_suffix`), so two tensor-parallel ranks of
    an MHA model never see each other's pages and MLA pages are shared by all ranks.
    ``host_indices`` are token slots of the registered host pool, whole pages in order
    (``len(keys) * page_size`` of them, int64), as in SGLang.
    """

    #: The registry name; subclasses set it.
    name: ClassVar[str] = "abstract"
    #: The pydantic model of the backend's options (unknown keys are rejected).
    options_model: ClassVar[type[BaseModel]] = NoOptions
    #: The backend's client runs on asyncio only (e.g. redis.asyncio): refused on trio.
    asyncio_only: ClassVar[bool] = False

    def __init__(self, config: HiCacheStorageConfig, options: BaseModel | None = None) -> None:
        self.config = config
        self.options = options if options is not None else self.options_model()
        self.suffix = namespace_suffix(config)
        self.mem_pool_host: HostKVPool | None = None
        # Pages written before a pool is registered (tensor get/set) carry no layout.
        self.codec = PageCodec("")
        self.stats = StorageStats(backend=self.name)
        self._state = StorageState.OPEN
        # Told the (caller's) keys of pages the backend dropped on its own, e.g. by its
        # capacity LRU: the cache turns them into BlockRemoved events for routers.
        self.removal_listener: Callable[[list[str]], None] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def state(self) -> StorageState:
        """Whether the backend is open or closed."""
        return self._state

    def register_mem_pool_host(self, pool: HostKVPool) -> None:
        """Read and write pages of ``pool``; stored pages carry its layout fingerprint."""
        if not isinstance(pool, HostKVPool):
            raise ConfigError(f"register a HostKVPool, not {type(pool).__name__}")
        self.mem_pool_host = pool
        self.codec = PageCodec(pool.layout.fingerprint)

    async def aclose(self) -> None:
        """Release the backend's resources; idempotent, completes even when cancelled."""
        if self._state is StorageState.CLOSED:
            return
        self._state = StorageState.CLOSED
        with anyio.CancelScope(shield=True):
            await self._aclose()

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the v1 batch API -----------------------------------------------------------------

    async def batch_get_v1(
        self,
        keys: Sequence[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Read ``keys`` into the host pages of ``host_indices``; ``True`` per page read and
        verified. A miss, a corrupt page or a backend failure is ``False``."""
        self._check_open()
        names = self._namespaced(keys)
        if not names:
            return []
        buffers = self._page_buffers(names, host_indices)
        return await self._read_guarded(names, buffers)

    async def batch_set_v1(
        self,
        keys: Sequence[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Store the host pages of ``host_indices`` under ``keys``; ``True`` per page stored
        or already present (existing keys are not rewritten)."""
        self._check_open()
        names = self._namespaced(keys)
        if not names:
            return []
        buffers = self._page_buffers(names, host_indices)
        return await self._write_guarded(names, buffers)

    async def batch_exists(
        self, keys: Sequence[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        """How many leading ``keys`` are stored, consecutive from the first."""
        self._check_open()
        names = self._namespaced(keys)
        if not names:
            return 0
        try:
            return await self._leading(names)
        except Exception as exc:
            self.stats.record_error(error_kind(exc), exc)
            return 0

    # -- the tensor API (SGLang's older methods) ------------------------------------------

    async def get(
        self, key: str, target_location: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """The page stored under ``key`` (into ``target_location`` when given), or ``None``."""
        found = await self.batch_get(
            [key], [target_location] if target_location is not None else None
        )
        return found[0]

    async def batch_get(
        self, keys: Sequence[str], target_locations: Sequence[torch.Tensor] | None = None
    ) -> list[torch.Tensor | None]:
        """The pages under ``keys`` (into ``target_locations`` when given), ``None`` per miss.

        Without targets, page-sized ``uint8`` tensors are allocated (needs a registered pool).
        """
        self._check_open()
        names = self._namespaced(keys)
        if target_locations is None:
            size = self._pool().bytes_per_page
            targets = [torch.empty(size, dtype=torch.uint8) for _ in names]
        else:
            targets = list(target_locations)
        if len(targets) != len(names):
            raise LayoutError(f"{len(names)} keys but {len(targets)} target tensors")
        found = await self._read_guarded(names, [[_tensor_buffer(t)] for t in targets])
        return [t if ok else None for t, ok in zip(targets, found, strict=True)]

    async def set(self, key: str, value: torch.Tensor) -> bool:
        """Store ``value`` (a contiguous CPU tensor) under ``key``."""
        return await self.batch_set([key], [value])

    async def batch_set(self, keys: Sequence[str], values: Sequence[torch.Tensor]) -> bool:
        """Store ``values`` under ``keys``; ``True`` when every one is stored."""
        self._check_open()
        names = self._namespaced(keys)
        if len(values) != len(names):
            raise LayoutError(f"{len(names)} keys but {len(values)} values")
        results = await self._write_guarded(names, [[_tensor_buffer(v)] for v in values])
        return all(results)

    async def exists(self, key: str) -> bool:
        """Whether ``key`` is stored."""
        return await self.batch_exists([key]) == 1

    async def clear(self) -> None:
        """Remove every page this backend stores (all namespaces). Failures raise
        :class:`StorageError`."""
        self._check_open()
        try:
            await self._clear()
        except StorageError:
            raise
        except Exception as exc:
            raise StorageError(f"{self.name} storage: clear failed: {exc}") from exc

    def get_stats(self) -> dict[str, Any]:
        """Counters since the backend opened (JSON-serialisable)."""
        return {**self.stats.to_dict(), **self._extra_stats()}

    # -- what a backend implements --------------------------------------------------------

    @abc.abstractmethod
    async def _read_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        """Fill ``buffers`` from the pages under the (namespaced) ``keys``; verify each with
        :attr:`codec`; ``False`` for a miss or a failed check (count it in :attr:`stats`)."""

    @abc.abstractmethod
    async def _write_pages(self, keys: list[str], buffers: list[PageBuffer]) -> list[bool]:
        """Store ``buffers`` under ``keys``, skipping keys already stored (count those in
        ``stats.set_skipped``); ``False`` for a page that could not be stored."""

    @abc.abstractmethod
    async def _leading(self, keys: list[str]) -> int:
        """How many leading ``keys`` are stored."""

    @abc.abstractmethod
    async def _clear(self) -> None:
        """Remove every stored page."""

    async def _aclose(self) -> None:  # noqa: B027 (optional hook)
        """Release resources (called once, shielded from cancellation)."""

    def _extra_stats(self) -> dict[str, Any]:
        """Backend-specific figures for :meth:`get_stats`."""
        return {}

    # -- helpers --------------------------------------------------------------------------

    async def _read_guarded(self, names: list[str], buffers: list[PageBuffer]) -> list[bool]:
        try:
            found = await self._read_pages(names, buffers)
        except Exception as exc:
            self.stats.record_error(error_kind(exc), exc)
            found = [False] * len(names)
        self.stats.get_pages += len(names)
        for ok, buffer in zip(found, buffers, strict=True):
            if ok:
                self.stats.get_hits += 1
                self.stats.bytes_read += sum(len(s) for s in buffer)
        return found

    async def _write_guarded(self, names: list[str], buffers: list[PageBuffer]) -> list[bool]:
        skipped_before = self.stats.set_skipped
        try:
            stored = await self._write_pages(names, buffers)
        except Exception as exc:
            self.stats.record_error(error_kind(exc), exc)
            stored = [False] * len(names)
        skipped = self.stats.set_skipped - skipped_before
        ok = sum(stored)
        self.stats.set_pages += len(names)
        self.stats.set_written += ok - skipped
        self.stats.set_failed += len(names) - ok
        self.stats.bytes_written += sum(
            sum(len(s) for s in buffer)
            for good, buffer in zip(stored, buffers, strict=True)
            if good
        )
        return stored

    def _removed(self, names: list[str]) -> None:
        """Report namespaced keys the backend dropped by itself (call on the loop)."""
        if names and self.removal_listener is not None:
            cut = len(self.suffix)
            self.removal_listener([name[:-cut] if cut else name for name in names])

    def _check_open(self) -> None:
        if self._state is StorageState.CLOSED:
            raise ClosedError(f"the {self.name} storage backend is closed")

    def _pool(self) -> HostKVPool:
        if self.mem_pool_host is None:
            raise ConfigError("no host pool: call register_mem_pool_host(pool) first")
        return self.mem_pool_host

    def _namespaced(self, keys: Sequence[str]) -> list[str]:
        # A caller's bug, refused before any backend call (so no page is half-written).
        if isinstance(keys, str | bytes) or not isinstance(keys, Iterable):
            raise StorageError(
                f"{self.name} storage: keys must be a list of str page keys, not a "
                f"{type(keys).__name__}; wrap a single key in a list"
            )
        names = []
        for index, key in enumerate(keys):
            if not isinstance(key, str) or not key:
                raise StorageError(
                    f"{self.name} storage: keys[{index}] is {key!r}; every key is a non-empty "
                    f"str (e.g. a page's hex hash)"
                )
            names.append(key + self.suffix)
        return names

    def _page_buffers(self, names: list[str], host_indices: torch.Tensor) -> list[PageBuffer]:
        pool = self._pool()
        if not isinstance(host_indices, torch.Tensor):
            raise LayoutError(f"host_indices must be an int64 tensor, not {type(host_indices)}")
        expected = len(names) * pool.page_size
        if host_indices.numel() != expected:
            raise LayoutError(
                f"{len(names)} keys need {expected} host token slots ({pool.page_size} a page), "
                f"got {host_indices.numel()}"
            )
        pages = slots_to_pages(host_indices.reshape(-1).cpu(), pool.page_size).tolist()
        return [pool.page_segments(page) for page in pages]

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"{kind}(name={self.name!r}, suffix={self.suffix!r}, {self._state.value})"
