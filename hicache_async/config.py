"""Everything a user sets, in one typed settings model.

Precedence, highest first: an explicit argument, then the environment (``HICACHE_<FIELD>``,
nested with ``__``: ``HICACHE_LAYOUT__NUM_LAYERS=32``), then for the runtime keys the storage
extra config (``storage_backend_extra_config``, inline JSON or ``@file``), then the default.
The environment is read here and nowhere else.
"""

from __future__ import annotations

import math
import re
from enum import StrEnum
from functools import cached_property
from typing import Any, Literal, Self

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from hicache_async._extra_config import RUNTIME_KEYS, parse_extra_config, runtime_keys_from
from hicache_async._validation import format_bytes, refuse_bool, total_ram_bytes, translate
from hicache_async.errors import ConfigError
from hicache_async.layout import KVLayout

__all__ = [
    "EvictionPolicy",
    "HiCacheConfig",
    "HostLayout",
    "IOBackend",
    "KVEventsConfig",
    "PrefetchPolicy",
    "WritePolicy",
    "parse_extra_config",
]


class HostLayout(StrEnum):
    """How the L2 host pool orders its bytes."""

    LAYER_FIRST = "layer_first"  # [layer][k|v][token]: per-layer loads are contiguous
    PAGE_FIRST = "page_first"  # [page][layer][k|v][token]: one contiguous run per page (L3)
    PAGE_FIRST_DIRECT = "page_first_direct"  # page_first, moved page by page without staging


class WritePolicy(StrEnum):
    """When L1 pages are backed up to L2."""

    WRITE_THROUGH = "write_through"  # as soon as they are inserted
    WRITE_THROUGH_SELECTIVE = "write_through_selective"  # once a node has been hit twice
    WRITE_BACK = "write_back"  # only when evicted from L1


class PrefetchPolicy(StrEnum):
    """How long a request waits for an L3 prefetch."""

    BEST_EFFORT = "best_effort"  # use what has arrived when the request moves on
    WAIT_COMPLETE = "wait_complete"  # wait for every page
    TIMEOUT = "timeout"  # wait up to the linear deadline, then use what has arrived


class EvictionPolicy(StrEnum):
    """Which unlocked leaf leaves a tier first."""

    LRU = "lru"
    LFU = "lfu"
    FIFO = "fifo"
    MRU = "mru"
    FILO = "filo"
    PRIORITY = "priority"  # lowest request priority first, then LRU


class IOBackend(StrEnum):
    """How bytes move between L1 and L2."""

    DIRECT = "direct"  # torch index ops on copy streams
    KERNEL = "kernel"  # fused gather/scatter kernels where available
    AUTO = "auto"  # the best available for the device


_MAX_C_INT = 2**31 - 1  # ZMQ options and deque lengths are C ints / ssize_t

# A ZMQ endpoint: tcp://host:port (port a number or *), ipc://path or inproc://name.
_ENDPOINT = re.compile(
    r"^(tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\*|\d{1,5})|(ipc|inproc)://\S+)$"
)


