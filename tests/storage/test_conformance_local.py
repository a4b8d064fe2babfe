"""The conformance kit against the file and memory backends."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing.storage import StorageConformance, StorageFactory

_names = itertools.count()


class TestFileConformance(StorageConformance):
    @pytest.fixture
    def storage_factory(self, tmp_path: Path) -> StorageFactory:
        def make(config: HiCacheStorageConfig):
            return create_storage("file", config, path=tmp_path / "store")

        return make


class TestMemoryConformance(StorageConformance):
    @pytest.fixture
    def storage_factory(self) -> StorageFactory:
        name = f"conformance-{next(_names)}"

        def make(config: HiCacheStorageConfig):
            return create_storage("memory", config, store=name)

        yield make
        from hicache_memory import drop_named_store

        drop_named_store(name)
