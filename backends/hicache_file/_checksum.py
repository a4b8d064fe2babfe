"""The payload checksum of a page read (xxh3-64, as :func:`hicache_async.storage.codec.checksum`
computes it), without holding the GIL.

The ``xxhash`` module hashes with the GIL held, so two worker threads reading pages took turns
to check them: a hot read ran at 0.74x a raw ``preadv`` at best. The same xxHash library is
inside that module's extension, whose symbols are public; called through :mod:`ctypes`
(which releases the GIL for a foreign call), one thread checks a page while another copies the
next. The value is the same function of the same bytes (tested against the module); where the
symbol or a writable buffer is not to be had, the module is used.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

from hicache_async.storage.codec import checksum as _module_checksum

__all__ = ["FAST", "checksum"]

#: Below this many bytes the foreign call (about 1 us) costs more than the GIL it frees.
_MIN_BYTES = 32 << 10


def _load() -> tuple[Any, Any, Any, Any, Any, Any] | None:
    try:
        import xxhash._xxhash as ext  # type: ignore[import-not-found]

        lib = ctypes.CDLL(ext.__file__)
        one = lib.XXH3_64bits
        create, free = lib.XXH3_createState, lib.XXH3_freeState
        reset, update, digest = (
            lib.XXH3_64bits_reset,
            lib.XXH3_64bits_update,
            lib.XXH3_64bits_digest,
        )
    except (ImportError, OSError, AttributeError):
        return None
    one.argtypes, one.restype = [ctypes.c_void_p, ctypes.c_size_t], ctypes.c_uint64
    create.argtypes, create.restype = [], ctypes.c_void_p
    free.argtypes, free.restype = [ctypes.c_void_p], ctypes.c_int
    reset.argtypes, reset.restype = [ctypes.c_void_p], ctypes.c_int
    update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    update.restype = ctypes.c_int
    digest.argtypes, digest.restype = [ctypes.c_void_p], ctypes.c_uint64
    return one, create, free, reset, update, digest


_LIB = _load()
FAST = _LIB is not None


def _address(segment: memoryview) -> int:
    return ctypes.addressof((ctypes.c_char * len(segment)).from_buffer(segment))


def checksum(segments: Sequence[memoryview]) -> int:
    """xxh3-64 of the concatenation of ``segments`` (writable buffers hash without the GIL)."""
    if _LIB is None or sum(map(len, segments)) < _MIN_BYTES:
        return _module_checksum(segments)
    one, create, free, reset, update, digest = _LIB
    try:
        if len(segments) == 1:
            return int(one(_address(segments[0]), len(segments[0])))
        addresses = [(_address(s), len(s)) for s in segments]
    except (TypeError, ValueError):  # read-only or not contiguous: the module's way
        return _module_checksum(segments)
    state = create()
    if not state:
        return _module_checksum(segments)
    try:
        reset(state)
        for address, size in addresses:
            update(state, address, size)
        return int(digest(state))
    finally:
        free(state)
