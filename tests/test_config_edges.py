"""Adversarial settings get our own errors, naming the field and the fix (issue 17, defect 9).

Before, these leaked builtins from deep inside: ``OverflowError`` (host_ratio=1e308),
torch's allocation failure (10**12 pages), ``ValueError`` (a bad Redis URL), ``TypeError``
(an empty storage key), ``AttributeError`` (a non-string extra config), pydantic-settings'
``SettingsError`` (an environment value that is not JSON), or a MemoryError from a Mooncake
option asking for 10**30 threads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from hicache_async import ConfigError, HiCache, HiCacheConfig, KVLayout
from hicache_async.errors import StorageError
from hicache_async.memory.host_pool import HostKVPool
from hicache_async.storage import HiCacheStorageConfig, create_storage

LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "float16", "page_size": 4}


def make(**overrides: Any) -> HiCacheConfig:
    values: dict[str, Any] = {"layout": LAYOUT, "device": "cpu", "storage_backend": "none"}
    return HiCacheConfig(**{**values, **overrides})


# -- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [1e308, float("inf"), float("nan"), "inf", "1e308"])
def test_host_ratio_beyond_any_machine_is_a_config_error(ratio: object) -> None:
    with pytest.raises(ConfigError, match="host_ratio"):
        make(host_ratio=ratio)


def test_host_ratio_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HICACHE_HOST_RATIO", "1e308")
    with pytest.raises(ConfigError, match="host_ratio"):
        make()


def test_host_ratio_giving_no_l2_page_says_how_to_disable_l2() -> None:
    with pytest.raises(ConfigError, match="host_pages=0"):
        make(host_ratio=1e-300)


def test_page_counts_have_a_bound() -> None:
    with pytest.raises(ConfigError, match="device_pages"):
        make(device_pages=10**30)
    with pytest.raises(ConfigError, match="host_pages"):
        make(host_pages=2**63)


def test_pools_larger_than_ram_are_refused_before_allocating() -> None:
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    config = make(device_pages=10**12)  # a valid description, for a very large server
    with pytest.raises(ConfigError) as caught:
        config.check_memory()
    message = str(caught.value)
    asked = (10**12 + config.resolved_host_pages) * config.layout.bytes_per_page
    assert f"({asked} bytes)" in message
    assert f"({ram} bytes) of RAM" in message
    assert "device_pages" in message
    with pytest.raises(ConfigError, match="RAM"):
        HiCache(config)  # refused before torch is asked for the memory


def test_an_l2_larger_than_ram_is_refused() -> None:
    config = make(device_pages=8, host_pages=10**12)
    with pytest.raises(ConfigError, match="L2: 1000000000000 host pages"):
        HiCache(config)


def test_a_huge_layout_is_refused_before_allocating() -> None:
    layout = {**LAYOUT, "num_layers": 10**9, "num_kv_heads": 10**3}
    with pytest.raises(ConfigError, match="lower device_pages"):
        HiCache(make(layout=layout, device_pages=4, host_pages=0))


def test_pools_that_fit_pass_the_memory_check() -> None:
    make(device_pages=16, host_pages=32).check_memory()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_l1_larger_than_the_gpu_is_refused() -> None:  # pragma: no cover - GPU machines
    config = make(device="cuda", device_pages=2**40, host_pages=0)
    with pytest.raises(ConfigError, match="free of"):
        config.resolve_device()


def test_a_cuda_index_beyond_the_format_is_refused() -> None:
    with pytest.raises(ConfigError, match="device"):
        make(device="cuda:99999999999999999999")


# -- numbers that are not numbers ------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["device_pages", "host_pages", "host_ratio", "prefetch_threshold", "host_bytes"]
)
def test_a_boolean_is_not_a_number(field: str) -> None:
    with pytest.raises(ConfigError, match=f"{field}: expected a number, not the boolean"):
        make(**{field: True})


def test_a_boolean_is_not_a_layout_count() -> None:
    with pytest.raises(ConfigError, match="num_layers: expected a number"):
        make(layout={**LAYOUT, "num_layers": True})


@pytest.mark.parametrize(
    "field", ["prefetch_timeout_base", "prefetch_timeout_per_ki_token", "eviction_headroom"]
)
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_durations_and_fractions_are_finite(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        make(**{field: value})


def test_runtime_keys_in_the_extra_config_are_finite() -> None:
    with pytest.raises(ConfigError, match="prefetch_timeout_base"):
        make(storage_backend_extra_config='{"prefetch_timeout_base": Infinity}')


def test_a_non_string_extra_config_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="storage_backend_extra_config"):
        make(storage_backend_extra_config=5)


# -- the environment -------------------------------------------------------------------------


def test_an_environment_value_that_is_not_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HICACHE_LAYOUT", "not json")
    with pytest.raises(ConfigError, match="HICACHE_LAYOUT__NUM_LAYERS"):
        HiCacheConfig(storage_backend="none")


# -- KV events -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("events", "field"),
    [
        ({"buffer_steps": 10**22}, "buffer_steps"),
        ({"hwm": 2**40}, "hwm"),
        ({"buffer_steps": True}, "buffer_steps"),
        ({"endpoint": "nonsense"}, "endpoint"),
        ({"endpoint": "tcp://127.0.0.1:99999"}, "endpoint"),
        ({"replay_endpoint": "tcp://"}, "replay_endpoint"),
    ],
)
def test_kv_events_edges(events: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=f"kv_events: invalid KVEventsConfig: {field}"):
        make(kv_events=events)


def test_kv_events_good_endpoints_pass() -> None:
    for endpoint in ("tcp://127.0.0.1:5557", "tcp://*:0", "tcp://[::1]:5557", "ipc:///tmp/kv"):
        assert make(kv_events={"endpoint": endpoint}).kv_events is not None


# -- Redis options ---------------------------------------------------------------------------


def redis(**options: Any) -> Any:
    return create_storage("redis", HiCacheStorageConfig(model_name="m"), **options)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("bogus", "scheme"),
        ("http://127.0.0.1:6379", "scheme"),
        ("redis://127.0.0.1:notaport", "cannot be parsed"),
        ("redis://127.0.0.1:99999", "cannot be parsed"),
        ("redis://[::1", "cannot be parsed"),
        ("", "empty"),
        ("unix://", "socket's path"),
        ("redis://127.0.0.1:6379/zero", "database number"),
        ("redis://127.0.0.1:6379/0?socket_timeout=abc", "socket_timeout"),
        ("redis://127.0.0.1:6379/0?frobnicate=1", "unknown query parameter"),
    ],
)
def test_a_bad_redis_url_is_a_config_error(url: str, why: str) -> None:
    with pytest.raises(ConfigError, match="url: ") as caught:
        redis(url=url)
    assert why in str(caught.value)
    assert "redis://[user:password@]host:port/db" in str(caught.value)  # the fix


def test_a_redis_url_error_does_not_echo_the_password() -> None:
    with pytest.raises(ConfigError) as caught:
        redis(url="redis://user:s3cret-pw@127.0.0.1:6379/notadb")
    assert "s3cret-pw" not in str(caught.value)


def test_good_redis_urls_pass() -> None:
    for url in ("redis://127.0.0.1:6379/0", "rediss://u:p@h:6380/2", "unix:///tmp/r.sock"):
        assert redis(url=url).redis_options.url == url


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"cluster_nodes": []}, "cluster_nodes"),
        ({"cluster_nodes": ["nohost"]}, "cluster_nodes"),
        ({"cluster_nodes": ["h:99999"]}, "cluster_nodes"),
        ({"host": ""}, "host"),
        ({"host": "a b"}, "host"),
        ({"socket_timeout": float("inf")}, "socket_timeout"),
        ({"op_timeout": float("nan")}, "op_timeout"),
        ({"ttl_seconds": 10**30}, "ttl_seconds"),
        ({"db": 10**30}, "db"),
        ({"port": True}, "port"),
        ({"url": "redis://h:1/0", "cluster_nodes": ["h:1"]}, "not both"),
    ],
)
def test_redis_option_edges(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        redis(**options)


# -- Mooncake options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"io_threads": 10**30}, "io_threads"),  # was: one arena per thread, until OOM
        ({"batch_keys": 10**30}, "batch_keys"),
        ({"replicas": 10**30}, "replicas"),
        ({"setup_retries": True}, "setup_retries"),
        ({"reconnect_interval": float("inf")}, "reconnect_interval"),
        ({"global_segment_size": 2**62}, "RAM"),
        ({"local_buffer_size": 2**62}, "RAM"),
    ],
)
def test_mooncake_option_edges(options: dict[str, Any], field: str) -> None:
    # Refused by the options model, before the Mooncake client is imported or made.
    with pytest.raises(ConfigError, match=field):
        create_storage("mooncake", HiCacheStorageConfig(model_name="m"), **options)


# -- storage keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "why"),
    [
        (["ok", ""], r"keys\[1\] is ''"),
        (["ok", 5], r"keys\[1\] is 5"),
        ([None], r"keys\[0\] is None"),
        ("abc", "list of str"),
        (b"abc", "list of str"),
        (7, "list of str"),
    ],
)
async def test_bad_storage_keys_are_storage_errors(keys: Any, why: str, tmp_path: Path) -> None:
    layout = KVLayout(**LAYOUT)
    pool = HostKVPool(layout, 4)
    slots = torch.arange(2 * layout.page_size, dtype=torch.int64)
    config = HiCacheStorageConfig(model_name="m", extra_config={"path": str(tmp_path)})
    async with create_storage("file", config) as storage:
        storage.register_mem_pool_host(pool)
        with pytest.raises(StorageError, match=why):
            await storage.batch_set_v1(keys, slots)
        with pytest.raises(StorageError, match=why):
            await storage.batch_get_v1(keys, slots)
        with pytest.raises(StorageError, match=why):
            await storage.batch_exists(keys)
        assert storage.get_stats()["set_pages"] == 0  # refused before any write


def test_extra_config_options_reach_the_backend_checks(tmp_path: Path) -> None:
    cfg = make(
        model_name="m",
        storage_backend="redis",
        storage_backend_extra_config=json.dumps({"url": "bogus"}),
    )
    with pytest.raises(ConfigError, match="url"):
        HiCache(cfg)


def test_kv_events_config_alone_raises_our_error() -> None:
    from hicache_async.config import KVEventsConfig

    with pytest.raises(ConfigError, match="KVEventsConfig: endpoint: a ZMQ endpoint looks like"):
        KVEventsConfig(endpoint="127.0.0.1:5557")
    with pytest.raises(ConfigError, match="buffer_steps"):
        KVEventsConfig(buffer_steps=0)
