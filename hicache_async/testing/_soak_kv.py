"""The soak's KV oracle: the bytes every token position must hold, derived from the request.

The value written for token position ``i`` of a prompt is a function of a hash of
``(extra_key, tokens[:i + 1])`` only, never of what the cache holds; so any hit, from any tier,
can be checked against a recomputation. Tenants (``extra_key``) get different bytes for the
same tokens, so a read across tenants shows as wrong bytes too.

Decoded tokens come from the same hash (:func:`decode_tokens`): the "model" answers a prompt
with tokens that depend on the tenant and the prompt only, so the workload knows a request's
answer without waiting for it, and the next turn (prompt + answer + more) can hit the answer's
pages and check them.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

from hicache_async.layout import KVLayout
from hicache_async.memory.device_pool import DeviceKVPool

__all__ = ["decode_tokens", "expected_kv", "prefix_hashes", "write_kv", "wrong_bytes"]

_MASK = (1 << 64) - 1
_PRIME = 0x100000001B3  # FNV-1a's 64-bit prime
_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as a signed int64
_MIX = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9 as a signed int64
# Clearing bit 14 keeps a float16's exponent below all-ones: no inf or NaN, so every value
# survives any copy bit for bit (the checks compare bits, not values).
_FINITE_HALF = 0xBBFF
DECODE_VOCAB = 50_000  # decoded ids are in [1, DECODE_VOCAB), as the prompts'


def _seed(extra_key: str | None) -> int:
    seed = b"" if extra_key is None else extra_key.encode("utf-8", "surrogatepass")
    return (zlib.crc32(seed) << 1 | (extra_key is not None)) ^ 0xCBF29CE484222325


def _step(h: int, token: int) -> int:
    return ((h ^ (token & _MASK)) * _PRIME) & _MASK


def prefix_hashes(tokens: Sequence[int], extra_key: str | None) -> torch.Tensor:
    """One int64 per position: a chained hash of ``(extra_key, tokens[:i + 1])``."""
    h = _seed(extra_key)
    out = []
    for token in tokens:
        h = _step(h, token)
        out.append(h - (1 << 64) if h >> 63 else h)
    return torch.tensor(out, dtype=torch.int64)


def decode_tokens(tokens: Sequence[int], extra_key: str | None, n: int) -> list[int]:
    """The ``n`` tokens the soak's "model" generates after ``tokens``: ids in
    ``[1, DECODE_VOCAB)``, each a function of the tenant and the sequence before it."""
    h = _seed(extra_key)
    for token in tokens:
        h = _step(h, token)
    out = []
    for _ in range(n):
        token = 1 + (h >> 17) % (DECODE_VOCAB - 1)
        out.append(token)
        h = _step(h, token)
    return out


def expected_kv(layout: KVLayout, hashes: torch.Tensor) -> torch.Tensor:
    """The KV of positions with ``hashes``: ``(n, layers, 2, heads, head_dim)`` in the layout's
    dtype (16-bit dtypes: finite values from the hash bits; others: small integers)."""
    per_token = layout.num_layers * 2 * layout.num_kv_heads * layout.head_dim
    x = hashes[:, None] + torch.arange(per_token, dtype=torch.int64) * _GOLDEN  # wraps
    x = (x ^ (x >> 31)) * _MIX
    x = x ^ (x >> 29)
    shape = (hashes.numel(), layout.num_layers, 2, layout.num_kv_heads, layout.head_dim)
    dtype = layout.dtype
    if dtype.itemsize == 2:
        bits = (x & _FINITE_HALF).to(torch.int16)
        return bits.view(dtype).reshape(shape)
    return (x & 0x3FF).to(dtype).reshape(shape)


def write_kv(pool: DeviceKVPool, slots: torch.Tensor, kv: torch.Tensor) -> None:
    """Write ``kv`` (as :func:`expected_kv` gives it) at ``slots``, as a model would."""
    for layer in range(pool.layout.num_layers):
        k = kv[:, layer, 0].contiguous().to(pool.device)
        v = kv[:, layer, 1].contiguous().to(pool.device)
        pool.set_kv_buffer(layer, slots, k, v)


def wrong_bytes(pool: DeviceKVPool, slots: torch.Tensor, kv: torch.Tensor) -> int:
    """How many bytes at ``slots`` differ from ``kv`` (0: the hit is bit-exact)."""
    if not slots.numel():
        return 0
    wrong = 0
    index = slots.to(pool.device)
    for layer in range(pool.layout.num_layers):
        for plane, buffer in enumerate(pool.get_kv_buffer(layer)):
            got = buffer[index].cpu().contiguous().view(torch.uint8)
            want = kv[:, layer, plane].contiguous().view(torch.uint8)
            wrong += int((got != want).sum())
    return wrong
