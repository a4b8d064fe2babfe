"""The plain-asyncio server example, driven over real loopback connections: streamed greedy
answers equal to recomputation, prefixes (answers included) shared per tenant and across a
restart, and many concurrent requests on a small L1 that all wait their turn and end."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch

from hicache_async import HiCache
from hicache_async.demo.model import TinyCausalLM

from .conftest import load_example

server = load_example("asyncio_server")

Answer = dict[str, Any]  # the final line, plus "streamed": the token lines before it


async def ask(port: int, requests: list[dict[str, object]]) -> list[Answer]:
    """Send the requests one after another on one connection; read each streamed answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answers = []
    for request in requests:
        writer.write(json.dumps(request).encode() + b"\n")
        await writer.drain()
        streamed: list[int] = []
        while True:
            line = json.loads(await reader.readline())
            if "token" not in line:
                break
            streamed.append(line["token"])
        answers.append({**line, "streamed": streamed})
    writer.close()
    await writer.wait_closed()
    return answers


@asynccontextmanager
async def running(
    l3_dir: Path, device_pages: int = 256, **options: Any
) -> AsyncIterator[tuple[int, Any]]:
    """What ``serve()`` runs, on a free port: the port and the GenerationServer."""
    model = TinyCausalLM()
    async with HiCache.open(server.config(l3_dir, model, device_pages)) as cache:
        app = server.GenerationServer(cache, model, l1_pages=device_pages, **options)
        listener = await asyncio.start_server(app.connection, "127.0.0.1", 0)
        async with listener:
            yield listener.sockets[0].getsockname()[1], app


def greedy(model: TinyCausalLM, prompt: list[int], n: int) -> list[int]:
    """The reference: ``n`` greedy tokens recomputed from scratch, one step at a time."""
    tokens, out = torch.tensor(prompt), []
    for _ in range(n):
        out.append(int(model.forward_full(tokens)[-1].argmax()))
        tokens = torch.cat([tokens, torch.tensor(out[-1:])])
    return out


def is_greedy(model: TinyCausalLM, prompt: list[int], answer: list[int]) -> bool:
    """``answer`` is the greedy continuation: one teacher-forced pass predicts every token of
    it from the ones before (equivalent to :func:`greedy`, by induction over the steps)."""
    full = model.forward_full(torch.tensor([*prompt, *answer[:-1]]))
    return bool(full[len(prompt) - 1 :].argmax(-1).tolist() == answer)


async def test_streams_a_greedy_answer_and_the_next_turn_hits_it(tmp_path: Path) -> None:
    model = TinyCausalLM()
    prompt = list(range(1, 41))
    async with running(tmp_path, chunk_tokens=16) as (port, _):
        (first,) = await ask(port, [{"tokens": prompt, "max_new_tokens": 12}])
        assert first["done"] is True
        assert first["streamed"] == first["tokens"] == greedy(model, prompt, 12)
        assert first["cached"] == 0
        assert first["computed"] == len(prompt)
        follow = [*prompt, *first["tokens"], 7, 8, 9]  # the next turn repeats the answer
        (second,) = await ask(port, [{"tokens": follow, "max_new_tokens": 3}])
    fed = len(prompt) + 12 - 1  # the last generated token was never fed
    assert second["cached"] == fed // 16 * 16 > len(prompt) // 16 * 16  # answer pages hit
    assert second["tokens"] == greedy(model, follow, 3)


async def test_requests_share_prefixes_per_tenant_and_survive_a_restart(tmp_path: Path) -> None:
    system = list(range(1, 200))
    first = {"tokens": [*system, 300, 301, 302], "tenant": "a", "max_new_tokens": 2}
    second = {"tokens": [*system, 400, 401], "tenant": "a", "max_new_tokens": 4}
    other = {"tokens": [*system, 400, 401], "tenant": "b", "max_new_tokens": 4}

    async def run(requests: list[dict[str, object]]) -> list[Answer]:
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(server.serve(0, tmp_path, ready))
        try:
            port = await ready
            # Clients at once: the handlers interleave on the loop.
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
    assert a2["tokens"] == b["tokens"]  # same tokens, same model: same answer


async def test_many_requests_on_a_small_l1_wait_for_room_and_all_end_exact(
    tmp_path: Path,
) -> None:
    model = TinyCausalLM()
    gen = torch.Generator().manual_seed(0)
    system = torch.randint(0, 512, (64,), generator=gen).tolist()
    requests = [
        {
            "tokens": [*system, *torch.randint(0, 512, (40 + 3 * i,), generator=gen).tolist()],
            "tenant": "t",
            "max_new_tokens": 20,
        }
        for i in range(20)
    ]
    # 24 pages (384 tokens) for 20 concurrent requests of up to 11 pages each: a few at a time.
    async with running(tmp_path, device_pages=24, chunk_tokens=32) as (port, app):
        clients: list[Callable[[], Coroutine[Any, Any, list[Answer]]]] = [
            lambda r=r: ask(port, [r]) for r in requests
        ]
        results = await asyncio.gather(*(client() for client in clients))
        assert app.budget.waited > 0  # requests queued for room instead of failing
        assert app.budget.free == app.budget.capacity
    answers = [answer for result in results for answer in result]
    assert all("error" not in answer for answer in answers), answers
    for request, answer in zip(requests, answers, strict=True):
        assert answer["done"] is True
        assert answer["streamed"] == answer["tokens"]
        assert is_greedy(model, request["tokens"], answer["tokens"])  # type: ignore[arg-type]
    assert sum(answer["cached"] for answer in answers) > 0  # the system prompt was shared


async def test_bad_requests_get_an_error_line_and_the_connection_goes_on(tmp_path: Path) -> None:
    async with running(tmp_path, device_pages=8) as (port, _):
        bad, too_long, good = await ask(
            port,
            [
                {"tokens": [1, 2, 3], "max_new_tokens": 0},
                {"tokens": list(range(200)), "max_new_tokens": 1},  # 13 pages > 8
                {"tokens": [1, 2, 3], "max_new_tokens": 2},
            ],
        )
    assert "max_new_tokens" in bad["error"]
    assert "CapacityError" in too_long["error"]
    assert good["done"] is True
    assert len(good["tokens"]) == 2
