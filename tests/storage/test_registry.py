"""The backend registry: names, options, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from hicache_async.errors import ConfigError
from hicache_async.storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    available_backends,
    create_storage,
    namespace_suffix,
)
from hicache_file import FileStorage
from hicache_memory import MemoryStorage, MemoryStore


def test_builtins_are_found_through_entry_points() -> None:
    assert {"file", "memory", "redis"} <= set(available_backends())


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown storage backend 'nfs'.*file, memory"):
        create_storage("nfs", HiCacheStorageConfig())


def test_unknown_option_is_named() -> None:
    with pytest.raises(ConfigError, match="capacity_byte"):
        create_storage("file", HiCacheStorageConfig(), capacity_byte=10)


def test_mistyped_option_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fsync"):
        create_storage("file", HiCacheStorageConfig(), path=tmp_path, fsync="always")
    with pytest.raises(ConfigError, match="capacity_bytes"):
        create_storage("memory", HiCacheStorageConfig(), capacity_bytes="lots")


def test_options_come_from_extra_config_and_arguments(tmp_path: Path) -> None:
    config = HiCacheStorageConfig(
        extra_config={"path": str(tmp_path / "x"), "fsync": "file", "prefetch_threshold": 64}
    )
    storage = create_storage("FILE", config, fsync="dir")
    assert isinstance(storage, FileStorage)
    assert storage.root == str((tmp_path / "x").resolve())
    assert storage.file_options.fsync == "dir"  # arguments win over the extra config


async def test_memory_store_can_be_shared_by_object() -> None:
    store = MemoryStore(1 << 20)
    one = create_storage("memory", HiCacheStorageConfig(), store=store)
    two = create_storage("memory", HiCacheStorageConfig(), store=store)
    assert isinstance(one, MemoryStorage)
    assert isinstance(two, MemoryStorage)
    assert one.store is two.store is store
    await one.aclose()
    await two.aclose()


def test_namespace_suffix_follows_sglang() -> None:
    assert namespace_suffix(HiCacheStorageConfig(2, 4, False, True, "llama")) == "_llama_2_4"
    assert namespace_suffix(HiCacheStorageConfig(2, 4, True, True, "dsv3")) == "_dsv3"


def test_backends_are_storage_classes() -> None:
    assert issubclass(FileStorage, HiCacheStorage)
    assert issubclass(MemoryStorage, HiCacheStorage)


def test_storage_exports_are_stable() -> None:
    import hicache_async.storage as storage

    assert set(storage.__all__) >= {
        "HiCacheStorage",
        "HiCacheStorageConfig",
        "HiCacheStorageExtraInfo",
        "available_backends",
        "create_storage",
    }
    for name in storage.__all__:
        assert hasattr(storage, name), name


def test_backend_options_flow_from_the_cache_config(tmp_path: Path) -> None:
    from hicache_async.config import HiCacheConfig
    from hicache_async.layout import KVLayout

    extra = f'{{"path": "{tmp_path}", "fsync": "file", "prefetch_threshold": 32}}'
    config = HiCacheConfig(
        layout=KVLayout(num_layers=2, num_kv_heads=2, head_dim=8),
        model_name="m",
        storage_backend_extra_config=extra,
    )
    storage = create_storage(
        config.storage_backend,
        HiCacheStorageConfig(model_name="m", extra_config=config.storage_options),
    )
    assert isinstance(storage, FileStorage)
    assert storage.file_options.fsync == "file"
    assert config.prefetch_threshold == 32  # a runtime key, not a backend option
