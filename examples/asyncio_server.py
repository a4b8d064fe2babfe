"""A plain-asyncio prefill server: each request handler awaits its prefetch before it runs.

Protocol: one JSON object per line, ``{"tokens": [...], "tenant": "a"}``; the answer is one
JSON line ``{"cached": n, "computed": m, "next_token": t}``. Tenants never share cache entries
(``extra_key``). The model is the demo's small transformer; its attention reads the cache's L1
pool, so a request with a cached prefix only computes the rest.

    python examples/asyncio_server.py --port 8765        # then send JSON lines to it
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import torch

from hicache_async import HiCache, HiCacheConfig
from hicache_async.demo.model import TinyCausalLM


class PrefillServer:
    """Serves prefill requests through one cache on the running event loop."""

    def __init__(self, cache: HiCache, model: TinyCausalLM) -> None:
        self.cache = cache
        self.model = model
        self.model_lock = asyncio.Lock()  # one forward at a time, as on one GPU

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        tokens = torch.tensor(request["tokens"], dtype=torch.int64)
        async with self.cache.session(tokens, extra_key=request.get("tenant")) as s:
            await s.prefetch()  # L3 -> L2 happens while other requests compute
            hit = await s.load(limit=tokens.numel() - 1)  # the last token gives the logits
            new = await s.allocate(tokens.numel() - hit.length)
            async with self.model_lock:
                logits = self.model.forward_cached(
                    tokens[hit.length :], hit.device_indices, new, self.cache.device_pool
                )
            await s.commit(new)
        return {
            "cached": hit.length,
            "computed": tokens.numel() - hit.length,
            "next_token": int(logits[-1].argmax()),
        }

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                try:
                    answer = await self.handle(json.loads(line))
                except (ValueError, KeyError) as exc:  # a bad request, not a broken server
                    answer = {"error": str(exc)}
                writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()


def config(l3_dir: Path, model: TinyCausalLM) -> HiCacheConfig:
    return HiCacheConfig(
        layout=model.kv_layout(page_size=16),
        model_name="tiny-causal-lm",  # namespaces this model's pages in the shared L3 directory
        device="cpu",
        device_pages=256,
        host_pages=512,
        storage_backend="file",
        storage_backend_extra_config=json.dumps({"path": str(l3_dir)}),
        prefetch_policy="timeout",  # a request never waits longer than the linear deadline
        prefetch_threshold=16,  # short prompts: fetch from L3 from one page on
    )


async def serve(port: int, l3_dir: Path, ready: asyncio.Future[int] | None = None) -> None:
    """Run the server on 127.0.0.1:``port`` (0: any free port, reported through ``ready``)
    until cancelled."""
    model = TinyCausalLM()
    async with HiCache.open(config(l3_dir, model)) as cache:
        server = PrefillServer(cache, model)
        listener = await asyncio.start_server(server.connection, "127.0.0.1", port)
        async with listener:
            if ready is not None:
                ready.set_result(listener.sockets[0].getsockname()[1])
            await listener.serve_forever()


def main() -> None:  # pragma: no cover - manual use
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--l3-dir", type=Path, default=Path("/tmp/hicache-example-l3"))
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.l3_dir))


if __name__ == "__main__":
    main()
