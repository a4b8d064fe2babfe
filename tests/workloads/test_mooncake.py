from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hicache_async import ConfigError, KVLayout
from hicache_async.workloads.mooncake import load_mooncake_trace, page_kv, request_tokens


def write(tmp_path: Path, *lines: object) -> Path:
    path = tmp_path / "trace.jsonl"
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    )
    return path


def test_loads_in_timestamp_order_ties_keep_file_order(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        {"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [0, 1]},
        {"timestamp": 1, "input_length": 10, "output_length": 1, "hash_ids": [0]},
        "",
        {"timestamp": 5, "input_length": 512, "output_length": 2, "hash_ids": [0, 2]},
    )
    got = load_mooncake_trace(path)
    assert [r.hash_ids for r in got] == [(0,), (0, 1), (0, 2)]
    assert got[1].input_length == 600
    assert len(load_mooncake_trace(path, limit=2)) == 2


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", "trace.jsonl:2: not JSON"),
        (json.dumps({"timestamp": 1, "input_length": 5}), "needs 'hash_ids'"),
        (json.dumps({"timestamp": 1, "input_length": 5, "hash_ids": ["x"]}), "invalid literal"),
        (json.dumps({"timestamp": 1, "input_length": 5, "hash_ids": [-3]}), "must not be negative"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, {"timestamp": 0, "input_length": 1, "hash_ids": [0]}, line)
    with pytest.raises(ConfigError, match=message):
        load_mooncake_trace(path)


def test_missing_trace(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_mooncake_trace(tmp_path / "none.jsonl")


def test_tokens_are_unique_per_block_and_shared_prefixes_share_tokens() -> None:
    a, b = request_tokens((0, 7), 4), request_tokens((0, 8), 4)
    assert a.tolist() == [0, 1, 2, 3, 28, 29, 30, 31]
    assert torch.equal(a[:4], b[:4])
    assert not torch.equal(a[4:], b[4:])


@pytest.mark.parametrize(
    "layout",
    [
        KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="bfloat16", page_size=4),
        KVLayout(num_layers=3, use_mla=True, head_dim=6, dtype="float8_e4m3fn", page_size=3),
    ],
)
def test_page_kv_is_deterministic_and_distinct(layout: KVLayout) -> None:
    page = page_kv(41, layout)
    assert page.dtype == layout.dtype
    assert page.shape == (
        layout.num_layers,
        layout.kv_planes,
        layout.page_size,
        layout.num_kv_heads,
        layout.head_dim,
    )
    assert torch.equal(page.view(torch.uint8), page_kv(41, layout).view(torch.uint8))
    other = page_kv(42, layout).view(torch.uint8)
    assert (page.view(torch.uint8) != other).float().mean() > 0.5
    # Every layer differs from the others, so a layer mix-up is visible too.
    flat = page.view(torch.uint8).reshape(layout.num_layers, -1)
    assert not torch.equal(flat[0], flat[1])
