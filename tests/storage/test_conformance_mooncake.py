"""The conformance kit against a real Mooncake Store (master + store node on loopback)."""

from __future__ import annotations

import uuid

import pytest

from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing.mooncake_server import MooncakeStore
from hicache_async.testing.storage import StorageConformance, StorageFactory


# The backend's work runs in Mooncake's threads, whatever the loop; and each client takes ~1 s
# to close (Mooncake's teardown), so the suite runs on one loop.
@pytest.mark.one_loop
class TestMooncakeConformance(StorageConformance):
    cancel_pages = 64

    @pytest.fixture
    def storage_factory(self, mooncake_store: MooncakeStore) -> StorageFactory:
        # A key prefix of the test's own: the store starts empty for it.
        prefix = f"t{uuid.uuid4().hex[:12]}:"

        def make(config: HiCacheStorageConfig):
            return create_storage("mooncake", config, **mooncake_store.options(prefix=prefix))

        return make
