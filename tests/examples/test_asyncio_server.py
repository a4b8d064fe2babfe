"""The plain-asyncio server example, driven over real loopback connections."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from .conftest import load_example

server = load_example("asyncio_server")


async def ask(port: int, requests: list[dict[str, object]]) -> list[dict[str, object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    for request in requests:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        answers.append(json.loads(await reader.readline()))
    writer.close()
    await writer.wait_closed()
    return answers


async def test_requests_share_prefixes_per_tenant_and_survive_a_restart(tmp_path: Path) -> None:
    system = list(range(1, 200))
    first = {"tokens": [*system, 300, 301, 302], "tenant": "a"}
    second = {"tokens": [*system, 400, 401], "tenant": "a"}
    other = {"tokens": [*system, 400, 401], "tenant": "b"}

    async def run(requests: list[dict[str, object]]) -> list[dict[str, object]]:
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(server.serve(0, tmp_path, ready))
        try:
            port = await ready
            # Three clients at once: the handlers interleave on the loop.
            results = await asyncio.gather(*(ask(port, [r]) for r in requests))
            return [answer for result in results for answer in result]
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    (a1,) = await run([first])
    assert a1["cached"] == 0
    a2, b = await run([second, other])  # a fresh server: tenant a's prefix comes from L3
    assert a2["cached"] == 192  # whole pages of the shared system prompt
    assert b["cached"] == 0  # tenant b shares nothing with tenant a
    assert a2["next_token"] == b["next_token"]  # same tokens, same model: same answer
