"""The 60-line third-party backend, registered through the entry-point group, passes the kit."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from hicache_async.storage import HiCacheStorageConfig, available_backends, create_storage
from hicache_async.testing.storage import StorageConformance, StorageFactory

from .conftest import EXAMPLES

_dbs = itertools.count()


@pytest.fixture(autouse=True)
def installed(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``pip install`` of a package declaring the entry point leaves on sys.path."""
    site = tmp_path_factory.mktemp("site")
    dist = site / "sqlite_backend_example-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sqlite-backend-example\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(
        "[hicache_async.storage_backends]\nsqlite = sqlite_backend:SQLiteStorage\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.syspath_prepend(str(EXAMPLES))


def test_found_by_name_like_the_built_ins() -> None:
    assert "sqlite" in available_backends()


class TestSQLiteConformance(StorageConformance):
    @pytest.fixture
    def storage_factory(self, tmp_path: Path) -> StorageFactory:
        db = tmp_path / f"pages-{next(_dbs)}.db"

        def make(config: HiCacheStorageConfig):  # type: ignore[no-untyped-def]
            return create_storage("sqlite", config, path=db)

        return make
