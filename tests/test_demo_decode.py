"""The demo decodes: every generated token and its logits equal recomputation, the next turn's
prompt holds the answer and hits its pages; requests admitted by their worst case all end on
a small L1; and the page budget that admits them."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
import torch

from hicache_async.demo.budget import PageBudget, worst_case_pages
from hicache_async.demo.model import TinyCausalLM
from hicache_async.demo.run import DemoOptions, DemoReport, format_report, run_demo
from hicache_async.errors import CapacityError
from hicache_async.metrics import Tier


def greedy(model: TinyCausalLM, prompt: torch.Tensor, n: int) -> list[int]:
    """``n`` greedy tokens recomputed from scratch, one step at a time."""
    tokens, out = prompt, []
    for _ in range(n):
        out.append(int(model.forward_full(tokens)[-1].argmax()))
        tokens = torch.cat([tokens, torch.tensor(out[-1:])])
    return out


def demo(tmp_path: Path, **options: object) -> DemoReport:
    settings = DemoOptions(
        directory=tmp_path, conversations=4, turns=3, answer_tokens=(6, 20), **options
    )
    return anyio.run(run_demo, settings)


@pytest.mark.timeout(300)
def test_demo_decodes_exactly_and_later_turns_hit_the_answers(tmp_path: Path) -> None:
    report = demo(tmp_path, chunk_tokens=48)
    model = TinyCausalLM(seed=0)
    assert report.requests == len(report.turns) == 12
    assert report.verified == report.requests
    for turn in report.turns[:2]:  # step by step (slow), as a reference for the pass below
        assert turn.answer == greedy(model, turn.prompt, len(turn.answer))
    for turn in report.turns:
        want = model.forward_full(turn.fed)[turn.hit :]  # prefill after the hit, then decode
        assert turn.logits is not None
        assert torch.allclose(turn.logits, want, atol=1e-4, rtol=1e-4)
        # Every generated token is the argmax after the ones before it: greedy, by induction.
        assert want[turn.prompt.numel() - 1 - turn.hit :].argmax(-1).tolist() == turn.answer
    # Each next turn's prompt is the chat so far: the previous prompt, its answer, a message.
    by_prompt = {tuple(turn.prompt.tolist()): turn for turn in report.turns}
    followed = 0
    for turn in report.turns:
        if not turn.answers:
            continue
        start, end = turn.answers[-1]
        previous = by_prompt[tuple(turn.prompt[:start].tolist())]
        assert turn.prompt[start:end].tolist() == previous.answer
        followed += 1
    assert followed == 8
    assert report.output_tokens == sum(len(turn.answer) for turn in report.turns)
    assert 0 < report.answer_tokens_hit <= report.answer_tokens_in_prompts
    assert any(sum(turn.answer_hits.values()) > 0 for turn in report.turns)
    assert report.as_dict()["answer_tokens_hit"] == report.answer_tokens_hit
    table = format_report(report, tmp_path)
    assert "of answers" in table
    assert f"{report.answer_tokens_hit} of them hit" in table


@pytest.mark.timeout(300)
def test_a_second_run_hits_the_answers_in_l3(tmp_path: Path) -> None:
    first = demo(tmp_path)
    second = demo(tmp_path)  # same chats, same model: the same answers, now from L3
    answers = [sorted(tuple(t.answer) for t in run.turns) for run in (first, second)]
    assert answers[0] == answers[1]
    assert second.verified == second.requests
    assert second.answer_hits(Tier.STORAGE) > 0
    assert second.answer_tokens_hit == second.answer_tokens_in_prompts


@pytest.mark.timeout(300)
def test_a_small_l1_admits_requests_by_worst_case_and_all_end_exact(tmp_path: Path) -> None:
    # 48 pages for 8 concurrent chats whose requests hold up to ~33 pages: one or two at a time.
    report = demo(tmp_path, device_pages=48, host_pages=200, concurrency=8, chunk_tokens=32)
    assert report.requests == 12
    assert report.verified == report.requests
    assert report.admission_waits > 0  # requests queued for L1 pages instead of failing


async def test_the_budget_admits_first_come_first_served() -> None:
    budget = PageBudget(10)
    order: list[str] = []
    started = anyio.Event()

    async def request(name: str, pages: int, hold: anyio.Event) -> None:
        async with budget.reserve(pages):
            order.append(name)
            started.set()
            await hold.wait()

    holds = {name: anyio.Event() for name in "abc"}
    async with anyio.create_task_group() as tg:
        tg.start_soon(request, "a", 8, holds["a"])
        await started.wait()
        tg.start_soon(request, "b", 5, holds["b"])  # waits: 2 pages free
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(request, "c", 1, holds["c"])  # fits, but b came first
        await anyio.wait_all_tasks_blocked()
        assert order == ["a"]
        assert budget.waiting == 2
        holds["a"].set()
        await anyio.wait_all_tasks_blocked()
        assert order == ["a", "b", "c"]
        holds["b"].set()
        holds["c"].set()
    assert budget.free == budget.capacity
    assert budget.waited == 2


async def test_a_cancelled_waiter_leaves_the_queue_and_lets_the_next_in() -> None:
    budget = PageBudget(4)
    admitted: list[str] = []
    hold = anyio.Event()

    async def request(name: str, pages: int) -> None:
        async with budget.reserve(pages):
            admitted.append(name)
            await hold.wait()

    async with anyio.create_task_group() as tg:
        tg.start_soon(request, "a", 2)
        await anyio.wait_all_tasks_blocked()
        with anyio.CancelScope() as scope:  # b asks for 3 of the 2 left, then gives up
            async with anyio.create_task_group() as inner:
                inner.start_soon(request, "b", 3)
                await anyio.wait_all_tasks_blocked()
                tg.start_soon(request, "c", 2)  # fits, but waits behind b
                await anyio.wait_all_tasks_blocked()
                assert admitted == ["a"]
                scope.cancel()
        await anyio.wait_all_tasks_blocked()
        assert admitted == ["a", "c"]  # b's place went to c
        hold.set()
    assert budget.free == budget.capacity
    assert budget.waiting == 0


async def test_a_request_over_the_budget_is_refused() -> None:
    budget = PageBudget(4)
    with pytest.raises(CapacityError, match="never run"):
        async with budget.reserve(5):
            pass
    assert worst_case_pages(32, 16) == 3  # two pages, and one a limited hit may lock twice
    assert worst_case_pages(33, 16) == 4
