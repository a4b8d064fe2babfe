"""Options of the Redis backend (keys of ``storage_backend_extra_config``).

Every option is checked here, before a client is made: a URL redis-py would refuse, a
cluster node without a port, a timeout that is not a finite number of seconds, are a
``ConfigError`` that names the option (the URL itself is not echoed: it may hold a password).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from hicache_async.errors import ConfigError

__all__ = ["RedisOptions", "cluster_address"]

_SCHEMES = ("redis", "rediss", "unix")
# Query parameters redis-py parses itself; anything else would reach the connection class as
# an unknown keyword (a TypeError at the first connect).
_URL_QUERY = frozenset(
    {
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_read_size",
        "socket_keepalive",
        "retry_on_timeout",
        "retry_on_error",
        "max_connections",
        "health_check_interval",
        "ssl_check_hostname",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_min_version",
        "timeout",
        "protocol",
        "username",
        "password",
        "client_name",
        "path",
    }
)
_MAX_TTL = 100 * 365 * 86_400  # a century: beyond it Redis's millisecond expiry overflows
_MAX_DB = 2**31 - 1  # Redis database indices are C ints


def _bad_url(problem: str) -> ConfigError:
    return ConfigError(
        f"{problem}; use redis://[user:password@]host:port/db, rediss://... for TLS, "
        f"or unix:///path/to/redis.sock (or leave url unset and give host, port and db)"
    )


def _check_url(url: str) -> None:
    if not url.strip():
        raise _bad_url("is empty")
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when not a number in 0-65535
    except ValueError as exc:
        raise _bad_url(f"cannot be parsed ({exc})") from None
    if parts.scheme not in _SCHEMES:
        raise _bad_url(f"the scheme must be one of {', '.join(_SCHEMES)}, not {parts.scheme!r}")
    if parts.scheme == "unix":
        if not parts.path:
            raise _bad_url("a unix:// URL needs the socket's path")
    else:
        if not parts.hostname:
            raise _bad_url("names no host")
        if port == 0:
            raise _bad_url("port 0 is not a server port")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise _bad_url(f"the path is the database number, not {db!r}")
    for key, _value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in _URL_QUERY:
            raise _bad_url(f"unknown query parameter {key!r}")
    try:  # the parse redis-py itself will run: its value checks (socket_timeout=abc, ...)
        from redis.connection import parse_url
    except ImportError:  # pragma: no cover - the backend needs redis anyway
        return
    try:
        parse_url(url)  # type: ignore[no-untyped-call]
    except ValueError as exc:
        raise _bad_url(str(exc)) from None


def _check_host(host: str) -> str:
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):  # [::1]
        name = name[1:-1]
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            raise ConfigError(f"{host!r} is not an IPv6 address") from None
    if not name or not name.isprintable() or any(c.isspace() for c in name):
        raise ConfigError(f"{host!r} is not a host name or address")
    return name


def cluster_address(address: str) -> tuple[str, int]:
    """``(host, port)`` of a ``host:port`` (or ``[v6]:port``) cluster node address."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"entries are host:port with a port in 1-65535 (e.g. 127.0.0.1:7000), not {address!r}"
        )
    return _check_host(host), int(port)


class RedisOptions(BaseModel):
    """Where the Redis server (or cluster) is, and how pages are kept there."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    url: str | None = Field(
        default=None, description="redis:// or rediss:// URL; overrides host, port and db."
    )
    host: str = Field(default="127.0.0.1", description="Server host (single node).")
    port: int = Field(default=6379, gt=0, lt=65536, description="Server port (single node).")
    db: int = Field(default=0, ge=0, le=_MAX_DB, description="Database number (single node).")
    username: str | None = None
    password: SecretStr | None = None
    cluster_nodes: list[str] | None = Field(
        default=None,
        description="host:port of some Redis Cluster nodes: use RedisCluster instead of one node.",
    )
    prefix: str = Field(default="hicache:", description="Prepended to every key; clear() uses it.")
    ttl_seconds: int | None = Field(
        default=None, gt=0, le=_MAX_TTL, description="Expire pages after this."
    )
    max_connections: int = Field(default=32, gt=0, description="Connection pool size.")
    socket_timeout: float = Field(default=5.0, gt=0, description="Seconds per socket operation.")
    connect_timeout: float = Field(default=2.0, gt=0, description="Seconds to connect.")
    op_timeout: float = Field(default=30.0, gt=0, description="Deadline of one batch, seconds.")
    batch_keys: int = Field(default=64, gt=0, description="Keys per pipeline round trip.")

    @field_validator(
        "port", "db", "ttl_seconds", "max_connections", "batch_keys", "socket_timeout",
        "connect_timeout", "op_timeout", mode="before",
    )  # fmt: skip
    @classmethod
    def _no_bool_numbers(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, not the boolean {value}")
        return value

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_url(value)
        return value

    @field_validator("host")
    @classmethod
    def _valid_host(cls, value: str) -> str:
        _check_host(value)
        return value.strip()

    @field_validator("cluster_nodes")
    @classmethod
    def _valid_cluster_nodes(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        if not value:
            raise ConfigError(
                "the list is empty; name at least one node (host:port), or leave "
                "cluster_nodes unset for a single server"
            )
        for address in value:
            cluster_address(address)
        return value

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if self.url is not None and self.cluster_nodes is not None:
            raise ConfigError("set url (one server) or cluster_nodes (a cluster), not both")
        return self
