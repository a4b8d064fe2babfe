"""Chained SHA-256 page hashes: the L3 storage keys and the KV-event block hashes.

Page ``i`` hashes to ``sha256(prev + tokens_i)`` where ``tokens_i`` are the page's token ids as
4-byte little-endian ints and ``prev`` is the raw 32-byte digest of page ``i - 1``. The first page
of a chain has no ``prev``; when the key has an ``extra_key``, the chain starts from that key's
own digest, ``sha256(b"hicache-extra-key\0" + extra_key)`` in UTF-8, so two namespaces never
produce the same hashes. (Folding the key's raw bytes in instead would let a 32-byte extra key
equal to some page's digest continue that page's chain: another namespace's L3 keys, and KV
computed after a prefix the request does not have.) Hex strings out; deterministic across
processes and machines (no ``hash()``, no seeds).

The tree computes these lazily, once per page, and caches them on the node: never on the match or
insert path.
"""

from __future__ import annotations

import hashlib

import numpy as np

from hicache_async.radix.key import RadixInputError, TokenIds, tokens_to_bytes

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_EXTRA_KEY_TAG = b"hicache-extra-key\0"

__all__ = ["hash_narrow_pages", "hash_pages", "namespace_digest", "page_hashes"]


def namespace_digest(extra_key: str) -> bytes:
    """The 32 bytes a namespace's chains start from (in place of a parent page's digest)."""
    return hashlib.sha256(_EXTRA_KEY_TAG + extra_key.encode()).digest()


def hash_pages(
    data: bytes | memoryview,
    page_size: int,
    extra_key: str | None = None,
    parent_hash: str | None = None,
) -> list[str]:
    """Hashes of the whole pages of int64-LE token bytes ``data`` (a partial tail is ignored)."""
    if page_size <= 0:
        raise RadixInputError(f"page_size must be positive, got {page_size}")
    ids = np.frombuffer(data, dtype="<i8")
    if ids.size and (int(ids.min()) < _I32_MIN or int(ids.max()) > _I32_MAX):
        raise RadixInputError("page hashes need token ids that fit in int32")
    return hash_narrow_pages(ids.astype("<i4").tobytes(), page_size, extra_key, parent_hash)


def hash_narrow_pages(
    narrow: bytes,
    page_size: int,
    extra_key: str | None = None,
    parent_hash: str | None = None,
) -> list[str]:
    """:func:`hash_pages` of token ids already narrowed to int32-LE bytes (as tree nodes keep
    them when they fit)."""
    step = page_size * 4
    n = len(narrow) // step * step
    out: list[str] = []
    sha = hashlib.sha256
    if parent_hash is not None:
        prev = bytes.fromhex(parent_hash)
    else:
        prev = b"" if extra_key is None else namespace_digest(extra_key)
    for off in range(0, n, step):
        digest = sha(prev + narrow[off : off + step]).digest()
        out.append(digest.hex())
        prev = digest
    return out


def page_hashes(
    token_ids: TokenIds,
    page_size: int,
    extra_key: str | None = None,
    parent_hash: str | None = None,
) -> list[str]:
    """Chained SHA-256 hex digests, one per whole page of ``token_ids``.

    ``parent_hash`` continues a chain (the hash of the page before ``token_ids``); the extra key
    is folded in only where a chain starts, i.e. when ``parent_hash`` is None.
    """
    return hash_pages(tokens_to_bytes(token_ids), page_size, extra_key, parent_hash)
