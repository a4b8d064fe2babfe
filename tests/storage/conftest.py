"""Real redis-server processes for the storage tests (installed by `make test`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hicache_async.testing.mooncake_server import MooncakeStore, mooncake_missing
from hicache_async.testing.redis_server import (
    RedisClusterProcesses,
    RedisProcess,
    require_redis_server,
)


def _require() -> None:
    try:
        require_redis_server()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def redis_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    _require()
    server = RedisProcess(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    _require()
    cluster = RedisClusterProcesses(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_own_node(tmp_path: Path) -> Iterator[RedisProcess]:
    """A server of the test's own, which it may kill and restart."""
    _require()
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mooncake_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeStore]:
    """A real Mooncake master and store node on loopback (skipped where Mooncake is missing)."""
    missing = mooncake_missing()
    if missing is not None:
        pytest.skip(missing)
    store = MooncakeStore(tmp_path_factory.mktemp("mooncake"))
    store.start()
    try:
        yield store
    finally:
        store.stop()


@pytest.fixture
def mooncake_own_store(tmp_path: Path) -> Iterator[MooncakeStore]:
    """A store of the test's own, whose node it may kill."""
    missing = mooncake_missing()
    if missing is not None:
        pytest.skip(missing)
    store = MooncakeStore(tmp_path / "mooncake")
    store.start()
    try:
        yield store
    finally:
        store.stop()
