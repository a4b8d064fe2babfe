"""Options of the Mooncake Store backend (keys of ``storage_backend_extra_config``).

The connection fields carry SGLang's Mooncake names, so an existing deployment's values carry
over unchanged.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["MooncakeOptions"]


class MooncakeOptions(BaseModel):
    """Where the Mooncake master is, what this server contributes, and how pages move."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    replicas: int = Field(default=1, ge=1, description="Copies of each page in the store.")
    setup_retries: int = Field(
        default=2,
        gt=0,
        description=(
            "Attempts to reach the master when connecting (Mooncake's client spends ~4.5 s on "
            "each; sets MC_STORE_CLIENT_SETUP_RETRIES unless the environment does)."
        ),
    )
    reconnect_interval: float = Field(
        default=10.0,
        ge=0,
        description="After a failed connect, seconds during which calls are misses at once.",
    )
    prefix: str = Field(default="hicache:", description="Prepended to every key; clear() uses it.")
    batch_keys: int = Field(default=128, gt=0, description="Pages per store call.")
    io_threads: int = Field(
        default=2, gt=0, description="Worker threads running store calls (they block)."
    )
