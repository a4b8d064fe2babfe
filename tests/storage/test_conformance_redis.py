"""The conformance kit against a real redis-server, single node and a 3-node cluster."""

from __future__ import annotations

import pytest

from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.testing.redis_server import RedisClusterProcesses, RedisProcess
from hicache_async.testing.storage import StorageConformance, StorageFactory


class TestRedisConformance(StorageConformance):
    cancel_pages = 64

    @pytest.fixture
    def storage_factory(self, redis_node: RedisProcess) -> StorageFactory:
        redis_node.flushall()

        def make(config: HiCacheStorageConfig):
            return create_storage("redis", config, port=redis_node.port)

        return make


class TestRedisClusterConformance(StorageConformance):
    cancel_pages = 64

    @pytest.fixture
    def storage_factory(self, redis_cluster: RedisClusterProcesses) -> StorageFactory:
        redis_cluster.flushall()

        def make(config: HiCacheStorageConfig):
            return create_storage("redis", config, cluster_nodes=redis_cluster.addresses)

        return make
