"""A pytest plugin (entry point ``pytest11``) that gives async test suites a ready cache.

Fixtures:

* ``hicache_config``: a small CPU configuration with a file L3 in the test's ``tmp_path``
  (``model_name="pytest"``, which a file L3 needs); override it in your ``conftest.py`` to
  change the layout or the policies;
* ``hicache``: a :class:`~hicache_async.HiCache` opened on that configuration, closed after the
  test (its background work drained first).

The fixtures are async and need ``pytest-asyncio`` (installed with the ``test`` extra).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from hicache_async.cache import HiCache
from hicache_async.config import HiCacheConfig
from hicache_async.layout import KVLayout

__all__ = ["hicache", "hicache_config"]


@pytest.fixture
def hicache_config(tmp_path: Path) -> HiCacheConfig:
    """A small cache: 2 layers, 64 L1 pages of 16 tokens, 128 L2 pages, file L3 in tmp_path."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype="float16", page_size=16)
    return HiCacheConfig(
        layout=layout,
        model_name="pytest",
        device="cpu",
        device_pages=64,
        host_pages=128,
        storage_backend="file",
        storage_backend_extra_config=json.dumps({"path": str(tmp_path / "hicache-l3")}),
        prefetch_threshold=16,
    )


@pytest_asyncio.fixture
async def hicache(hicache_config: HiCacheConfig) -> AsyncIterator[HiCache]:
    """An open cache for one test."""
    # pytest-asyncio may run a fixture's setup and teardown in different tasks, and a cache's
    # task group must be left by the task that entered it: one task owns the cache throughout.
    opened: asyncio.Future[HiCache] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def own() -> None:
        try:
            async with HiCache.open(hicache_config) as cache:
                opened.set_result(cache)
                await stop.wait()
        except BaseException as exc:
            if not opened.done():
                opened.set_exception(exc)
            raise

    owner = asyncio.create_task(own())
    try:
        yield await opened
    finally:
        stop.set()
        await owner
