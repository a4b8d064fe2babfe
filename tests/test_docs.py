"""The configuration reference is generated from the models and committed up to date."""

from __future__ import annotations

from pathlib import Path

from hicache_async._docs import config_markdown

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_configuration_reference_is_current() -> None:
    assert DOC.read_text() == config_markdown(), (
        "docs/configuration.md is stale: run python -m hicache_async._docs > docs/configuration.md"
    )


def test_every_field_is_documented() -> None:
    text = config_markdown()
    for name in (
        "device_pages",
        "storage_backend_extra_config",
        "prefetch_timeout_base",
        "kv_lora_rank",
        "replay_endpoint",
    ):
        assert f"`{name}`" in text
