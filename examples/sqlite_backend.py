"""A third-party L3 backend in about 60 lines of code: pages as rows of one SQLite file.

Register it in your package's ``pyproject.toml`` and it is found by name like the built-ins:

    [project.entry-points."hicache_async.storage_backends"]
    sqlite = "sqlite_backend:SQLiteStorage"

then ``HiCacheConfig(model_name=..., storage_backend="sqlite", storage_backend_extra_config=...)``
(a third-party L3 may be shared, so the cache asks for the model's name).
``BlobStorage`` adds the page codec (checksums, layout fingerprint) and the batch contract;
this class only moves values. SQLite blocks, so every call runs in one worker thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict

from hicache_async.storage import BlobStorage, HiCacheStorageConfig


class SQLiteOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    path: Path  # the database file


class SQLiteStorage(BlobStorage):
    name = "sqlite"
    options_model = SQLiteOptions

    def __init__(self, config: HiCacheStorageConfig, options: SQLiteOptions | None = None) -> None:
        super().__init__(config, options)
        assert isinstance(self.options, SQLiteOptions)
        self._db = sqlite3.connect(self.options.path, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS pages (key TEXT PRIMARY KEY, value BLOB)")
        self._lock = anyio.CapacityLimiter(1)  # one connection, one thread at a time

    async def _run(self, sql: str, rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        def work() -> list[tuple[Any, ...]]:
            with self._db:  # one transaction per batch
                return [r for row in rows for r in self._db.execute(sql, row).fetchall()]

        return await anyio.to_thread.run_sync(work, limiter=self._lock)

    async def _get_values(self, keys: list[str]) -> list[bytes | memoryview | None]:
        rows = await self._run("SELECT key, value FROM pages WHERE key = ?", [(k,) for k in keys])
        found: dict[str, bytes] = dict(rows)
        return [found.get(k) for k in keys]

    async def _put_values(self, keys: list[str], values: list[bytes]) -> list[bool | None]:
        have = {
            k
            for (k,) in await self._run("SELECT key FROM pages WHERE key = ?", [(k,) for k in keys])
        }
        new = [(k, v) for k, v in zip(keys, values, strict=True) if k not in have]
        await self._run("INSERT OR IGNORE INTO pages VALUES (?, ?)", new)
        return [None if k in have else True for k in keys]

    async def _delete_values(self, keys: list[str]) -> None:
        await self._run("DELETE FROM pages WHERE key = ?", [(k,) for k in keys])

    async def _leading(self, keys: list[str]) -> int:
        have = {
            k
            for (k,) in await self._run("SELECT key FROM pages WHERE key = ?", [(k,) for k in keys])
        }
        return next((i for i, k in enumerate(keys) if k not in have), len(keys))

    async def _clear(self) -> None:
        await self._run("DELETE FROM pages", [()])

    async def _aclose(self) -> None:
        await anyio.to_thread.run_sync(self._db.close, limiter=self._lock)
