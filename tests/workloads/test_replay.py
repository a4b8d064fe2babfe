"""The replay CLI through the real runtime: LRU equals the reference; an unbounded L3 finds
every repeated prefix; every hit is checked byte for byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hicache_async.cli import main
from tests.test_radix_trace_lru import TRACE, _reference_hits, _requests


def replay(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["replay", str(TRACE), "--json", *args]) == 0
    result: dict[str, object] = json.loads(capsys.readouterr().out)
    return result


@pytest.mark.parametrize("capacity", [256, 1024])
def test_l1_only_lru_equals_the_reference(
    capsys: pytest.CaptureFixture[str], capacity: int
) -> None:
    reqs = _requests()
    expected = _reference_hits(reqs, capacity) / sum(len(r) for r in reqs)
    result = replay(capsys, "--l1-pages", str(capacity), "--verify")
    assert result["requests"] == len(reqs)
    assert abs(float(result["hit_ratio_pages"]) - expected) < 0.005  # 0.5 pp
    assert result["verify_failures"] == 0


def test_unbounded_file_l3_finds_every_repeated_prefix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    reqs = _requests()[:300]  # the file is in timestamp order: its first lines come first
    infinite = _reference_hits(reqs, 10**9) / sum(len(r) for r in reqs)
    args = ["--limit", "300", "--l1-pages", "256", "--l2-pages", "512", "--l3", "file"]
    args += ["--l3-path", str(tmp_path), "--prefetch-policy", "wait_complete", "--verify"]
    result = replay(capsys, *args, "--drain-each")
    assert abs(float(result["hit_ratio_pages"]) - infinite) < 0.01  # 1 pp
    tiers = result["tiers"]
    assert isinstance(tiers, dict)
    assert tiers["storage"]["hit_pages"] > 0
    assert result["verify_failures"] == 0


def test_plot_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    png = tmp_path / "hits.png"
    result = replay(capsys, "--limit", "400", "--l1-pages", "128", "--plot", str(png))
    assert result["requests"] == 400
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
