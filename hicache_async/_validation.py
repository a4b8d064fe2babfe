"""Turn pydantic's ``ValidationError`` into the project's own errors, with short messages;
and the small checks the settings models share (no booleans as numbers, sizes against the
machine's memory).

pydantic's default text carries documentation URLs and input dumps; users of a cache want
one line per problem: where it is and what to change.
"""

from __future__ import annotations

import os

from pydantic import ValidationError

from hicache_async.errors import HiCacheError

_PREFIXES = ("Value error, ", "Assertion failed, ")


def describe(exc: ValidationError) -> str:
    """One ``location: message`` line per problem found by pydantic."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"])
        msg = err["msg"]
        for prefix in _PREFIXES:
            msg = msg.removeprefix(prefix)
        nested = isinstance(err.get("ctx", {}).get("error"), HiCacheError)
        if not loc:
            lines.append(msg)  # a check across fields: the message names them
        elif nested or err["type"] in {"missing", "extra_forbidden"}:
            lines.append(f"{loc}: {msg}")  # already described, or the input is absent or whole
        else:
            lines.append(f"{loc}: {msg} (got {err.get('input')!r})")
    return "; ".join(lines)


def translate(exc: ValidationError, title: str, error_type: type[HiCacheError]) -> HiCacheError:
    """The project error to raise instead of ``exc``, e.g. ``ConfigError('invalid X: ...')``."""
    return error_type(f"invalid {title}: {describe(exc)}")


def refuse_bool(value: object) -> object:
    """A ``mode="before"`` check for number fields: ``True`` is not a count or a size.

    pydantic's lax mode reads ``True`` as ``1``; in a config that is always a slip.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a number, not the boolean {value}")
    return value


def total_ram_bytes() -> int | None:
    """The machine's physical memory in bytes, or ``None`` where the OS does not say."""
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # not a POSIX system with these names
        return None
    return pages * size if pages > 0 and size > 0 else None


def format_bytes(count: int) -> str:
    """``count`` in binary units with the exact figure: ``"2.0 GiB (2147483648 bytes)"``."""
    if count < 1024:
        return f"{count} bytes"
    value, unit = float(count), "bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):  # noqa: B007 (the last one is kept)
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit} ({count} bytes)"
