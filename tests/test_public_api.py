"""The public surface: a change to it must be deliberate (update the list here)."""

from __future__ import annotations

import hicache_async
import hicache_async.errors as errors

PUBLIC = {
    "CacheState",
    "CapacityError",
    "ClosedError",
    "ConfigError",
    "CorruptPageError",
    "EvictionPolicy",
    "HiCache",
    "HiCacheConfig",
    "HiCacheError",
    "Hit",
    "HostLayout",
    "IOBackend",
    "IndexStateError",
    "KVEventsConfig",
    "KVLayout",
    "LayoutError",
    "PrefetchPolicy",
    "Session",
    "StorageError",
    "TransferError",
    "WritePolicy",
    "__version__",
}


def test_all_is_pinned() -> None:
    assert set(hicache_async.__all__) == PUBLIC
    assert len(hicache_async.__all__) == len(PUBLIC)


def test_every_exported_name_exists_and_is_defined_in_the_package() -> None:
    for name in hicache_async.__all__:
        value = getattr(hicache_async, name)
        module = getattr(value, "__module__", "hicache_async")
        assert module.startswith("hicache_async"), (name, module)


def test_every_error_derives_from_hicache_error_and_shadows_no_builtin() -> None:
    import builtins

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, hicache_async.HiCacheError)
        assert not hasattr(builtins, name), name


def test_the_documented_imports() -> None:
    from hicache_async import HiCache, HiCacheConfig, HiCacheError, KVLayout  # noqa: F401
