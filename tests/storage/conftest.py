"""Real redis-server and Mooncake Store processes for the storage tests (`make test` installs
them when missing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

from hicache_async.testing.mooncake_server import MooncakeStore, mooncake_missing
from hicache_async.testing.redis_server import (
    RedisClusterProcesses,
    RedisProcess,
    require_redis_server,
)


class _Server(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


S = TypeVar("S", bound=_Server)


def _require() -> None:
    try:
        require_redis_server()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


def _running(server: S) -> Iterator[S]:
    """Start ``server``, hand it to the test(s), stop it afterwards."""
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    _require()
    yield from _running(RedisProcess(tmp_path_factory.mktemp("redis")))


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
    yield from _running(RedisProcess(tmp_path / "redis"))


def _require_mooncake() -> None:
    missing = mooncake_missing()
    if missing is not None:
        pytest.skip(missing)


@pytest.fixture(scope="session")
def mooncake_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MooncakeStore]:
    """A real Mooncake master and store node on loopback (skipped where Mooncake is missing)."""
    _require_mooncake()
    yield from _running(MooncakeStore(tmp_path_factory.mktemp("mooncake")))


@pytest.fixture
def mooncake_own_store(tmp_path: Path) -> Iterator[MooncakeStore]:
    """A store of the test's own, whose node it may kill."""
    _require_mooncake()
    yield from _running(MooncakeStore(tmp_path / "mooncake"))
