"""Two servers share L3: a second HiCache in another process gets L3 hits, bit-exact, for the
prefixes the first wrote; on one Redis, on a 3-node Redis Cluster, on Mooncake Store, and on a
shared directory."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.testing.mooncake_server import MooncakeStore
from hicache_async.testing.redis_server import RedisClusterProcesses, RedisProcess
from tests.test_cache_e2e import serve

ROOT = Path(__file__).resolve().parents[2]
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", page_size=4)
PROMPT = torch.arange(70, 70 + 16 * 4)
SECOND_SERVER = """
import json, sys
import anyio, torch
from hicache_async import HiCache, HiCacheConfig
from tests.test_cache_e2e import serve
config = HiCacheConfig.model_validate_json(sys.argv[1])
async def main():
    async with HiCache.open(config) as cache:
        hit = await serve(cache, torch.arange(70, 70 + 64))  # checks the hit's bytes
        print(json.dumps({"hit": hit, "storage": cache.stats().tiers["storage"].hit_tokens}))
anyio.run(main)
"""


def config(backend: str, options: dict[str, Any]) -> HiCacheConfig:
    return HiCacheConfig(
        layout=LAYOUT,
        device="cpu",
        device_pages=32,
        host_pages=64,
        model_name=f"m-{uuid.uuid4().hex[:8]}",  # a namespace of this test's own
        storage_backend=backend,
        storage_backend_extra_config=json.dumps(options),
        prefetch_threshold=4,
        prefetch_policy="wait_complete",
    )


def first_then_second(cfg: HiCacheConfig) -> dict[str, int]:
    async def first() -> None:
        async with HiCache.open(cfg) as cache:
            assert await serve(cache, PROMPT) == 0

    anyio.run(first)
    child = subprocess.run(
        [sys.executable, "-c", SECOND_SERVER, cfg.model_dump_json()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    result: dict[str, int] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def test_two_servers_on_one_redis(redis_node: RedisProcess) -> None:
    cfg = config("redis", {"host": "127.0.0.1", "port": redis_node.port})
    assert first_then_second(cfg) == {"hit": 64, "storage": 64}


def test_two_servers_on_a_redis_cluster(redis_cluster: RedisClusterProcesses) -> None:
    cfg = config("redis", {"cluster_nodes": redis_cluster.addresses})
    assert first_then_second(cfg) == {"hit": 64, "storage": 64}


def test_two_servers_on_a_shared_directory(tmp_path: Path) -> None:
    cfg = config("file", {"path": str(tmp_path / "shared")})
    assert first_then_second(cfg) == {"hit": 64, "storage": 64}


def test_two_servers_on_mooncake_store(mooncake_store: MooncakeStore) -> None:
    # Both servers are pure clients: the pages live in the store node, beyond the first's life.
    cfg = config("mooncake", mooncake_store.options(prefix=f"{uuid.uuid4().hex[:8]}:"))
    assert first_then_second(cfg) == {"hit": 64, "storage": 64}