class KVEventsConfig(BaseModel):
    """Where KV events are published (the names follow vLLM's ``KVEventsConfig``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    publisher: Literal["zmq", "null"] = Field(
        default="zmq", description="zmq publishes; null only feeds cache.events()."
    )
    endpoint: str = Field(
        default="tcp://127.0.0.1:5557",
        description="PUB socket; loopback unless you name another interface.",
    )
    replay_endpoint: str | None = Field(
        default=None, description="ROUTER socket that resends buffered batches; off when unset."
    )
    topic: str = Field(default="", description="First frame of every message.")
    buffer_steps: int = Field(
        default=10_000, gt=0, le=_MAX_C_INT, description="Batches kept for replay."
    )
    hwm: int = Field(default=100_000, ge=0, le=_MAX_C_INT, description="ZMQ send high-water mark.")
    max_queue_size: int = Field(
        default=100_000,
        gt=0,
        le=_MAX_C_INT,
        description="Batches waiting for the publisher thread; past it a batch is dropped, "
        "counted, and its sequence number left as a gap.",
    )
    format: Literal["vllm", "sglang", "dynamo"] = Field(
        default="vllm",
        description="The consumer whose structs go on the wire: vllm (vLLM 0.33), sglang "
        "(SGLang 0.5.23) or dynamo (NVIDIA Dynamo's KV router); see docs/events.md.",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise translate(exc, "KVEventsConfig", ConfigError) from exc

    @model_validator(mode="before")
    @classmethod
    def _replaced_fields(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for name in ("medium_names", "hash_format"):
                if name in values:
                    raise ValueError(
                        f"{name} was replaced by format='vllm', 'sglang' or 'dynamo' (the "
                        f"consumer decides medium names and hashes)"
                    )
        return values

    @field_validator("buffer_steps", "hwm", "max_queue_size", mode="before")
    @classmethod
    def _no_bool_counts(cls, value: Any) -> Any:
        return refuse_bool(value)

    @field_validator("endpoint", "replay_endpoint")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return value
        match = _ENDPOINT.match(value)
        if match is None or (match[3] not in (None, "*") and int(match[3]) > 65535):
            raise ValueError(
                "a ZMQ endpoint looks like tcp://127.0.0.1:5557: tcp://HOST:PORT (PORT 0-65535 "
                "or *), ipc://PATH or inproc://NAME"
            )
        return value


_BACKEND_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]{0,63}$")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d{1,4})?)$")
_MAX_PAGES = 2**40  # a bound far above any machine, so page arithmetic never overflows
_MAX_MODEL_NAME = 256
_LAYOUT_JSON = '{"num_layers": 32, "num_kv_heads": 8, "head_dim": 128}'
# L3 backends private to this process: no other model can read what they hold, so they need
# no model_name. Every other backend (file, redis, mooncake, third-party ones) may be shared.
PRIVATE_BACKENDS = frozenset({"none", "memory"})
_NUMBER_FIELDS = (
    "device_pages",
    "host_pages",
    "host_ratio",
    "host_bytes",
    "prefetch_threshold",
    "prefetch_timeout_base",
    "prefetch_timeout_per_ki_token",
    "prefetch_wait_complete_timeout",
    "prefetch_capacity_pages",
    "eviction_headroom",
    "data_parallel_rank",
)


class HiCacheConfig(BaseSettings):
    """The settings of one :class:`~hicache_async.HiCache`. Invalid input is a ``ConfigError``."""

    model_config = SettingsConfigDict(
        env_prefix="HICACHE_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
        validate_default=True,
    )

    layout: KVLayout = Field(description="The model's KV geometry.")
    model_name: str | None = Field(
        default=None,
        description="The model's identity, e.g. meta-llama/Llama-3.1-8B-Instruct. With the "
        "layout's fingerprint it namespaces L3, so models never read each other's pages; "
        "required unless storage_backend is none or memory (CLI: --model-name).",
    )
    device: str = Field(
        default="auto", description="L1 device: auto (cuda when present), cpu, cuda or cuda:N."
    )
    device_pages: int = Field(
        default=1024, gt=0, le=_MAX_PAGES, description="L1 capacity in pages."
    )
    host_pages: int | None = Field(
        default=None,
        ge=0,
        le=_MAX_PAGES,
        description="L2 capacity in pages; 0 disables L2 (and so L3).",
    )
    host_ratio: float = Field(
        default=2.0,
        gt=0,
        allow_inf_nan=False,
        description="L2 pages as a multiple of L1 pages, when not given.",
    )
    host_bytes: int | None = Field(
        default=None, gt=0, description="L2 capacity in bytes, instead of pages."
    )
    host_layout: HostLayout = Field(default=HostLayout.PAGE_FIRST, description="L2 byte order.")
    io_backend: IOBackend = Field(default=IOBackend.AUTO, description="L1 <-> L2 copy method.")
    write_policy: WritePolicy = Field(
        default=WritePolicy.WRITE_THROUGH, description="When L1 pages are backed up to L2."
    )
    prefetch_policy: PrefetchPolicy = Field(
        default=PrefetchPolicy.BEST_EFFORT, description="How long a request waits for L3."
    )
    eviction_policy: EvictionPolicy = Field(
        default=EvictionPolicy.LRU, description="L1 eviction order."
    )
    host_eviction_policy: EvictionPolicy | None = Field(
        default=None, description="L2 eviction order; the L1 policy when unset."
    )
    storage_backend: str = Field(
        default="file", description="L3 backend name (file, memory, redis, ...); none disables L3."
    )
    storage_backend_extra_config: str | None = Field(
        default=None, description="Backend options: inline JSON, or @path to .json/.toml/.yaml."
    )
    prefetch_threshold: int = Field(
        default=256, ge=0, description="Skip L3 prefetches shorter than this many tokens."
    )
    prefetch_timeout_base: float = Field(
        default=1.0, ge=0, allow_inf_nan=False, description="Seconds every timed prefetch may take."
    )
    prefetch_timeout_per_ki_token: float = Field(
        default=0.25,
        ge=0,
        allow_inf_nan=False,
        description="Extra seconds per 1024 prefetched tokens.",
    )
    prefetch_wait_complete_timeout: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="Seconds a prefetch without a linear deadline (wait_complete; best_effort's "
        "background fetch) may take in all: past it, the arrived prefix is kept.",
    )
    storage_pass_prefix_keys: bool = Field(
        default=False, description="Pass the keys of the cached prefix to the backend."
    )
    prefetch_capacity_pages: int | None = Field(
        default=None,
        ge=0,
        le=_MAX_PAGES,
        description="Host pages in-flight prefetches may hold; half of L2 when unset.",
    )
    eviction_headroom: float = Field(
        default=0.02,
        ge=0,
        le=0.5,
        allow_inf_nan=False,
        description="When L1 or L2 must evict, also free this fraction of the tier's pages, so "
        "evictions come some requests apart instead of on every request.",
    )
    kv_events: KVEventsConfig | None = Field(
        default=None, description="Publish KV events (off when unset)."
    )
    data_parallel_rank: int | None = Field(
        default=None,
        ge=0,
        le=_MAX_C_INT,
        description="This server's data-parallel rank, carried by every KV event batch (in "
        "cache.events() and on the wire) so a router can tell the ranks apart; nil when unset.",
    )

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise translate(exc, "HiCacheConfig", ConfigError) from exc
        except SettingsError as exc:  # an environment value that is not valid JSON
            raise ConfigError(
                f"invalid HiCacheConfig: {exc}; a nested setting in the environment is a JSON "
                f"object (HICACHE_LAYOUT='{_LAYOUT_JSON}'), or set its fields one by one "
                f"(HICACHE_LAYOUT__NUM_LAYERS=32)"
            ) from exc

    @model_validator(mode="before")
    @classmethod
    def _fill_from_extra_config(cls, data: Any) -> Any:
        # Runtime keys in the extra config rank below explicit arguments and the environment,
        # both of which are already in ``data``; so only fill what is absent.
        if not isinstance(data, dict):
            return data
        extra = data.get("storage_backend_extra_config")
        if extra is not None and not isinstance(extra, str):
            return data  # the field's own check says it must be a string
        runtime = runtime_keys_from(parse_extra_config(extra))
        absent = {key: value for key, value in runtime.items() if key not in data}
        return {**data, **absent} if absent else data

    @field_validator("storage_backend")
    @classmethod
    def _check_backend_name(cls, value: str) -> str:
        name = value.strip().lower()
        if not _BACKEND_NAME.match(name):
            raise ValueError(
                "a storage backend name is lowercase letters, digits, '_', '-' or '.' "
                "(e.g. file, memory, redis; none disables L3)"
            )
        return name

    @field_validator("model_name")
    @classmethod
    def _check_model_name(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = value.strip()
        if not name:
            return None  # blank (e.g. HICACHE_MODEL_NAME="") is unset
        if len(name) > _MAX_MODEL_NAME:
            raise ValueError(f"a model name has at most {_MAX_MODEL_NAME} characters")
        if not name.isprintable():
            raise ValueError("a model name has no control or unprintable characters")
        try:
            name.encode()
        except UnicodeEncodeError:
            raise ValueError("a model name is valid Unicode (no lone surrogates)") from None
        return name

    @field_validator(*_NUMBER_FIELDS, mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any) -> Any:
        return refuse_bool(value)

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        name = value.strip().lower()
        if not _DEVICE.match(name):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return name

    @model_validator(mode="after")
    def _check_combinations(self) -> Self:
        if self.host_pages is not None and self.host_bytes is not None:
            raise ValueError("set host_pages or host_bytes, not both")
        if self.storage_backend not in PRIVATE_BACKENDS and self.model_name is None:
            raise ValueError(
                f"model_name is not set, and storage_backend={self.storage_backend!r} is an L3 "
                f"that other processes can share, where models with the same KV layout would "
                f"read each other's pages: name the model this cache serves with "
                f"HiCacheConfig(model_name='meta-llama/Llama-3.1-8B-Instruct'), the environment "
                f"variable HICACHE_MODEL_NAME, or the command line's --model-name; or use "
                f"storage_backend='memory' (private to this process) or 'none' (no L3)"
            )
        by_ratio = self.host_pages is None and self.host_bytes is None
        if by_ratio and not math.isfinite(self.device_pages * self.host_ratio):
            raise ValueError(
                f"host_ratio={self.host_ratio:g} x device_pages={self.device_pages} is beyond "
                f"any machine's memory; size L2 with a host_ratio such as 2.0, or with "
                f"host_pages or host_bytes"
            )
        if by_ratio and self.resolved_host_pages == 0:
            raise ValueError(
                f"host_ratio={self.host_ratio:g} x device_pages={self.device_pages} is less "
                f"than one L2 page; use host_ratio >= 1, or set host_pages=0 to run without L2"
            )
        if self.host_bytes is not None and self.host_bytes < self.layout.bytes_per_page:
            raise ValueError(
                f"host_bytes={self.host_bytes} holds no page of {self.layout.bytes_per_page} "
                f"bytes; raise host_bytes, or set host_pages=0 to run without L2"
            )
        host = self.resolved_host_pages
        if 0 < host < self.device_pages:
            raise ValueError(
                f"the L2 host pool ({host} pages) is smaller than L1 ({self.device_pages} pages), "
                f"so L2 could not hold what L1 evicts; give L2 at least {self.device_pages} pages "
                f"(host_pages, host_bytes or host_ratio >= 1), or set host_pages=0 to disable L2"
            )
        if self.storage_enabled and host == 0:
            raise ValueError(
                f"L3 storage ({self.storage_backend!r}) moves pages through L2, which is disabled "
                f"(host_pages=0); give L2 pages or set storage_backend='none'"
            )
        if self.storage_enabled and self.prefetch_capacity_pages == 0:
            raise ValueError(
                "prefetch_capacity_pages=0 refuses every L3 prefetch while L3 is on; leave it "
                "unset (half of L2), give it pages, or set storage_backend='none'"
            )
        if self.prefetch_capacity_pages is not None and self.prefetch_capacity_pages > host:
            raise ValueError(
                f"prefetch_capacity_pages={self.prefetch_capacity_pages} exceeds the L2 pool "
                f"({host} pages); lower it or enlarge L2"
            )
        size = self.layout.page_size
        if self.host_layout is HostLayout.PAGE_FIRST_DIRECT and size & (size - 1):
            raise ValueError(
                f"host_layout=page_first_direct moves aligned whole pages and needs a power-of-two "
                f"page_size, not {size}; change layout.page_size or use host_layout=page_first"
            )
        return self

    @property
    def resolved_host_pages(self) -> int:
        """L2 capacity in pages, from ``host_pages``, ``host_bytes`` or ``host_ratio``."""
        if self.host_pages is not None:
            return self.host_pages
        if self.host_bytes is not None:
            return self.host_bytes // self.layout.bytes_per_page
        return int(self.device_pages * self.host_ratio)

    @property
    def resolved_host_eviction_policy(self) -> EvictionPolicy:
        """The L2 eviction policy (the L1 one unless set)."""
        return self.host_eviction_policy or self.eviction_policy

    @property
    def resolved_prefetch_capacity_pages(self) -> int:
        """Host pages that in-flight prefetches may hold together."""
        if self.prefetch_capacity_pages is not None:
            return self.prefetch_capacity_pages
        return self.resolved_host_pages // 2

    @property
    def host_enabled(self) -> bool:
        """Whether the cache has an L2 host tier."""
        return self.resolved_host_pages > 0

    @property
    def storage_enabled(self) -> bool:
        """Whether the cache has an L3 storage tier."""
        return self.storage_backend != "none"

    @cached_property
    def storage_options(self) -> dict[str, Any]:
        """The extra-config keys left for the backend (the runtime keys removed)."""
        extra = parse_extra_config(self.storage_backend_extra_config)
        return {key: value for key, value in extra.items() if key not in RUNTIME_KEYS}

    def resolve_device(self) -> torch.device:
        """The L1 device (``cuda`` under ``auto`` when CUDA is available, else ``cpu``), once
        :meth:`check_memory` found that the pools fit it: the cache calls this just before it
        allocates them."""
        device = self._device()
        self.check_memory(device)
        return device

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"device={self.device!r} but CUDA is not available; use auto or cpu")
        device = torch.device(self.device)
        count = torch.cuda.device_count() if device.type == "cuda" else 0
        if device.type == "cuda" and device.index is not None and device.index >= count:
            raise ConfigError(
                f"device={self.device!r} but this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1}); pick one of them, or use auto"
            )
        return device

    def check_memory(self, device: torch.device | None = None) -> None:
        """Refuse pool sizes this machine cannot hold, before anything is allocated.

        L2 (host memory), and L1 when it is on the CPU, must fit in the machine's total RAM;
        L1 on a GPU in the device's free memory. Otherwise a :class:`ConfigError` gives the
        bytes asked and available. The config itself stays valid elsewhere: it may describe
        a larger server than the machine that builds it.
        """
        device = device if device is not None else self._device()
        page = self.layout.bytes_per_page
        host = self.resolved_host_pages * page
        l1 = self.device_pages * page
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            free, total = torch.cuda.mem_get_info(index)
            if l1 > free:
                raise ConfigError(
                    f"L1 on cuda:{index} needs {format_bytes(l1)} (device_pages="
                    f"{self.device_pages} x {format_bytes(page)} a page), but the device has "
                    f"{format_bytes(free)} free of {format_bytes(total)}; lower device_pages "
                    f"(or the layout's page_size)"
                )
            l1 = 0  # not in host memory
        ram = total_ram_bytes()
        if ram is None or host + l1 <= ram:
            return
        parts = [f"L1 on the CPU: device_pages={self.device_pages}"] if l1 else []
        if host:
            parts.append(f"L2: {self.resolved_host_pages} host pages")
        raise ConfigError(
            f"the KV pools need {format_bytes(host + l1)} of host memory "
            f"({'; '.join(parts)}; {format_bytes(page)} a page), but this machine has "
            f"{format_bytes(ram)} of RAM; lower device_pages and host_pages (or host_ratio, "
            f"host_bytes), or the layout's page_size"
        )

    def prefetch_timeout(self, tokens: int) -> float:
        """The linear prefetch deadline in seconds for ``tokens`` tokens."""
        return self.prefetch_timeout_base + self.prefetch_timeout_per_ki_token * tokens / 1024
