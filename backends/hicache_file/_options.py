"""Options of the file backend (keys of ``storage_backend_extra_config``), and their checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from hicache_async.errors import ConfigError

__all__ = ["FileOptions", "default_io_threads", "default_path", "make_root"]

# Where a user sets the options: named in every error about them.
_WHERE = (
    "the file backend's extra config (storage_backend_extra_config, or the environment "
    "variable HICACHE_STORAGE_BACKEND_EXTRA_CONFIG)"
)
_MAX_CAPACITY = 2**63 - 1  # the largest file offset: no file system holds more


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
        description="none: leave durability to the OS (a killed process loses nothing, a power "
        "cut may lose recent pages); file: each batch's pages and index rows are synced before "
        "the batch is acknowledged; dir: also the directory entries of new files.",
    )
    segment_bytes: int = Field(
        default=256 << 20,
        ge=1 << 20,
        le=1 << 40,
        description="Pages are appended to segment files of about this size (a bigger page "
        "gets a segment of its own).",
    )
    io_threads: int = Field(
        default_factory=default_io_threads,
        gt=0,
        le=256,
        description="Worker threads for file I/O (default: one per CPU, at most 4).",
    )

    @field_validator("path", mode="before")
    @classmethod
    def _a_real_path(cls, value: object) -> object:
        if isinstance(value, str | os.PathLike):
            text = os.fspath(value)
            if isinstance(text, str) and not text.strip():  # an unset variable in a template
                raise ValueError(
                    "an empty path would put the store in the working directory; give the "
                    "store's directory, or leave 'path' out for ~/.cache/hicache-async"
                )
            if "\0" in str(text):
                raise ValueError("a path cannot hold a NUL byte")
        return value

    @field_validator("capacity_bytes", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        if isinstance(value, bool):  # pydantic would take true for 1 byte
            raise ValueError("a number of bytes, not a boolean; leave it unset for no limit")
        return value

    @field_validator("capacity_bytes")
    @classmethod
    def _fits_a_file_system(cls, value: int | None) -> int | None:
        if value is not None and value > _MAX_CAPACITY:
            raise ValueError(
                f"more bytes than any file system holds (at most 2**63 - 1); give the bytes "
                f"the store may use, e.g. {100 * 2**30} for 100 GiB"
            )
        return value


def make_root(path: Path) -> str:
    """The store's directory (absolute, links resolved), created when missing.

    A path that is not a directory and cannot become one is a :class:`ConfigError` that says
    which option to change.
    """
    try:
        root = path.expanduser().resolve()
        os.makedirs(root, exist_ok=True)
    except FileExistsError:
        raise _bad_path(path, "is a regular file, not a directory") from None
    except NotADirectoryError:
        raise _bad_path(path, "is not a directory: a part of it is a regular file") from None
    except PermissionError as exc:
        raise _bad_path(path, f"cannot be created: permission denied ({exc})") from None
    except (OSError, RuntimeError) as exc:  # RuntimeError: no home directory, a link loop
        raise _bad_path(path, f"cannot be created: {exc}") from None
    if not root.is_dir():  # e.g. a link to a file or FIFO that makedirs took for a directory
        raise _bad_path(path, "is not a directory")
    return str(root)


def _bad_path(path: Path, problem: str) -> ConfigError:
    return ConfigError(
        f"file storage: path {str(path)!r} {problem}; set 'path' in {_WHERE} to a directory "
        f'that this process may create or write, e.g. \'{{"path": "/var/cache/hicache"}}\''
    )
