"""A plain-asyncio generation server: each request handler prefills its prompt in chunks and
streams a greedy answer token by token, awaiting its prefetch and L1 room on the way.

Protocol: one JSON object per line, ``{"tokens": [...], "tenant": "a", "max_new_tokens": 8}``;
the answer streams back as one JSON line per generated token, ``{"token": t}``, then
``{"done": true, "cached": n, "computed": m, "tokens": [...]}`` (or ``{"error": "..."}``,
which ends the answer). Tenants never share cache entries (``extra_key``). The model is the
demo's small transformer; its attention reads the cache's L1 pool, so a request with a cached
prefix only computes the rest, and a follow-up turn that repeats an answer hits it too.

A request is admitted once the L1 pages it may hold at most are free in a budget
(``hicache_async.demo.budget``): many concurrent requests on a small L1 then queue for
admission, and each one's ``await s.allocate(..., timeout=...)`` waits only for evictions and
backups in flight, never for requests that wait for it.

    python examples/asyncio_server.py --port 8765        # then send JSON lines to it
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncGenerator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import torch

from hicache_async import HiCache, HiCacheConfig, HiCacheError, Session
from hicache_async.demo.budget import PageBudget, worst_case_pages
from hicache_async.demo.model import TinyCausalLM


class GenerationServer:
    """Serves generation requests through one cache on the running event loop."""

    def __init__(
        self,
        cache: HiCache,
        model: TinyCausalLM,
        *,
        l1_pages: int,
        chunk_tokens: int = 64,
        max_new_tokens: int = 64,
        room_timeout: float = 30.0,
    ) -> None:
        self.cache = cache
        self.model = model
        self.budget = PageBudget(l1_pages)  # admission by each request's worst case
        self.chunk_tokens = chunk_tokens
        self.max_new_tokens = max_new_tokens
        self.room_timeout = room_timeout  # then a CapacityError saying where L1's pages are

    def _parse(self, request: dict[str, Any]) -> tuple[torch.Tensor, str | None, int]:
        tokens = torch.tensor(request["tokens"], dtype=torch.int64)
        if tokens.dim() != 1 or not tokens.numel():
            raise ValueError("tokens must be a non-empty list of token ids")
        n_new = request.get("max_new_tokens", 8)
        if isinstance(n_new, bool) or not isinstance(n_new, int):
            raise ValueError(f"max_new_tokens must be an int, not {n_new!r}")
        if not 1 <= n_new <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens must be in 1..{self.max_new_tokens}, not {n_new}")
        return tokens, request.get("tenant"), n_new

    async def generate(self, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any]]:
        """The answer's lines: one per generated token as its decode step ends, then a
        summary. Close it (``aclosing``) if you stop early: the session then aborts."""
        tokens, tenant, n_new = self._parse(request)
        # The last generated token is never fed: the request holds prompt + n_new - 1 tokens.
        pages = worst_case_pages(tokens.numel() + n_new - 1, self.cache.page_size)
        answer: list[int] = []
        # The budget waits, holding nothing, while L1 is taken by requests admitted before.
        async with (
            self.budget.reserve(pages),
            self.cache.session(tokens, extra_key=tenant) as s,
        ):
            await s.prefetch()  # L3 -> L2 happens while other requests compute
            hit = await s.load(limit=tokens.numel() - 1)  # the last token gives the logits
            done = hit.length
            while done < tokens.numel():  # chunked prefill: a commit per chunk
                chunk = tokens[done : done + self.chunk_tokens]
                logits = await self._step(s, chunk)
                done += chunk.numel()
            while True:  # greedy decode
                answer.append(int(logits[-1].argmax()))
                yield {"token": answer[-1]}
                if len(answer) == n_new:
                    break
                fed = torch.tensor(answer[-1:])
                s.extend(fed)  # the request's key grows by its output
                logits = await self._step(s, fed)
        # Leaving the session is finish: prompt and fed output stay cached, whole pages.
        yield {
            "done": True,
            "cached": hit.length,
            "computed": tokens.numel() - hit.length,
            "tokens": answer,
        }

    async def _step(self, s: Session, tokens: torch.Tensor) -> torch.Tensor:
        """One forward of ``tokens`` after everything the request has so far; their logits."""
        slots = await s.allocate(tokens.numel(), timeout=self.room_timeout)  # waits for room
        logits = self.model.forward_cached(tokens, s.device_indices, slots, self.cache.device_pool)
        await s.commit(slots)  # whole pages into the tree: concurrent requests hit them now
        await asyncio.sleep(0)  # other requests' steps run between ours
        return logits

    async def answer(self, line: bytes) -> AsyncGenerator[dict[str, Any]]:
        """:meth:`generate` for one request line; a refused request ends with an error."""
        try:
            async with aclosing(self.generate(json.loads(line))) as events:
                async for event in events:
                    yield event
        except (ValueError, KeyError, TypeError, HiCacheError) as exc:  # not a broken server
            yield {"error": f"{type(exc).__name__}: {exc}"}

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                async with aclosing(self.answer(line)) as events:
                    async for event in events:  # streamed: a line per token as it is made
                        writer.write(json.dumps(event).encode() + b"\n")
                        await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()


def config(l3_dir: Path, model: TinyCausalLM, device_pages: int = 256) -> HiCacheConfig:
    return HiCacheConfig(
        layout=model.kv_layout(page_size=16),
        model_name="tiny-causal-lm",  # namespaces this model's pages in the shared L3 directory
        device="cpu",
        device_pages=device_pages,
        host_pages=512,
        storage_backend="file",
        storage_backend_extra_config=json.dumps({"path": str(l3_dir)}),
        prefetch_policy="timeout",  # a request never waits longer than the linear deadline
        prefetch_threshold=16,  # short prompts: fetch from L3 from one page on
    )


async def serve(
    port: int,
    l3_dir: Path,
    ready: asyncio.Future[int] | None = None,
    *,
    device_pages: int = 256,
    **server_options: Any,
) -> None:
    """Run the server on 127.0.0.1:``port`` (0: any free port, reported through ``ready``)
    until cancelled."""
    model = TinyCausalLM()
    async with HiCache.open(config(l3_dir, model, device_pages)) as cache:
        server = GenerationServer(cache, model, l1_pages=device_pages, **server_options)
        listener = await asyncio.start_server(server.connection, "127.0.0.1", port)
        async with listener:
            if ready is not None:
                ready.set_result(listener.sockets[0].getsockname()[1])
            await listener.serve_forever()


def main() -> None:  # pragma: no cover - manual use
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--l3-dir", type=Path, default=Path("/tmp/hicache-example-l3"))
    parser.add_argument("--device-pages", type=int, default=256)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.l3_dir, device_pages=args.device_pages))


if __name__ == "__main__":
    main()
