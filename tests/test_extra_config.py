from __future__ import annotations

from pathlib import Path

import pytest

from hicache_async import ConfigError
from hicache_async.config import parse_extra_config

EXPECTED = {"path": "/mnt/kv", "capacity_bytes": 1024, "nested": {"a": [1, 2]}}


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".json", '{"path": "/mnt/kv", "capacity_bytes": 1024, "nested": {"a": [1, 2]}}'),
        (".toml", 'path = "/mnt/kv"\ncapacity_bytes = 1024\n[nested]\na = [1, 2]\n'),
        (".yaml", "path: /mnt/kv\ncapacity_bytes: 1024\nnested:\n  a: [1, 2]\n"),
        (".yml", "path: /mnt/kv\ncapacity_bytes: 1024\nnested: {a: [1, 2]}\n"),
        (".JSON", '{"path": "/mnt/kv", "capacity_bytes": 1024, "nested": {"a": [1, 2]}}'),
    ],
)
def test_every_file_format(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"extra{suffix}"
    path.write_text(text)
    assert parse_extra_config(f"@{path}") == EXPECTED


def test_inline_json_and_empty() -> None:
    assert parse_extra_config('{"fsync": "file"}') == {"fsync": "file"}
    assert parse_extra_config(None) == {}
    assert parse_extra_config("   ") == {}


def test_empty_yaml_file_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert parse_extra_config(f"@{path}") == {}


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "x.json").write_text('{"k": 1}')
    assert parse_extra_config("@~/x.json") == {"k": 1}


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=f"file {path} does not exist"):
        parse_extra_config(f"@{path}")


def test_unknown_suffix(tmp_path: Path) -> None:
    path = tmp_path / "extra.ini"
    path.write_text("[x]\n")
    with pytest.raises(ConfigError, match=r"unknown suffix '\.ini'; use \.json, \.toml, \.yaml"):
        parse_extra_config(f"@{path}")


@pytest.mark.parametrize(
    ("suffix", "text", "kind"),
    [(".json", "{oops", "JSON"), (".toml", "a = = 1", "TOML"), (".yaml", "a: [1, 2", "YAML")],
)
def test_parse_errors_name_file_and_format(
    tmp_path: Path, suffix: str, text: str, kind: str
) -> None:
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"file {path} is not valid {kind}"):
        parse_extra_config(f"@{path}")


def test_inline_parse_error() -> None:
    with pytest.raises(ConfigError, match=r"is not valid JSON .*; pass a JSON object, or @path"):
        parse_extra_config("{path: /mnt}")


@pytest.mark.parametrize("text", ["[1, 2]", '"path"', "3"])
def test_top_level_must_be_a_mapping(text: str) -> None:
    with pytest.raises(ConfigError, match="must hold a mapping of option names to values"):
        parse_extra_config(text)


def test_yaml_list_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=f"file {path}.* not a list"):
        parse_extra_config(f"@{path}")


def test_a_file_error_surfaces_from_the_config(tmp_path: Path) -> None:
    from hicache_async import HiCacheConfig

    with pytest.raises(ConfigError, match="does not exist"):
        HiCacheConfig(
            layout={"num_layers": 1, "num_kv_heads": 1, "head_dim": 8},
            storage_backend_extra_config=f"@{tmp_path / 'missing.toml'}",
        )
