"""Mooncake-format request traces, and the token ids and KV bytes a replay derives from them.

A trace line is ``{"timestamp": ms, "input_length": tokens, "output_length": tokens,
"hash_ids": [int, ...]}``; each hash id names one block of the prompt, hashed with every block
before it. A replay maps each hash id to one page: its tokens and its KV bytes are pure
functions of the hash id, so two requests that share a block share a page, and every hit can
be checked byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hicache_async.errors import ConfigError
from hicache_async.layout import KVLayout

__all__ = ["TraceRequest", "load_mooncake_trace", "page_kv", "request_tokens"]


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace."""

    timestamp: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def _parse(path: Path) -> Iterator[TraceRequest]:
    with path.open("rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                raw = json.loads(line)
                request = TraceRequest(
                    timestamp=int(raw["timestamp"]),
                    input_length=int(raw["input_length"]),
                    output_length=int(raw.get("output_length", 0)),
                    hash_ids=tuple(int(h) for h in raw["hash_ids"]),
                )
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: not JSON ({exc.msg})") from exc
            except KeyError as exc:
                raise ConfigError(f"{where}: a Mooncake trace line needs {exc.args[0]!r}") from exc
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{where}: {exc}") from exc
            if request.input_length < 0 or any(h < 0 for h in request.hash_ids):
                raise ConfigError(f"{where}: lengths and hash ids must not be negative")
            yield request


def load_mooncake_trace(path: str | Path, *, limit: int | None = None) -> list[TraceRequest]:
    """The requests of a Mooncake-format trace, in timestamp order (ties keep file order).

    ``limit`` keeps the first ``limit`` lines of the file. Malformed lines are a
    :class:`ConfigError` naming the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"trace {path} does not exist")
    requests: list[TraceRequest] = []
    for request in _parse(path):
        if limit is not None and len(requests) >= limit:
            break
        requests.append(request)
    requests.sort(key=lambda r: r.timestamp)  # stable
    return requests


def request_tokens(hash_ids: tuple[int, ...], page_tokens: int) -> torch.Tensor:
    """The prompt a replay sends for ``hash_ids``: ``page_tokens`` ids per block, unique to it."""
    ids = torch.tensor(hash_ids, dtype=torch.int64)
    offsets = torch.arange(page_tokens, dtype=torch.int64)
    return (ids[:, None] * page_tokens + offsets).reshape(-1)


def page_kv(hash_id: int, layout: KVLayout) -> torch.Tensor:
    """The KV bytes a replay writes for block ``hash_id``, ``[layers, planes, page_size, heads,
    head_dim]`` in the layout's dtype: a fixed scramble of the hash id and each byte's position,
    so any mix-up of pages, layers or tokens shows as a byte mismatch."""
    count = layout.bytes_per_page // 4
    words = torch.arange(count, dtype=torch.int64) * 2654435761 + (hash_id + 1) * 40503
    words = (words ^ (words >> 13)) & 0xFFFFFFFF
    raw = words.to(torch.int32) if count else torch.empty(0, dtype=torch.int32)
    tail = layout.bytes_per_page - 4 * count
    data = raw.view(torch.uint8)
    if tail:
        data = torch.cat([data, torch.full((tail,), hash_id & 0xFF, dtype=torch.uint8)])
    shape = (
        layout.num_layers,
        layout.kv_planes,
        layout.page_size,
        layout.num_kv_heads,
        layout.head_dim,
    )
    return data.view(layout.dtype).view(shape)
