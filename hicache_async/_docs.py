"""The configuration reference, generated from the settings models so it never drifts.

``python -m hicache_async._docs > docs/configuration.md`` rewrites it; a test checks that the
committed file equals what this produces.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from hicache_async.config import HiCacheConfig, KVEventsConfig
from hicache_async.layout import KVLayout, dtype_name

__all__ = ["config_markdown"]


def _default(value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, Enum):
        return f"`{value.value}`"
    if hasattr(value, "itemsize"):  # a torch dtype
        return f"`{dtype_name(value)}`"
    return f"`{value!r}`" if value is not None else "unset"


def _type(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    text = text.replace("typing.", "").replace("hicache_async.config.", "")
    return text.replace(" | ", " or ")  # a pipe would split the table cell


def _table(model: type[BaseModel], env_prefix: str | None) -> list[str]:
    head = "| field | type | default | description |"
    if env_prefix is not None:
        head = "| field | env | type | default | description |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, field in model.model_fields.items():
        env = f"`{env_prefix}{name.upper()}` | " if env_prefix is not None else ""
        lines.append(
            f"| `{name}` | {env}{_type(field.annotation)} | {_default(field.default)} | "
            f"{field.description or ''} |"
        )
    return lines


def config_markdown() -> str:
    """The configuration reference page."""
    parts = [
        "# Configuration",
        "",
        "Generated from the pydantic models by `python -m hicache_async._docs`; do not edit.",
        "Precedence: explicit argument > environment (`HICACHE_<FIELD>`, nested with `__`, e.g.",
        "`HICACHE_LAYOUT__NUM_LAYERS`) > storage extra config (runtime keys) > default.",
        "",
        "## `HiCacheConfig`",
        "",
        *_table(HiCacheConfig, "HICACHE_"),
        "",
        "## `KVLayout` (`HiCacheConfig.layout`)",
        "",
        *_table(KVLayout, None),
        "",
        "## `KVEventsConfig` (`HiCacheConfig.kv_events`)",
        "",
        *_table(KVEventsConfig, None),
        "",
    ]
    return "\n".join(parts)


if __name__ == "__main__":  # pragma: no cover
    print(config_markdown(), end="")
