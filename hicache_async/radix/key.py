"""Radix keys: token ids stored compactly, plus the namespace they live in.

A :class:`RadixKey` keeps its token ids as int64 little-endian bytes: the width every
framework already hands over (``array('q')``, int64 tensors and numpy arrays), so building a key is
one ``memcpy`` with no range check, or no copy at all with ``copy=False`` (a read-only view of the
caller's buffer). The tree compares keys with ``bytes.startswith`` and dict look-ups on the first
page's bytes, so matching is C-level ``memcmp`` with no per-token Python work. (Page hashes narrow
the ids to int32 lazily, off the hot path.)
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, TypeAlias

import numpy as np
import torch

from hicache_async.errors import HiCacheError

__all__ = [
    "TOKEN_BYTES",
    "TOKEN_ID_MAX",
    "RadixInputError",
    "RadixKey",
    "TokenIds",
    "check_token_ids",
    "tokens_to_bytes",
]

TOKEN_BYTES = 8  # one token id = int64, little-endian
_I64 = np.dtype("<i8")
_I64_MAX = 2**63 - 1
_U64 = np.dtype("<u8")
_MAX_OF = np.maximum.reduce
TOKEN_ID_MAX = 2**31 - 1  # page hashes (L3 keys, KV events) narrow ids to int32
_NATIVE_LE = sys.byteorder == "little"
_INT_DTYPES = frozenset(
    {
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint16,
        torch.uint32,
        torch.uint64,
    }
)

TokenIds: TypeAlias = (
    "Sequence[int] | array[Any] | np.ndarray[Any, Any] | torch.Tensor | bytes | memoryview"
)
KeyBytes: TypeAlias = "bytes | memoryview"  # int64-LE token bytes; a view is read-only, format B


class RadixInputError(HiCacheError, ValueError):
    """Bad input to the radix index: token ids or slot indices of the wrong dtype, shape, range
    or length. Also a :class:`ValueError`."""


def _from_numpy(a: np.ndarray[Any, Any]) -> bytes:
    if a.ndim != 1:
        raise RadixInputError(f"token ids must be 1-D, got shape {tuple(a.shape)}")
    if a.dtype == _I64:
        return a.tobytes()
    if a.dtype.kind not in "iu":
        raise RadixInputError(f"token ids must be integers, got dtype {a.dtype}")
    if a.dtype == np.uint64 and a.size and int(a.max()) > _I64_MAX:
        raise RadixInputError(f"token ids must fit in int64, got {int(a.max())}")
    return a.astype(_I64).tobytes()


def _view(token_ids: TokenIds) -> memoryview | None:
    """A read-only byte view of ``token_ids`` when they already are int64-LE in one contiguous
    buffer (no copy), else ``None``."""
    view: memoryview
    if isinstance(token_ids, array):
        if token_ids.typecode != "q" or not _NATIVE_LE:
            return None
        view = memoryview(token_ids)
    elif isinstance(token_ids, bytes):
        view = memoryview(token_ids)
    elif isinstance(token_ids, memoryview):
        if token_ids.format != "B":
            raise RadixInputError(
                f"a memoryview of token ids must be int64-LE bytes (format 'B'), "
                f"got format {token_ids.format!r}"
            )
        view = token_ids
    elif isinstance(token_ids, np.ndarray):
        if token_ids.dtype != _I64 or token_ids.ndim != 1:
            return None
        view = token_ids.data
    else:
        return None
    if not view.c_contiguous:
        return None
    view = view.cast("B").toreadonly()
    if len(view) % TOKEN_BYTES:
        raise RadixInputError(
            f"token bytes must be a multiple of {TOKEN_BYTES} long, got {len(view)}"
        )
    return view


def tokens_to_bytes(token_ids: TokenIds) -> bytes:
    """Token ids (list, ``array``, numpy array, tensor, or int64-LE bytes) -> int64-LE bytes."""
    if isinstance(token_ids, memoryview):
        view = _view(token_ids)
        if view is None:
            raise RadixInputError("a memoryview of token bytes must be C-contiguous")
        return view.tobytes()
    if isinstance(token_ids, bytes):
        if len(token_ids) % TOKEN_BYTES:
            raise RadixInputError(
                f"token bytes must be a multiple of {TOKEN_BYTES} long, got {len(token_ids)}"
            )
        return token_ids
    if isinstance(token_ids, array):
        if token_ids.typecode == "q" and _NATIVE_LE:
            return token_ids.tobytes()  # the common case: one memcpy
        if token_ids.typecode in "fd":
            raise RadixInputError(
                f"token ids must be integers, got array typecode {token_ids.typecode!r}"
            )
        return _from_numpy(np.frombuffer(token_ids, dtype=np.dtype(token_ids.typecode)))
    if isinstance(token_ids, np.ndarray):
        return _from_numpy(token_ids)
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dtype not in _INT_DTYPES:
            raise RadixInputError(
                f"token ids must be an integer tensor, got dtype {token_ids.dtype}"
            )
        if token_ids.is_cpu:  # every request's key: two torch calls fewer than detach().cpu()
            return _from_numpy(token_ids.numpy(force=token_ids.requires_grad))
        if token_ids.is_meta:
            raise RadixInputError("token ids on the meta device hold no values")
        return _from_numpy(token_ids.detach().cpu().numpy())
    if isinstance(token_ids, (AbstractSet, Mapping)):
        raise RadixInputError(
            f"token ids must be in order (a list, tuple or tensor), not a "
            f"{type(token_ids).__name__}"
        )
    try:
        # A bool in a list is taken as 0 or 1, as Python's ints do: checking each element's
        # type would double the cost of converting a list prompt (SGLang's fill_ids).
        ids = array("q", token_ids)
    except (TypeError, OverflowError) as exc:
        raise RadixInputError(f"token ids must be int64 integers: {exc}") from exc
    return ids.tobytes() if _NATIVE_LE else _from_numpy(np.frombuffer(ids, dtype=np.int64))


def check_token_ids(data: KeyBytes) -> None:
    """Refuse int64-LE token bytes holding an id outside ``[0, 2**31)``: no vocabulary has
    such ids, and page hashes (L3 keys, KV events) narrow ids to int32, so one would fail
    later, inside a background task, instead of at the request that carries it."""
    ids = np.frombuffer(data, dtype=_U64)
    # One pass: viewed unsigned, a negative id is above every valid one. (The ufunc's reduce
    # called directly, and its scalar compared as is: a third of this check on the hit path.)
    if ids.size and _MAX_OF(ids) > TOKEN_ID_MAX:
        signed = np.frombuffer(data, dtype=_I64)
        where = np.flatnonzero((signed < 0) | (signed > TOKEN_ID_MAX))
        raise RadixInputError(
            f"token ids must be in [0, 2**31); got {int(signed[where[0]])} at position "
            f"{int(where[0])} ({where.size} such ids)"
        )


_SHORT = 8  # a decode step's tokens: checked in Python, below numpy's per-call cost


def checked_token_bytes(token_ids: TokenIds) -> bytes:
    """:func:`tokens_to_bytes` then :func:`check_token_ids`. A short list of ints (one
    decode step's tokens) is checked in Python: numpy's fixed cost per call was half of
    ``extend()``."""
    if type(token_ids) is list and len(token_ids) == 1:  # one decode step's token
        token = token_ids[0]
        if type(token) is int and 0 <= token <= TOKEN_ID_MAX:
            return token.to_bytes(TOKEN_BYTES, "little")
    if (
        _NATIVE_LE
        and type(token_ids) is list
        and len(token_ids) <= _SHORT
        and all(type(t) is int and 0 <= t <= TOKEN_ID_MAX for t in token_ids)
    ):
        return array("q", token_ids).tobytes()
    data = tokens_to_bytes(token_ids)
    check_token_ids(data)
    return data


def _check_extra_key(extra_key: object) -> None:
    if not isinstance(extra_key, str):
        raise RadixInputError(f"extra_key must be a str or None, got {type(extra_key).__name__}")
    try:
        extra_key.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate: no hash, no L3 key can hold it
        raise RadixInputError(
            f"extra_key must be encodable as UTF-8 (it names the namespace's L3 keys): {exc}"
        ) from None


class RadixKey:
    """Token ids plus an optional namespace (``extra_key``: tenant, LoRA id, cache salt, ...).

    Keys with different ``extra_key`` values never share a node of the tree.

    ``copy=False`` views int64-LE input (``array('q')``, a C-contiguous int64 numpy array,
    ``bytes``, ``memoryview``) instead of copying it: no per-call copy of a long prompt (other
    inputs are converted as usual). The caller must not change those token ids while the key is
    in use; while it lives, an ``array`` cannot be resized (Python refuses while a view exists).
    The tree copies what it stores.
    """

    __slots__ = ("data", "extra_key")

    data: KeyBytes  # int64 little-endian token ids
    extra_key: str | None

    def __init__(
        self, token_ids: TokenIds, extra_key: str | None = None, *, copy: bool = True
    ) -> None:
        if extra_key is not None:
            _check_extra_key(extra_key)
        view = None if copy else _view(token_ids)
        self.data = tokens_to_bytes(token_ids) if view is None else view
        self.extra_key = extra_key

    def prefix(self, n_tokens: int) -> RadixKey:
        """The key of the first ``n_tokens`` tokens, viewing this key's bytes (no copy)."""
        if not 0 <= n_tokens <= len(self):
            raise RadixInputError(f"prefix of {n_tokens} tokens of a {len(self)}-token key")
        key = RadixKey.__new__(RadixKey)
        key.data = memoryview(self.data)[: n_tokens * TOKEN_BYTES]
        key.extra_key = self.extra_key
        return key

    def __len__(self) -> int:
        return len(self.data) // TOKEN_BYTES

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RadixKey):
            return NotImplemented
        return self.data == other.data and self.extra_key == other.extra_key

    def __hash__(self) -> int:
        data = self.data
        return hash((data if isinstance(data, bytes) else bytes(data), self.extra_key))

    def token_ids(self) -> list[int]:
        """The token ids as Python ints (for display and KV events; not for hot paths)."""
        return np.frombuffer(self.data, dtype=_I64).tolist()  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        ids = self.token_ids()
        more = "..." if len(ids) > 8 else ""
        return f"RadixKey({ids[:8]}{more}, len={len(ids)}, extra_key={self.extra_key!r})"
