from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hicache_async import (
    ConfigError,
    EvictionPolicy,
    HiCacheConfig,
    HostLayout,
    KVEventsConfig,
    PrefetchPolicy,
    WritePolicy,
)

LAYOUT = {"num_layers": 2, "num_kv_heads": 2, "head_dim": 8, "dtype": "float16", "page_size": 4}


def make(**overrides: object) -> HiCacheConfig:
    return HiCacheConfig(**{"layout": LAYOUT, "model_name": "test-model", **overrides})


def test_defaults() -> None:
    config = make()
    assert config.storage_backend == "file"
    assert config.write_policy is WritePolicy.WRITE_THROUGH
    assert config.prefetch_policy is PrefetchPolicy.BEST_EFFORT
    assert config.eviction_policy is EvictionPolicy.LRU
    assert config.resolved_host_eviction_policy is EvictionPolicy.LRU
    assert config.host_layout is HostLayout.PAGE_FIRST
    assert config.resolved_host_pages == 2 * config.device_pages  # SGLang's hicache_ratio 2.0
    assert config.resolved_prefetch_capacity_pages == config.device_pages
    assert (config.prefetch_threshold, config.prefetch_timeout_base) == (256, 1.0)
    assert config.prefetch_timeout_per_ki_token == 0.25
    assert config.storage_pass_prefix_keys is False
    assert config.kv_events is None
    assert config.resolve_device() == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_enum_fields_accept_their_string_values() -> None:
    config = make(
        write_policy="write_back",
        prefetch_policy="timeout",
        eviction_policy="lfu",
        host_eviction_policy="fifo",
        host_layout="layer_first",
        io_backend="direct",
    )
    assert config.write_policy is WritePolicy.WRITE_BACK
    assert config.prefetch_policy is PrefetchPolicy.TIMEOUT
    assert config.resolved_host_eviction_policy is EvictionPolicy.FIFO
    assert config.host_layout is HostLayout.LAYER_FIRST


def test_host_size_by_pages_bytes_or_ratio() -> None:
    page = make().layout.bytes_per_page
    assert make(device_pages=10, host_pages=25).resolved_host_pages == 25
    assert make(device_pages=10, host_bytes=page * 30 + 7).resolved_host_pages == 30
    assert make(device_pages=10, host_ratio=3.5).resolved_host_pages == 35
    assert not make(host_pages=0, storage_backend="none").host_enabled


def test_linear_prefetch_timeout() -> None:
    config = make(prefetch_timeout_base=0.5, prefetch_timeout_per_ki_token=0.1)
    assert config.prefetch_timeout(0) == 0.5
    assert config.prefetch_timeout(4096) == pytest.approx(0.9)


def test_kv_events_defaults_bind_loopback() -> None:
    config = make(kv_events={})
    assert config.kv_events == KVEventsConfig()
    assert config.kv_events.endpoint == "tcp://127.0.0.1:5557"
    assert (config.kv_events.buffer_steps, config.kv_events.hwm) == (10_000, 100_000)


def test_backend_name_is_normalised() -> None:
    assert make(storage_backend=" Redis ").storage_backend == "redis"
    assert not make(storage_backend="none").storage_enabled


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"device_pages": 100, "host_pages": 50},
            "the L2 host pool (50 pages) is smaller than L1 (100 pages)",
        ),
        (
            {"device_pages": 100, "host_ratio": 0.5},
            "give L2 at least 100 pages (host_pages, host_bytes or host_ratio >= 1)",
        ),
        ({"host_pages": 4096, "host_bytes": 1 << 30}, "set host_pages or host_bytes, not both"),
        ({"host_bytes": 100}, "host_bytes=100 holds no page of 512 bytes"),
        ({"host_pages": 0}, "L3 storage ('file') moves pages through L2, which is disabled"),
        ({"prefetch_capacity_pages": 0}, "prefetch_capacity_pages=0 refuses every L3 prefetch"),
        (
            {"device_pages": 8, "prefetch_capacity_pages": 17},
            "prefetch_capacity_pages=17 exceeds the L2 pool (16 pages)",
        ),
        (
            {"host_layout": "page_first_direct", "layout": {**LAYOUT, "page_size": 12}},
            "needs a power-of-two page_size, not 12",
        ),
        ({"device_pages": 0}, "device_pages: Input should be greater than 0"),
        ({"host_ratio": -1}, "host_ratio: Input should be greater than 0"),
        (
            {"write_policy": "write_sometimes"},
            "write_policy: Input should be 'write_through', 'write_through_selective' or "
            "'write_back'",
        ),
        ({"eviction_policy": "random"}, "eviction_policy: Input should be 'lru', 'lfu'"),
        ({"prefetch_policy": "eager"}, "prefetch_policy: Input should be 'best_effort'"),
        ({"storage_backend": "my backend!"}, "a storage backend name is lowercase letters"),
        ({"device": "tpu"}, "device must be auto, cpu, cuda or cuda:N"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        (
            {"layout": {**LAYOUT, "num_layers": 0}},
            "layout: invalid KVLayout: num_layers: Input should be greater than 0 (got 0)",
        ),
        (
            {"kv_events": {"publisher": "kafka"}},
            "kv_events: invalid KVEventsConfig: publisher: Input should be 'zmq' or 'null'",
        ),
    ],
)
def test_config_errors_say_what_to_change(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="invalid HiCacheConfig") as info:
        make(**overrides)
    assert message in str(info.value)


