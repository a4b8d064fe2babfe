"""Turn pydantic's ``ValidationError`` into the project's own errors, with short messages.

pydantic's default text carries documentation URLs and input dumps; users of a cache want
one line per problem: where it is and what to change.
"""

from __future__ import annotations

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
