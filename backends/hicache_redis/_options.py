"""Options of the Redis backend (keys of ``storage_backend_extra_config``)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr

__all__ = ["RedisOptions"]


class RedisOptions(BaseModel):
    """Where the Redis server (or cluster) is, and how pages are kept there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str | None = Field(
        default=None, description="redis:// or rediss:// URL; overrides host, port and db."
    )
    host: str = Field(default="127.0.0.1", description="Server host (single node).")
    port: int = Field(default=6379, gt=0, lt=65536, description="Server port (single node).")
    db: int = Field(default=0, ge=0, description="Database number (single node).")
    username: str | None = None
    password: SecretStr | None = None
    cluster_nodes: list[str] | None = Field(
        default=None,
        description="host:port of some Redis Cluster nodes: use RedisCluster instead of one node.",
    )
    prefix: str = Field(default="hicache:", description="Prepended to every key; clear() uses it.")
    ttl_seconds: int | None = Field(default=None, gt=0, description="Expire pages after this.")
    max_connections: int = Field(default=32, gt=0, description="Connection pool size.")
    socket_timeout: float = Field(default=5.0, gt=0, description="Seconds per socket operation.")
    connect_timeout: float = Field(default=2.0, gt=0, description="Seconds to connect.")
    op_timeout: float = Field(default=30.0, gt=0, description="Deadline of one batch, seconds.")
    batch_keys: int = Field(default=64, gt=0, description="Keys per pipeline round trip.")
