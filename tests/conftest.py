"""Shared fixtures: every test starts with no HICACHE_* variables in its environment."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import pytest


@pytest.fixture(autouse=True)
def _clean_hicache_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("HICACHE_"):
            monkeypatch.delenv(name)


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Every async test runs on asyncio's own loop and on uvloop (``one_loop``: asyncio's)."""
    factories: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
        "asyncio": asyncio.new_event_loop
    }
    if item.get_closest_marker("one_loop") is not None:
        return factories
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is in the test extra
        return factories
    factories["uvloop"] = uvloop.new_event_loop
    return factories
