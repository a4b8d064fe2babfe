"""The pytest plugin's fixtures, used the way an async test suite would."""

from __future__ import annotations

import torch

from hicache_async import CacheState, HiCache, HiCacheConfig


async def test_hicache_fixture_is_open_and_usable(hicache: HiCache) -> None:
    assert hicache.state is CacheState.OPEN
    tokens = torch.arange(48)
    for expected in (0, 48):
        async with hicache.session(tokens) as s:
            hit = await s.load()
            assert hit.length == expected
            await s.commit(await s.allocate(tokens.numel() - hit.length))


def test_hicache_config_fixture_uses_the_tests_tmp_path(hicache_config: HiCacheConfig) -> None:
    assert hicache_config.storage_backend == "file"
    assert "hicache-l3" in hicache_config.storage_options["path"]
