"""Models never read each other's KV from a shared L3 (issue 17, defect 7).

L3 keys carry ``HiCacheConfig.model_name`` and the layout's fingerprint, so two models with the
same KV geometry on one directory (or one Redis), or one model name in two dtypes, miss each
other's pages; an L3 other processes can share is refused without a model name.
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from hicache_async import ConfigError, HiCache, HiCacheConfig, KVLayout
from hicache_async.storage import HiCacheStorageConfig, create_storage
from hicache_async.storage._config import namespace_suffix
from hicache_async.testing.redis_server import RedisProcess
from tests.test_cache_e2e import serve

F16 = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", page_size=4)
BF16 = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", page_size=4)
PROMPT = torch.arange(300, 300 + 16 * 4)  # sixteen pages


def config(layout: KVLayout, model: str | None, backend: str, options: dict[str, Any]) -> Any:
    return HiCacheConfig(
        layout=layout,
        model_name=model,
        device="cpu",
        device_pages=32,
        host_pages=64,
        storage_backend=backend,
        storage_backend_extra_config=json.dumps(options),
        prefetch_threshold=4,
        prefetch_policy="wait_complete",
    )


def run(cfg: HiCacheConfig) -> dict[str, Any]:
    """Serve PROMPT through a fresh cache on ``cfg``; what it found in L3."""

    async def main() -> dict[str, Any]:
        async with HiCache.open(cfg) as cache:
            hit = await serve(cache, PROMPT)  # checks the bytes of every hit
            storage = cache.storage
            assert storage is not None
            return {
                "hit": hit,
                "storage_hit_tokens": cache.stats().tiers["storage"].hit_tokens,
                "errors": storage.get_stats()["errors"],
            }

    result: dict[str, Any] = anyio.run(main)
    return result


def test_two_model_names_on_one_directory_do_not_share_pages(tmp_path: Path) -> None:
    where = {"path": str(tmp_path / "l3")}
    assert run(config(F16, "model-a", "file", where))["hit"] == 0  # writes sixteen pages
    other = run(config(F16, "model-b", "file", where))
    assert other == {"hit": 0, "storage_hit_tokens": 0, "errors": {}}
    again = run(config(F16, "model-a", "file", where))  # the pages are there for their model
    assert again["hit"] == again["storage_hit_tokens"] == PROMPT.numel()


def test_same_name_in_another_dtype_never_matches(tmp_path: Path) -> None:
    # float16 and bfloat16 pages have the same size: only the namespace tells them apart, so
    # the bf16 cache must not even find the keys (before, it read them and counted them corrupt).
    where = {"path": str(tmp_path / "l3")}
    assert run(config(F16, "llama", "file", where))["hit"] == 0
    assert run(config(BF16, "llama", "file", where)) == {
        "hit": 0,
        "storage_hit_tokens": 0,
        "errors": {},
    }
    assert run(config(F16, "llama", "file", where))["storage_hit_tokens"] == PROMPT.numel()


def test_two_model_names_on_one_redis_do_not_share_pages(redis_node: RedisProcess) -> None:
    where = {"host": "127.0.0.1", "port": redis_node.port, "prefix": "ns-test:"}
    assert run(config(F16, "redis-model-a", "redis", where))["hit"] == 0
    assert run(config(F16, "redis-model-b", "redis", where))["storage_hit_tokens"] == 0
    assert run(config(BF16, "redis-model-a", "redis", where))["storage_hit_tokens"] == 0
    assert run(config(F16, "redis-model-a", "redis", where))["hit"] == PROMPT.numel()


@pytest.mark.parametrize("backend", ["file", "redis", "mooncake", "some-plugin"])
def test_a_shared_l3_without_model_name_is_refused(backend: str) -> None:
    with pytest.raises(ConfigError) as caught:
        HiCacheConfig(layout=F16, storage_backend=backend)
    message = str(caught.value)
    for what in ("model_name", "HICACHE_MODEL_NAME", "--model-name", "memory", "none"):
        assert what in message
    assert f"storage_backend={backend!r}" in message


def test_the_default_config_is_refused_without_model_name() -> None:
    # storage_backend defaults to "file": a layout alone is not enough.
    with pytest.raises(ConfigError, match="model_name is not set"):
        HiCacheConfig(layout=F16)


@pytest.mark.parametrize("backend", ["memory", "none"])
def test_private_l3_needs_no_model_name(backend: str) -> None:
    assert HiCacheConfig(layout=F16, storage_backend=backend).model_name is None


async def test_model_name_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HICACHE_MODEL_NAME", "  Qwen/Qwen2.5-7B  ")
    cfg = HiCacheConfig(
        layout=F16,
        device="cpu",
        device_pages=8,
        storage_backend_extra_config=json.dumps({"path": str(tmp_path)}),
    )
    assert cfg.model_name == "Qwen/Qwen2.5-7B"
    async with HiCache.open(cfg) as cache:
        assert cache.storage is not None
        assert cache.storage.suffix == f"_Qwen/Qwen2.5-7B@{F16.fingerprint_digest}_0_1"
    # An explicit argument still ranks above the environment.
    assert HiCacheConfig(layout=F16, model_name="explicit").model_name == "explicit"


def test_a_blank_environment_model_name_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HICACHE_MODEL_NAME", "   ")
    with pytest.raises(ConfigError, match="HICACHE_MODEL_NAME"):
        HiCacheConfig(layout=F16)


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "\ud800", "x" * 257])
def test_unusable_model_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="model_name"):
        HiCacheConfig(layout=F16, model_name=name)


def test_the_namespace_holds_model_layout_and_rank() -> None:
    mha = HiCacheStorageConfig(model_name="m", tp_rank=1, tp_size=2, layout_fingerprint="ab12")
    assert namespace_suffix(mha) == "_m@ab12_1_2"
    mla = HiCacheStorageConfig(model_name="m", is_mla_model=True, layout_fingerprint="ab12")
    assert namespace_suffix(mla) == "_m@ab12"
    # Without a fingerprint (a backend opened by hand), SGLang's suffix as before.
    assert namespace_suffix(HiCacheStorageConfig(model_name="m")) == "_m_0_1"


def test_fingerprint_digest_is_stable_and_tells_every_geometry_apart() -> None:
    # Pinned: a digest that changed between versions would orphan every stored page.
    assert F16.fingerprint_digest == F16.model_copy().fingerprint_digest
    assert len(F16.fingerprint_digest) == 16
    assert int(F16.fingerprint_digest, 16) >= 0
    base: dict[str, Any] = {
        "num_layers": 2,
        "num_kv_heads": 2,
        "head_dim": 8,
        "dtype": "float16",
        "page_size": 4,
    }
    digests = {KVLayout(**base).fingerprint_digest}
    for change in (
        {"dtype": "bfloat16"},
        {"num_layers": 3},
        {"num_kv_heads": 4},
        {"head_dim": 16},
        {"page_size": 8},
    ):
        digests.add(KVLayout(**{**base, **change}).fingerprint_digest)
    # MLA: one latent width (576) split two ways is two layouts.
    mla = {"num_layers": 2, "use_mla": True, "dtype": "bfloat16", "page_size": 4}
    digests.add(KVLayout(**mla, kv_lora_rank=512, qk_rope_head_dim=64).fingerprint_digest)
    digests.add(KVLayout(**mla, kv_lora_rank=448, qk_rope_head_dim=128).fingerprint_digest)
    assert len(digests) == 8


def test_fingerprint_digest_value_is_pinned() -> None:
    assert F16.fingerprint == "mha:float16:L2:H2:D8:P4"
    assert F16.fingerprint_digest == _PINNED


async def test_the_cache_namespaces_its_backend_with_the_layout(tmp_path: Path) -> None:
    async with HiCache.open(config(BF16, "m", "file", {"path": str(tmp_path)})) as cache:
        assert cache.storage is not None
        assert cache.storage.config.layout_fingerprint == BF16.fingerprint_digest
        assert cache.storage.config.model_name == "m"


async def test_the_old_keyword_is_deprecated_but_still_overrides(tmp_path: Path) -> None:
    cfg = config(F16, "from-config", "file", {"path": str(tmp_path)})
    async with AsyncExitStack() as stack:
        with pytest.warns(DeprecationWarning, match=r"HiCacheConfig\(model_name=...\)"):
            cache = await stack.enter_async_context(HiCache.open(cfg, model_name="from-keyword"))
        assert cache.config.model_name == "from-keyword"
        assert cache.storage is not None
        assert cache.storage.suffix.startswith("_from-keyword@")


def test_a_backend_opened_by_hand_keeps_its_own_config() -> None:
    storage = create_storage("memory", HiCacheStorageConfig(model_name="m"))
    assert storage.suffix == "_m_0_1"


_PINNED = "a096e238f135be64"


def test_the_command_line_names_the_model(tmp_path: Path) -> None:
    from hicache_async.cli import build_parser
    from hicache_async.workloads.replay import ReplayOptions, _config

    parser = build_parser()
    assert parser.parse_args(["demo"]).model_name == "hicache-demo-tiny"
    assert parser.parse_args(["replay", "t.jsonl"]).model_name == "replay"
    args = parser.parse_args(["replay", "t.jsonl", "--l3", "file", "--model-name", "llama-8b"])
    options = ReplayOptions(
        trace=Path(args.trace),
        l1_pages=64,
        l2_pages=128,
        l3=args.l3,
        l3_path=tmp_path,
        model_name=args.model_name,
    )
    assert _config(options).model_name == "llama-8b"
    demo_help = parser.parse_args(["demo", "--model-name", "x"])
    assert demo_help.model_name == "x"
