"""Finding backends by name: the entry-point group ``hicache_async.storage_backends``.

Built-in backends are declared in the project's own ``pyproject.toml`` under that group, so
built-ins and third-party backends are found the same way, and the core never imports a
backend module. An entry point names a :class:`HiCacheStorage` subclass; its
``options_model`` validates the options.
"""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import ValidationError

from hicache_async._extra_config import RUNTIME_KEYS
from hicache_async._validation import translate
from hicache_async.errors import ConfigError
from hicache_async.storage._base import HiCacheStorage
from hicache_async.storage._config import HiCacheStorageConfig

__all__ = ["ENTRY_POINT_GROUP", "available_backends", "create_storage"]

ENTRY_POINT_GROUP = "hicache_async.storage_backends"


def _backends() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_backends() -> list[str]:
    """The names :func:`create_storage` accepts."""
    return sorted(_backends())


def create_storage(
    name: str, config: HiCacheStorageConfig | None = None, **options: Any
) -> HiCacheStorage:
    """A new backend ``name`` for ``config``.

    Its options are ``config.extra_config`` (without the runtime keys the cache itself reads)
    overridden by ``options``, validated by the backend's options model: an unknown or
    mistyped option is a :class:`ConfigError` that names it.
    """
    config = config or HiCacheStorageConfig()
    backends = _backends()
    key = name.strip().lower()
    if key not in backends:
        known = ", ".join(sorted(backends)) or "none installed"
        raise ConfigError(
            f"unknown storage backend {name!r}; known: {known} (third-party backends register "
            f"a HiCacheStorage subclass under the entry-point group {ENTRY_POINT_GROUP!r})"
        )
    entry = backends[key]
    try:
        cls = entry.load()
    except Exception as exc:
        raise ConfigError(
            f"storage backend {key!r} ({entry.value}) failed to import: {exc}"
        ) from exc
    if not (isinstance(cls, type) and issubclass(cls, HiCacheStorage)):
        raise ConfigError(f"storage backend {key!r} ({entry.value}) is not a HiCacheStorage")
    extra = {k: v for k, v in (config.extra_config or {}).items() if k not in RUNTIME_KEYS}
    try:
        parsed = cls.options_model.model_validate({**extra, **options})
    except ValidationError as exc:
        raise translate(exc, f"options of the {key!r} storage backend", ConfigError) from exc
    return cls(config, parsed)
