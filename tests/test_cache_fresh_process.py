"""L3 outlives the process: a second HiCache in a fresh process finds what the first wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, HostLayout, KVLayout

from .test_cache_e2e import serve

ROOT = Path(__file__).resolve().parents[1]
MHA = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, dtype="float16", page_size=4)
MLA = KVLayout(num_layers=2, use_mla=True, head_dim=8, dtype="bfloat16", page_size=4)

CHILD = """
import json, sys
import anyio, torch
from hicache_async import HiCache, HiCacheConfig
from tests.test_cache_e2e import serve
config = HiCacheConfig.model_validate_json(sys.argv[1])
async def main():
    async with HiCache.open(config) as cache:
        hit = await serve(cache, torch.arange(7, 7 + 48))  # serve() checks the hit's bytes
        print(json.dumps({"hit": hit, "storage": cache.stats().tiers["storage"].hit_tokens}))
anyio.run(main)
"""


CASES = [(MHA, h) for h in HostLayout] + [(MLA, HostLayout.LAYER_FIRST)]


@pytest.mark.parametrize(("layout", "host_layout"), CASES)
def test_a_fresh_process_hits_l3_bit_exact(
    layout: KVLayout, host_layout: HostLayout, tmp_path: Path
) -> None:
    def config(host: HostLayout) -> HiCacheConfig:
        return HiCacheConfig(
            layout=layout,
            model_name="test-model",
            device="cpu",
            device_pages=16,
            host_pages=32,
            host_layout=host,
            storage_backend="file",
            storage_backend_extra_config=f'{{"path": "{tmp_path}"}}',
            prefetch_threshold=4,
            prefetch_policy="wait_complete",
        )

    async def first() -> None:
        async with HiCache.open(config(HostLayout.PAGE_FIRST)) as cache:
            await serve(cache, torch.arange(7, 7 + 48))

    anyio.run(first)  # one loop is enough: the point is the second process
    child = subprocess.run(
        [sys.executable, "-c", CHILD, config(host_layout).model_dump_json()],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result == {"hit": 48, "storage": 48}
