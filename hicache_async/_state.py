"""The cache's lifecycle states (a module of their own: the session checks them too)."""

from __future__ import annotations

import enum

__all__ = ["CacheState"]


class CacheState(enum.Enum):
    """Lifecycle of a cache."""

    NEW = "new"  # built; background tasks not started
    OPEN = "open"  # serving
    CLOSING = "closing"  # draining background work; new sessions are refused
    CLOSED = "closed"  # tasks stopped, backend closed; every call raises ClosedError


OPEN = CacheState.OPEN  # checked on every request: a module constant is the cheap lookup
