"""The memory L3 backend (``memory``): pages as values in an in-process :class:`MemoryStore`."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from hicache_async.storage import BlobStorage, HiCacheStorageConfig
from hicache_memory._store import MemoryStore, named_store

__all__ = ["MemoryOptions", "MemoryStorage"]


class MemoryOptions(BaseModel):
    """Options of the memory backend."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    capacity_bytes: int | None = Field(
        default=1 << 30, gt=0, description="Bytes kept before the oldest pages go; None: no limit."
    )
    store: str | MemoryStore | None = Field(
        default=None,
        description="Share a store: a MemoryStore object, or a name shared in this process. "
        "Unset: a store of this backend's own.",
    )


class MemoryStorage(BlobStorage):
    """An in-process L3 (tests, single-process sharing). Works on the loop: no threads."""

    name = "memory"
    options_model = MemoryOptions

    def __init__(self, config: HiCacheStorageConfig, options: MemoryOptions | None = None) -> None:
        super().__init__(config, options)
        opts = self.options
        assert isinstance(opts, MemoryOptions)
        if isinstance(opts.store, MemoryStore):
            self.store = opts.store
        elif isinstance(opts.store, str):
            self.store = named_store(opts.store, opts.capacity_bytes)
        else:
            self.store = MemoryStore(opts.capacity_bytes)

    async def _get_values(self, keys: list[str]) -> list[bytes | memoryview | None]:
        return [self.store.get(k) for k in keys]

    async def _put_values(self, keys: list[str], values: list[bytes]) -> list[bool | None]:
        stored = [self.store.put(k, v) for k, v in zip(keys, values, strict=True)]
        self._removed(self.store.take_evicted())
        return stored

    async def _delete_values(self, keys: list[str]) -> None:
        for key in keys:
            self.store.delete(key)

    async def _leading(self, keys: list[str]) -> int:
        for i, key in enumerate(keys):
            if key not in self.store:
                return i
        return len(keys)

    async def _clear(self) -> None:
        self.store.clear()

    def _extra_stats(self) -> dict[str, Any]:
        return {
            "pages": len(self.store),
            "used_bytes": self.store.used_bytes,
            "capacity_bytes": self.store.capacity_bytes,
            "store_evicted_pages": self.store.evicted,
        }
