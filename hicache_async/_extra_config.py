"""The storage extra config: inline JSON or ``@file`` (JSON, TOML, YAML).

The runtime consumes a few of its keys itself (the prefetch threshold and the linear
timeout); the rest are the backend's options, which the backend's own model validates.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from hicache_async._validation import describe
from hicache_async.errors import ConfigError

__all__ = ["RUNTIME_KEYS", "parse_extra_config", "runtime_keys_from"]

_SOURCE = "storage_backend_extra_config"


def parse_extra_config(value: str | None) -> dict[str, Any]:
    """The mapping in ``value``: inline JSON, or ``@path`` to a .json, .toml, .yaml or .yml file.

    ``None`` or blank is an empty mapping. Anything else that is not a mapping is a
    :class:`ConfigError` that names the file and the problem.
    """
    if value is None or not value.strip():
        return {}
    text = value.strip()
    if text.startswith("@"):
        return _parse_file(Path(text[1:]).expanduser())
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{_SOURCE} is not valid JSON ({exc}); pass a JSON object, or @path to a "
            f".json, .toml, .yaml or .yml file"
        ) from exc
    return _mapping(parsed, "the inline JSON")


def _parse_file(path: Path) -> dict[str, Any]:
    suffix = path.suffix.lower()
    if suffix not in {".json", ".toml", ".yaml", ".yml"}:
        raise ConfigError(
            f"{_SOURCE} file {path}: unknown suffix {suffix or '(none)'!r}; "
            f"use .json, .toml, .yaml or .yml"
        )
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{_SOURCE} file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{_SOURCE} file {path} cannot be read: {exc}") from exc
    try:
        if suffix == ".json":
            parsed = json.loads(raw)
        elif suffix == ".toml":
            parsed = tomllib.loads(raw.decode())
        else:
            parsed = yaml.safe_load(raw)
    except (ValueError, yaml.YAMLError) as exc:  # JSON, TOML and Unicode errors are ValueErrors
        kind = {".json": "JSON", ".toml": "TOML"}.get(suffix, "YAML")
        raise ConfigError(f"{_SOURCE} file {path} is not valid {kind}: {exc}") from exc
    if parsed is None:  # an empty YAML document
        return {}
    return _mapping(parsed, f"file {path}")


def _mapping(parsed: object, where: str) -> dict[str, Any]:
    if not isinstance(parsed, dict):
        raise ConfigError(
            f"{_SOURCE} ({where}) must hold a mapping of option names to values, "
            f"not a {type(parsed).__name__}"
        )
    return {str(key): value for key, value in parsed.items()}


class _RuntimeKeys(BaseModel):
    """The runtime's own keys, strictly typed: a quoted number in a config file is a mistake."""

    model_config = ConfigDict(extra="ignore")

    prefetch_threshold: StrictInt | None = Field(default=None, ge=0)
    prefetch_timeout_base: float | None = Field(default=None, ge=0)
    prefetch_timeout_per_ki_token: float | None = Field(default=None, ge=0)
    hicache_storage_pass_prefix_keys: StrictBool | None = None


# Extra-config key -> HiCacheConfig field (the seed's names on the left).
RUNTIME_KEYS: dict[str, str] = {
    "prefetch_threshold": "prefetch_threshold",
    "prefetch_timeout_base": "prefetch_timeout_base",
    "prefetch_timeout_per_ki_token": "prefetch_timeout_per_ki_token",
    "hicache_storage_pass_prefix_keys": "storage_pass_prefix_keys",
}


def runtime_keys_from(extra: dict[str, Any]) -> dict[str, Any]:
    """The runtime keys present in ``extra``, validated, under their config field names."""
    present = {key: extra[key] for key in RUNTIME_KEYS if key in extra}
    if not present:
        return {}
    for key in ("prefetch_timeout_base", "prefetch_timeout_per_ki_token"):
        # JSON has no separate int and float; but a string or a bool is not a duration.
        if key in present and (
            isinstance(present[key], bool) or not isinstance(present[key], int | float)
        ):
            raise ConfigError(f"{_SOURCE}: {key} must be a number of seconds, not {present[key]!r}")
    try:
        checked = _RuntimeKeys.model_validate(present)
    except ValidationError as exc:
        raise ConfigError(f"{_SOURCE}: {describe(exc)}") from exc
    return {RUNTIME_KEYS[key]: getattr(checked, key) for key in present}
