"""Temporary page files: their names say who wrote them, so leftovers can be told from work.

A page is written to ``{page}.{host}.{pid}.{token}.{thread}.tmp`` beside its final name and
renamed over it. A writer killed in between leaves the temp file behind; :func:`is_stale`
decides whether a temp file found later is such a leftover:

- written on this host (same host tag) by a process that is gone (its pid is dead, or it is
  our own pid but another process's token: a restarted container reuses pids): stale now;
- anything else (another host sharing the directory, an older name format): stale once older
  than :data:`STALE_AFTER_S`, by which time no page write is still running.

Removing a live writer's temp file by mistake costs that writer one failed page write (its
rename finds nothing), never wrong data.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading

__all__ = ["STALE_AFTER_S", "TEMP_SUFFIX", "is_stale", "temp_path"]

TEMP_SUFFIX = ".tmp"
#: Age after which a temp file of an owner we cannot check is taken for a leftover.
STALE_AFTER_S = 3600.0

# Tells apart processes that got the same pid (a restarted container); inherited by a fork,
# whose pid differs.
_TOKEN = os.urandom(4).hex()
# Hosts sharing a directory (NFS) have unrelated pids: a pid is checked only on its own host.
_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()


def temp_path(path: str) -> str:
    """The temp file this thread writes the page file ``path`` through."""
    return f"{path}.{_HOST}.{os.getpid()}.{_TOKEN}.{threading.get_ident()}{TEMP_SUFFIX}"


def is_stale(name: str, mtime: float, now: float) -> bool:
    """Whether the temp file called ``name``, last modified at ``mtime``, is a leftover."""
    if now - mtime > STALE_AFTER_S:
        return True
    # {digest} . kv . {host} . {pid} . {token} . {thread} . tmp
    parts = name.split(".")
    if len(parts) != 7 or parts[2] != _HOST or not parts[3].isdigit():
        return False
    return _owner_gone(int(parts[3]), parts[4])


def _owner_gone(pid: int, token: str) -> bool:
    if pid <= 0:  # kill(0) would signal our own process group
        return False
    if pid == os.getpid():
        return token != _TOKEN
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (OSError, OverflowError):  # EPERM: alive, another user's; or no pid at all
        return False
    return False
