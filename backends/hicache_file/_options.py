"""Options of the file backend (keys of ``storage_backend_extra_config``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FileOptions", "default_io_threads", "default_path"]


def default_path() -> Path:
    """``~/.cache/hicache-async``: per user, survives restarts, never a shared /tmp."""
    return Path.home() / ".cache" / "hicache-async"


def default_io_threads() -> int:
    """One thread per CPU, at most 4: hot reads are memory-bound copies plus a checksum, and
    more threads than cores only delay the event loop (measured in bench_storage.py)."""
    return max(1, min(4, os.cpu_count() or 1))


class FileOptions(BaseModel):
    """How and where the file backend stores pages."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path = Field(default_factory=default_path, description="Directory of the store.")
    capacity_bytes: int | None = Field(
        default=None, gt=0, description="Remove least recently used pages above this size."
    )
    fsync: Literal["none", "file", "dir"] = Field(
        default="none",
        description="none: leave durability to the OS; file: fsync each page before it becomes "
        "visible; dir: also fsync its directory after the rename.",
    )
    io_threads: int = Field(
        default_factory=default_io_threads,
        gt=0,
        le=256,
        description="Worker threads for file I/O (default: one per CPU, at most 4).",
    )
