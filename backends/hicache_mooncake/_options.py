"""Options of the Mooncake Store backend (keys of ``storage_backend_extra_config``).

The connection fields carry SGLang's Mooncake names, so an existing deployment's values carry
over unchanged.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hicache_async._validation import format_bytes, refuse_bool, total_ram_bytes

__all__ = ["MooncakeOptions"]

_MAX_THREADS = 256  # each worker holds a trailer arena and a store call
_MAX_BATCH = 65_536  # pages per store call; an arena is batch_keys x 64 bytes
_MAX_REPLICAS = 64
_MAX_RETRIES = 1_000
_MAX_INTERVAL = 86_400.0


class MooncakeOptions(BaseModel):
    """Where the Mooncake master is, what this server contributes, and how pages move."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    master_server_address: str = Field(
        default="127.0.0.1:50051", description="host:port of the mooncake_master RPC service."
    )
    metadata_server: str = Field(
        default="P2PHANDSHAKE",
        description=(
            "Transfer-engine metadata: P2PHANDSHAKE (no metadata service), or an "
            "http://host:port/metadata, etcd or redis URL."
        ),
    )
    local_hostname: str = Field(
        default="127.0.0.1",
        description="The address other store clients reach this one at (loopback by default).",
    )
    protocol: Literal["tcp", "rdma"] = Field(default="tcp", description="Transfer protocol.")
    device_name: str = Field(default="", description="RDMA device(s), e.g. mlx5_0 (rdma only).")
    global_segment_size: int = Field(
        default=0,
        ge=0,
        description=(
            "Bytes of this process's memory lent to the distributed store; 0 makes it a pure "
            "client of dedicated store nodes (pages must outlive this process)."
        ),
    )
    local_buffer_size: int = Field(
        default=16 << 20, ge=0, description="Client staging buffer, bytes."
    )
    replicas: int = Field(
        default=1, ge=1, le=_MAX_REPLICAS, description="Copies of each page in the store."
    )
    setup_retries: int = Field(
        default=2,
        gt=0,
        le=_MAX_RETRIES,
        description=(
            "Attempts to reach the master when connecting (Mooncake's client spends ~4.5 s on "
            "each; sets MC_STORE_CLIENT_SETUP_RETRIES unless the environment does)."
        ),
    )
    reconnect_interval: float = Field(
        default=10.0,
        ge=0,
        le=_MAX_INTERVAL,
        description="After a failed connect, seconds during which calls are misses at once.",
    )
    prefix: str = Field(default="hicache:", description="Prepended to every key; clear() uses it.")
    batch_keys: int = Field(default=128, gt=0, le=_MAX_BATCH, description="Pages per store call.")
    io_threads: int = Field(
        default=2,
        gt=0,
        le=_MAX_THREADS,
        description="Worker threads running store calls (they block).",
    )

    @field_validator(
        "global_segment_size", "local_buffer_size", "replicas", "setup_retries",
        "reconnect_interval", "batch_keys", "io_threads", mode="before",
    )  # fmt: skip
    @classmethod
    def _no_bool_numbers(cls, value: Any) -> Any:
        return refuse_bool(value)

    @model_validator(mode="after")
    def _fits_in_ram(self) -> Self:
        # Both are this process's memory, registered with the store at setup.
        asked = self.global_segment_size + self.local_buffer_size
        ram = total_ram_bytes()
        if ram is not None and asked > ram:
            raise ValueError(
                f"global_segment_size + local_buffer_size = {format_bytes(asked)}, more than "
                f"this machine's RAM ({format_bytes(ram)}); lower them (global_segment_size=0 "
                f"makes this server a pure client of dedicated store nodes)"
            )
        return self
