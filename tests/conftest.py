"""Shared fixtures: every test starts with no HICACHE_* variables in its environment."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def _clean_hicache_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("HICACHE_"):
            monkeypatch.delenv(name)
