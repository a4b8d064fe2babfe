"""An alternative measured for issue 20 (not a backend): KV pages as values of an LMDB store.

A plug-in for the peers' harness, beside ``raw`` and the ``file`` backend::

    PYTHONPATH=.:backends:benchmarks:$LMDB python ../shared/peers/bench_file_backend.py \\
        --backends raw,plugin:peers_file_adapter:make,plugin:bench_file_lmdb:make

(``LMDB``: a directory where ``pip install --target`` put the ``lmdb`` package; the project
does not depend on it). Like the ``file`` backend it checks every page: each payload and its
codec trailer are two values, written with ``put`` (one copy into the map, with
``writemap``) in one transaction per batch, and read as a buffer into the map copied into the
destination, then checked (xxh3). ``sync=False``: like ``fsync="none"``.
"""

from __future__ import annotations

import os
from typing import Any

import lmdb  # type: ignore[import-not-found]
import torch

from hicache_async.storage.codec import TRAILER_SIZE, PageCodec, key_digest


class LmdbPages:
    """Pages in one LMDB environment under the harness's directory."""

    def __init__(self, ctx: Any) -> None:
        self.batch = max(1, int(getattr(ctx, "batch", 0) or 32))
        size = 2 * ctx.pages * (ctx.page_bytes + TRAILER_SIZE) + (64 << 20)
        self.env = lmdb.open(
            os.path.join(ctx.dir, "lmdb"),
            map_size=size,
            writemap=True,
            sync=False,
            metasync=False,
            max_dbs=0,
            readahead=True,
        )
        self.codec = PageCodec("")

    def write(self, keys: list[str], pages: list[torch.Tensor]) -> None:
        for lo in range(0, len(keys), self.batch):
            with self.env.begin(write=True) as txn:
                for key, page in zip(
                    keys[lo : lo + self.batch], pages[lo : lo + self.batch], strict=True
                ):
                    digest = key_digest(key)
                    payload = page.reshape(-1).view(torch.uint8).numpy().data
                    # put() takes one buffer: the trailer goes under a key of its own,
                    # so the payload is copied once, straight into the map.
                    txn.put(digest, payload)
                    txn.put(digest + b"t", self.codec.trailer(digest, [payload]))

    def flush(self) -> None:
        pass

    def read(self, keys: list[str], outs: list[torch.Tensor]) -> None:
        for lo in range(0, len(keys), self.batch):
            with self.env.begin(buffers=True) as txn:
                for key, out in zip(
                    keys[lo : lo + self.batch], outs[lo : lo + self.batch], strict=True
                ):
                    digest = key_digest(key)
                    value, trailer = txn.get(digest), txn.get(digest + b"t")
                    if value is None or trailer is None:
                        raise RuntimeError(f"lmdb: {key} missing")
                    dst = out.reshape(-1).view(torch.uint8).numpy().data
                    dst[:] = value  # the one copy, out of the map
                    self.codec.verify(trailer, digest, [dst], len(dst))

    def close(self) -> None:
        self.env.close()


def make(ctx: Any) -> LmdbPages:
    """The harness's factory."""
    return LmdbPages(ctx)