def test_layout_is_required() -> None:
    with pytest.raises(ConfigError, match="layout: Field required"):
        HiCacheConfig()


def test_no_l2_is_fine_without_l3() -> None:
    config = make(host_pages=0, storage_backend="none")
    assert config.resolved_host_pages == 0
    assert not config.storage_enabled


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_device_without_cuda() -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        make(device="cuda:0").resolve_device()


# -- the environment and the precedence ----------------------------------------------------


def test_environment_nested_and_enum(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HICACHE_LAYOUT__NUM_LAYERS", "61")
    monkeypatch.setenv("HICACHE_LAYOUT__USE_MLA", "true")
    monkeypatch.setenv("HICACHE_LAYOUT__KV_LORA_RANK", "512")
    monkeypatch.setenv("HICACHE_LAYOUT__QK_ROPE_HEAD_DIM", "64")
    monkeypatch.setenv("HICACHE_WRITE_POLICY", "write_back")
    monkeypatch.setenv("HICACHE_KV_EVENTS__TOPIC", "kv")
    monkeypatch.setenv("HICACHE_MODEL_NAME", "deepseek-ai/DeepSeek-V3")
    config = HiCacheConfig()
    assert config.model_name == "deepseek-ai/DeepSeek-V3"
    assert config.layout.use_mla
    assert config.layout.head_dim == 576
    assert config.write_policy is WritePolicy.WRITE_BACK
    assert config.kv_events is not None
    assert config.kv_events.topic == "kv"


def test_bad_environment_value_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HICACHE_DEVICE_PAGES", "many")
    with pytest.raises(ConfigError, match="device_pages: Input should be a valid integer"):
        make()


def _extra_file(tmp_path: Path, threshold: int) -> str:
    path = tmp_path / "extra.toml"
    path.write_text(f"prefetch_threshold = {threshold}\nroot = '/data'\n")
    return f"@{path}"


def test_precedence_default(tmp_path: Path) -> None:
    assert make().prefetch_threshold == 256


def test_precedence_extra_config_file_over_default(tmp_path: Path) -> None:
    config = make(storage_backend_extra_config=_extra_file(tmp_path, 111))
    assert config.prefetch_threshold == 111
    assert config.storage_options == {"root": "/data"}  # runtime keys are not the backend's


def test_precedence_environment_over_extra_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HICACHE_PREFETCH_THRESHOLD", "222")
    config = make(storage_backend_extra_config=_extra_file(tmp_path, 111))
    assert config.prefetch_threshold == 222


def test_precedence_argument_over_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HICACHE_PREFETCH_THRESHOLD", "222")
    config = make(storage_backend_extra_config=_extra_file(tmp_path, 111), prefetch_threshold=333)
    assert config.prefetch_threshold == 333


def test_extra_config_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HICACHE_STORAGE_BACKEND_EXTRA_CONFIG", _extra_file(tmp_path, 444))
    assert make().prefetch_threshold == 444


def test_all_runtime_keys_from_extra_config() -> None:
    config = make(
        storage_backend_extra_config=(
            '{"prefetch_threshold": 64, "prefetch_timeout_base": 2, '
            '"prefetch_timeout_per_ki_token": 0.5, "hicache_storage_pass_prefix_keys": true, '
            '"capacity_bytes": 1000}'
        )
    )
    assert config.prefetch_threshold == 64
    assert config.prefetch_timeout_base == 2.0
    assert config.prefetch_timeout_per_ki_token == 0.5
    assert config.storage_pass_prefix_keys is True
    assert config.storage_options == {"capacity_bytes": 1000}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('{"prefetch_threshold": "256"}', "prefetch_threshold: Input should be a valid integer"),
        ('{"prefetch_threshold": 1.5}', "prefetch_threshold: Input should be a valid integer"),
        (
            '{"prefetch_threshold": -1}',
            "prefetch_threshold: Input should be greater than or equal to 0",
        ),
        ('{"prefetch_timeout_base": "1s"}', "prefetch_timeout_base must be a number of seconds"),
        (
            '{"prefetch_timeout_per_ki_token": true}',
            "prefetch_timeout_per_ki_token must be a number",
        ),
        (
            '{"hicache_storage_pass_prefix_keys": "yes"}',
            "hicache_storage_pass_prefix_keys: Input should be a valid boolean",
        ),
    ],
)
def test_wrong_runtime_key_types(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match="storage_backend_extra_config") as info:
        make(storage_backend_extra_config=extra)
    assert message in str(info.value)
