"""The Redis L3 backend (``redis``): pages as values in Redis or a Redis Cluster.

Uses ``redis.asyncio`` only (the client is asyncio-native; no threads), with a connection
pool and pipelined batches: one GET per key in a pipeline for reads, ``SET NX`` (plus ``EX``
with a TTL) for writes, so existing keys are skipped by the server. Values carry the codec
trailer and are checked before a byte reaches a host page. Every client failure (refused or
dropped connection, timeout, cluster error, a server killed mid-batch) is translated here into
misses or failed sets plus a counted error; the pool reconnects on the next call once the
server is back.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import Any

import anyio
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from hicache_async.errors import ConfigError
from hicache_async.storage import BlobStorage, HiCacheStorageConfig
from hicache_redis._options import RedisOptions, cluster_address

__all__ = ["RedisStorage"]

Client = Redis | RedisCluster


class _Failed:
    """A key of a round trip that failed as a whole (its error is counted already)."""


_FAILED = _Failed()


def _kind(exc: BaseException) -> str:
    # Which counter a client exception goes to.
    if isinstance(exc, RedisTimeoutError | builtins.TimeoutError):
        return "timeout"
    if isinstance(exc, RedisConnectionError | OSError):
        return "connection"
    return "redis"


def _node(address: str) -> ClusterNode:
    return ClusterNode(*cluster_address(address))


class RedisStorage(BlobStorage):
    """Pages in Redis (single node, or Redis Cluster when ``cluster_nodes`` is set)."""

    name = "redis"
    options_model = RedisOptions
    asyncio_only = True  # redis.asyncio

    def __init__(self, config: HiCacheStorageConfig, options: RedisOptions | None = None) -> None:
        super().__init__(config, options)
        opts = self.options
        assert isinstance(opts, RedisOptions)
        self.redis_options = opts
        self.client: Client = self._make_client(opts)

    @staticmethod
    def _make_client(opts: RedisOptions) -> Client:
        # One quick retry: a pooled connection broken by a server restart is replaced at once,
        # while a server that stays down costs one failed attempt, not a backoff series.
        common: dict[str, Any] = {
            "username": opts.username,
            "password": opts.password.get_secret_value() if opts.password else None,
            "socket_timeout": opts.socket_timeout,
            "socket_connect_timeout": opts.connect_timeout,
            "max_connections": opts.max_connections,
            "retry": Retry(NoBackoff(), 1),
        }
        if opts.cluster_nodes:
            nodes = [_node(a) for a in opts.cluster_nodes]
            return RedisCluster(startup_nodes=nodes, **common)
        if opts.url is not None:
            try:
                return Redis.from_url(opts.url, **common)
            except ValueError as exc:  # checked by RedisOptions already; a last translation
                raise ConfigError(f"redis storage: url: {exc}") from None
        return Redis(host=opts.host, port=opts.port, db=opts.db, **common)

    def _key(self, key: str) -> str:
        return self.redis_options.prefix + key

    async def _pipelined(self, keys: Sequence[str], add: Any) -> list[Any]:
        """Run ``add(pipe, key)`` for each key, ``batch_keys`` per round trip; per-key
        exceptions come back as values, a failed round trip fails its keys."""
        results: list[Any] = []
        step = self.redis_options.batch_keys
        try:
            with anyio.fail_after(self.redis_options.op_timeout):
                for start in range(0, len(keys), step):
                    part = keys[start : start + step]
                    try:
                        pipe = self.client.pipeline(transaction=False)
                        for i, key in enumerate(part):
                            add(pipe, start + i, key)
                        results.extend(await pipe.execute(raise_on_error=False))
                    except (RedisError, OSError) as exc:
                        self.stats.record_error(_kind(exc), exc, count=len(part))
                        results.extend([_FAILED] * len(part))
        except builtins.TimeoutError as exc:
            # The batch ran past op_timeout: what did not complete is a miss.
            self.stats.record_error("timeout", exc, count=len(keys) - len(results))
            results.extend([_FAILED] * (len(keys) - len(results)))
        return results

    async def _get_values(self, keys: list[str]) -> list[bytes | memoryview | None]:
        def add(pipe: Any, _i: int, key: str) -> None:
            pipe.get(self._key(key))

        values = await self._pipelined(keys, add)
        out: list[bytes | memoryview | None] = []
        for value in values:
            if isinstance(value, BaseException | _Failed):
                out.append(None)
                self._count_item_error(value)
            else:
                out.append(value)
        return out

    async def _put_values(self, keys: list[str], values: list[bytes]) -> list[bool | None]:
        ttl = self.redis_options.ttl_seconds

        def add(pipe: Any, i: int, key: str) -> None:
            pipe.set(self._key(key), values[i], nx=True, ex=ttl)

        replies = await self._pipelined(keys, add)
        out: list[bool | None] = []
        for reply in replies:
            if isinstance(reply, BaseException | _Failed):
                self._count_item_error(reply)
                out.append(False)
            else:
                out.append(True if reply else None)  # SET NX answers None when the key exists
        return out

    async def _delete_values(self, keys: list[str]) -> None:
        try:
            with anyio.fail_after(self.redis_options.op_timeout):
                await self._unlink([self._key(k) for k in keys])
        except (RedisError, OSError, builtins.TimeoutError) as exc:
            self.stats.record_error(_kind(exc), exc)

    async def _leading(self, keys: list[str]) -> int:
        def add(pipe: Any, _i: int, key: str) -> None:
            pipe.exists(self._key(key))

        replies = await self._pipelined(keys, add)
        for i, reply in enumerate(replies):
            if isinstance(reply, BaseException | _Failed) or not reply:
                return i
        return len(keys)

    async def _clear(self) -> None:
        pattern = self.redis_options.prefix.replace("*", r"\*") + "*"
        batch: list[Any] = []
        with anyio.fail_after(self.redis_options.op_timeout):
            async for key in self.client.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    await self._unlink(batch)
                    batch = []
            if batch:
                await self._unlink(batch)

    async def _unlink(self, keys: list[Any]) -> None:
        # RedisCluster splits a multi-key UNLINK by slot; one node takes it whole.
        if keys:
            await self.client.unlink(*keys)

    def _count_item_error(self, exc: BaseException | _Failed) -> None:
        # A key of a failed round trip was counted with it; a per-key error is counted here.
        if isinstance(exc, BaseException):
            self.stats.record_error(_kind(exc), exc)

    async def _aclose(self) -> None:
        await self.client.aclose()

    def _extra_stats(self) -> dict[str, Any]:
        opts = self.redis_options
        where = ",".join(opts.cluster_nodes) if opts.cluster_nodes else f"{opts.host}:{opts.port}"
        return {"server": where, "cluster": bool(opts.cluster_nodes), "prefix": opts.prefix}
