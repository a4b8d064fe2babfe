"""Radix keys: token ids stored compactly, plus the namespace they live in.

A :class:`RadixKey` keeps its token ids as int32 little-endian ``bytes``. The tree compares keys
with ``bytes.startswith`` and dict look-ups on the first page's bytes, so matching runs as C-level
``memcmp`` with no per-token Python work, and the same bytes feed the SHA-256 page hashes.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Any, TypeAlias

import numpy as np
import torch

from hicache_async.errors import HiCacheError

__all__ = ["TOKEN_BYTES", "RadixInputError", "RadixKey", "TokenIds", "tokens_to_bytes"]

TOKEN_BYTES = 4  # one token id = int32, little-endian
_I32 = np.dtype("<i4")
_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1

TokenIds: TypeAlias = "Sequence[int] | array[Any] | np.ndarray[Any, Any] | torch.Tensor | bytes"


class RadixInputError(HiCacheError, ValueError):
    """Bad input to the radix index: token ids or slot indices of the wrong dtype, shape, range
    or length. Also a :class:`ValueError`."""


def _from_numpy(a: np.ndarray[Any, Any]) -> bytes:
    if a.ndim != 1:
        raise RadixInputError(f"token ids must be 1-D, got shape {tuple(a.shape)}")
    if a.dtype == _I32:
        return a.tobytes()
    if a.dtype.kind not in "iu":
        raise RadixInputError(f"token ids must be integers, got dtype {a.dtype}")
    if a.size and a.dtype.itemsize >= 4:
        lo, hi = int(a.min()), int(a.max())
        if lo < _I32_MIN or hi > _I32_MAX:
            raise RadixInputError(f"token ids must fit in int32, got range [{lo}, {hi}]")
    return a.astype(_I32).tobytes()


def tokens_to_bytes(token_ids: TokenIds) -> bytes:
    """Token ids (list, ``array``, numpy array, tensor, or int32-LE bytes) -> int32-LE bytes."""
    if isinstance(token_ids, bytes):
        if len(token_ids) % TOKEN_BYTES:
            raise RadixInputError(f"token bytes must be a multiple of 4 long, got {len(token_ids)}")
        return token_ids
    if isinstance(token_ids, np.ndarray):
        return _from_numpy(token_ids)
    if isinstance(token_ids, torch.Tensor):
        if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
            raise RadixInputError(
                f"token ids must be an integer tensor, got dtype {token_ids.dtype}"
            )
        return _from_numpy(token_ids.detach().cpu().numpy())
    if isinstance(token_ids, array):
        if token_ids.typecode in "fd":
            raise RadixInputError(
                f"token ids must be integers, got array typecode {token_ids.typecode!r}"
            )
        return _from_numpy(np.frombuffer(token_ids, dtype=np.dtype(token_ids.typecode)))
    try:
        return array("i", token_ids).tobytes()  # 'i' is 4 bytes on every platform torch runs on
    except (TypeError, OverflowError) as exc:
        raise RadixInputError(f"token ids must be int32 integers: {exc}") from exc


class RadixKey:
    """Token ids plus an optional namespace (``extra_key``: tenant, LoRA id, cache salt, ...).

    Keys with different ``extra_key`` values never share a node of the tree.
    """

    __slots__ = ("data", "extra_key")

    data: bytes  # int32 little-endian token ids
    extra_key: str | None

    def __init__(self, token_ids: TokenIds, extra_key: str | None = None) -> None:
        if extra_key is not None and not isinstance(extra_key, str):
            raise RadixInputError(
                f"extra_key must be a str or None, got {type(extra_key).__name__}"
            )
        self.data = tokens_to_bytes(token_ids)
        self.extra_key = extra_key

    def __len__(self) -> int:
        return len(self.data) // TOKEN_BYTES

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RadixKey):
            return NotImplemented
        return self.data == other.data and self.extra_key == other.extra_key

    def __hash__(self) -> int:
        return hash((self.data, self.extra_key))

    def token_ids(self) -> list[int]:
        """The token ids as Python ints (for display and KV events; not for hot paths)."""
        return np.frombuffer(self.data, dtype=_I32).tolist()  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        ids = self.token_ids()
        more = "..." if len(ids) > 8 else ""
        return f"RadixKey({ids[:8]}{more}, len={len(ids)}, extra_key={self.extra_key!r})"
