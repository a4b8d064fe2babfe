"""What a storage backend is told about the process that opens it (as in SGLang)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["HiCacheStorageConfig", "HiCacheStorageExtraInfo", "namespace_suffix"]


@dataclass(frozen=True)
class HiCacheStorageConfig:
    """The rank, model and layout facts a backend needs; ``extra_config`` holds its options."""

    tp_rank: int = 0
    tp_size: int = 1
    is_mla_model: bool = False
    is_page_first_layout: bool = True
    model_name: str | None = None
    extra_config: dict[str, Any] | None = None
    #: :attr:`KVLayout.fingerprint_digest` of the pages stored; part of the key namespace, so
    #: the same model with another dtype or geometry never matches. ``None``: not namespaced.
    layout_fingerprint: str | None = None


@dataclass
class HiCacheStorageExtraInfo:
    """Per-call metadata a backend may use (prefix keys, request ids...); optional."""

    extra_info: dict[str, Any] | None = None
    prefix_keys: list[str] | None = field(default=None)


def namespace_suffix(config: HiCacheStorageConfig) -> str:
    """The suffix appended to every key (SGLang's rule, plus the layout).

    MLA models store the same latent on every tensor-parallel rank, so all ranks share one
    namespace (``_{model}``); MHA ranks each hold a slice of the heads, so each rank has its own
    (``_{model}_{tp_rank}_{tp_size}``). With a ``layout_fingerprint``, ``{model}`` is
    ``{model_name}@{fingerprint}``: one model name in another dtype or geometry is another
    namespace.
    """
    model = config.model_name or ""
    if config.layout_fingerprint:
        model = f"{model}@{config.layout_fingerprint}"
    if config.is_mla_model:
        return f"_{model}"
    return f"_{model}_{config.tp_rank}_{config.tp_size}"
