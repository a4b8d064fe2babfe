from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hicache_async import __version__
from hicache_async.cli import main


def test_info_json_with_layout_from_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HICACHE_LAYOUT__NUM_LAYERS", "4")
    monkeypatch.setenv("HICACHE_LAYOUT__NUM_KV_HEADS", "2")
    monkeypatch.setenv("HICACHE_LAYOUT__HEAD_DIM", "64")
    monkeypatch.setenv("HICACHE_DEVICE_PAGES", "10")
    monkeypatch.setenv("HICACHE_MODEL_NAME", "test-model")
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == __version__
    assert report["config"]["layout"]["num_layers"] == 4
    assert report["derived"]["bytes_per_page"] == 2 * 2 * 64 * 2 * 4 * 16
    assert report["derived"]["host_pages"] == 20
    assert set(report["optional"]) >= {"redis", "uvloop", "zmq"}
    assert report["notes"] == []


def test_info_without_layout_shows_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "bytes_per_token = 131072" in out
    assert "no layout in the environment" in out


def test_config_error_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HICACHE_HOST_PAGES", "1")
    assert main(["info"]) == 2
    assert "smaller than L1" in capsys.readouterr().err


def test_console_script_module_entry() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "hicache_async", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert done.stdout.strip() == f"hicache-async {__version__}"
