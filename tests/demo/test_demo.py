from __future__ import annotations

import json
from pathlib import Path

import pytest

from hicache_async.cli import main
from hicache_async.metrics import Tier


@pytest.mark.timeout(300)
def test_demo_twice_second_run_hits_l3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["demo", "--dir", str(tmp_path), "--conversations", "6", "--turns", "3", "--json"]
    assert main(args) == 0  # exit 0 only when every request's logits equal recomputation
    first = json.loads(capsys.readouterr().out)
    assert first["verified"] == first["requests"] == 18
    assert first["saved_tokens"] > 0
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["verified"] == second["requests"]
    assert second["stats"]["tiers"][Tier.STORAGE.value]["hit_tokens"] > 0
    assert second["computed_tokens"] < first["computed_tokens"]


def test_demo_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--dir", str(tmp_path), "--conversations", "2", "--turns", "2"]) == 0
    out = capsys.readouterr().out
    assert "logits equal to recomputation: 4/4 requests" in out
    for tier in ("device", "host", "storage"):
        assert tier in out
