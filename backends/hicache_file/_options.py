"""Options of the file backend (keys of ``storage_backend_extra_config``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["FileOptions", "default_path"]


def default_path() -> Path:
    """``~/.cache/hicache-async``: per user, survives restarts, never a shared /tmp."""
    return Path.home() / ".cache" / "hicache-async"


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
    io_threads: int = Field(default=4, gt=0, le=256, description="Worker threads for file I/O.")
