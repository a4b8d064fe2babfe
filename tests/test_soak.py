"""The chaos soak in CI: a bounded run per seed and event loop, and proof that it can fail.

The soak's run length is a duration, not an assertion: the tests count events (hangs named
by the watchdog, wrong bytes, leaked pages, cache deaths), never wall-clock bounds.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from hicache_async.cache import HiCache
from hicache_async.cli import main
from hicache_async.events import BlockRemoved, BlockStored, EventBatch, StorageMedium
from hicache_async.layout import KVLayout
from hicache_async.session import Session
from hicache_async.testing._soak_kv import expected_kv, prefix_hashes
from hicache_async.testing._soak_ledger import Ledger
from hicache_async.testing._soak_workload import Prompts, RequestPlan, Workload
from hicache_async.testing.soak import BAD_KINDS, FAULT_KINDS, SoakOptions, run_soak, soak

# Fault kinds the soak finds still broken (each has an xfail reproduction in
# test_soak_findings.py); left out of the CI runs until their fixes land, then put back.
KNOWN_BROKEN_FAULTS: dict[str, str] = {}
KNOWN_BROKEN_BAD: dict[str, str] = {}
# Checks the soak makes that still fail without any fault (reported, not asserted here).
KNOWN_BROKEN_CHECKS: dict[str, str] = {}
CI_FAULTS = frozenset(FAULT_KINDS) - set(KNOWN_BROKEN_FAULTS)
CI_BAD = frozenset(BAD_KINDS) - set(KNOWN_BROKEN_BAD)
CI_SECONDS = 13.0
# The lifecycle steps every CI run must have driven (counts of events, never times): chunked
# prefill, decode, hits on decoded tokens, waits for room (served and timed out), and the
# scheduler-level API (finished, aborted, waiting a step, retracted).
CI_LIFECYCLE = (
    "chunked_prefills",
    "decode_steps",
    "duplicate_tokens",
    "output_hit_tokens",
    "tables_checked",
    "allocate_waits_served",
    "allocate_wait_timeouts",
    "scheduler_finished",
    "scheduler_aborted",
    "scheduler_waits",
    "scheduler_retracted",
)


def assert_clean(report: dict[str, Any]) -> None:
    assert report["hangs"] == 0, report["hang_details"]
    assert report["wrong_bytes"] == 0, (report["wrong_hits"], report["wrong_tables"])
    assert report["wrong_tables"] == 0, report["errors"]
    assert report["leaked_pages"] == 0, report["invariant_failures"]
    assert report["cache_deaths"] == 0, report["errors"]
    assert report["accepted_bad_requests"] == 0, report["bad_requests"]
    assert report["unexpected_errors"] == {}, report["errors"]
    failures = [f for f in report["invariant_failures"] if f["check"] not in KNOWN_BROKEN_CHECKS]
    assert failures == []
    assert report["resources"]["bounded"], report["resources"]


@pytest.mark.parametrize(
    ("backend", "seed"), [("asyncio", 1), ("trio", 1), ("asyncio", 2), ("trio", 2)]
)
def test_soak(backend: str, seed: int, tmp_path: Path) -> None:
    options = SoakOptions(
        seconds=CI_SECONDS, seed=seed, l3_path=tmp_path, faults=CI_FAULTS, bad_kinds=CI_BAD
    )
    report = soak(options, backend=backend)
    assert_clean(report)
    # It did what it says: every request ended, hits were checked, faults were injected,
    # bad requests were refused, and more than one policy pair ran.
    assert report["requests"] > 0
    assert report["ended"] == report["requests"]
    assert report["hits_checked"] > 0
    assert report["served"] > 0
    assert report["cancelled"] > 0
    injected = Counter(report["faults_injected"])
    assert injected["slow"] > 0
    assert injected["cancel"] > 0
    assert injected["bad"] > 0
    assert injected["flaky"] + injected["stall"] + injected["corrupt"] > 0
    assert report["refused_bad_requests"] > 0
    assert len(report["segments"]) > 1
    assert {segment["traffic"] for segment in report["segments"]} == {"steady", "waves"}
    # The whole lifecycle ran: several commits per chunked request, decode steps whose tokens
    # later turns hit (bit-exact, with every hit), waits for room, the scheduler-level API.
    lifecycle = report["lifecycle"]
    assert {key for key in CI_LIFECYCLE if lifecycle[key] == 0} == set(), lifecycle
    assert lifecycle["prefill_commits"] > lifecycle["chunked_prefills"]
    assert lifecycle["tables_checked"] == report["served"]
    small = {segment["device_pages"] for segment in report["segments"]}
    assert small == {options.device_pages, options.small_device_pages}


def test_soak_on_redis(tmp_path: Path) -> None:
    pytest.importorskip("redis")
    options = SoakOptions(
        seconds=4.0, seed=3, l3="redis", sessions=32, faults=CI_FAULTS - {"bad"}, bad_kinds=CI_BAD
    )
    assert_clean(soak(options))


# -- the harness can fail --------------------------------------------------------------------


def _quick(instrument: Any, **kw: Any) -> dict[str, Any]:
    options = SoakOptions(
        seconds=2.5, seed=5, sessions=16, faults=frozenset(), instrument=instrument, **kw
    )
    return soak(options)


def test_soak_reports_wrong_bytes_of_a_corrupting_cache() -> None:
    """A device pool that flips a bit in one write of eight: hits show wrong bytes."""
    rng = random.Random(0)

    def corrupt_writes(cache: HiCache) -> None:
        pool = cache.device_pool
        write = pool.set_kv_buffer

        def flipping(
            layer: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None
        ) -> None:
            if loc.numel() and rng.random() < 0.125:
                k = k.clone()
                k.view(-1).view(torch.int16)[0] ^= 1
            write(layer, loc, k, v)

        pool.set_kv_buffer = flipping  # type: ignore[method-assign]

    report = _quick(corrupt_writes)
    assert report["wrong_bytes"] > 0
    assert report["wrong_hits"] > 0
    assert not report["ok"]


def test_soak_reports_a_session_page_table_with_wrong_bytes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Sessions whose device_indices list their slots in the wrong order: every request's
    page-table check finds other bytes than the oracle's (hits alone would not show it)."""
    slots_of = Session.device_indices

    def reversed_slots(self: Session) -> torch.Tensor:
        slots = slots_of.fget(self)  # type: ignore[attr-defined]
        assert isinstance(slots, torch.Tensor)
        return slots.flip(0)

    monkeypatch.setattr(Session, "device_indices", property(reversed_slots))
    report = _quick(None)
    assert report["wrong_tables"] > 0
    assert report["wrong_bytes"] > 0
    assert report["wrong_hits"] == 0
    assert not report["ok"]


def test_soak_reports_a_leaked_page() -> None:
    """A cache that takes a device page and never gives it back: a leak per segment."""

    def leak(cache: HiCache) -> None:
        assert cache.l1.allocator.alloc(1) is not None

    report = _quick(leak)
    assert report["leaked_pages"] >= len(report["segments"])
    assert any(f["check"] == "device_pages" for f in report["invariant_failures"])
    assert not report["ok"]


def test_soak_names_a_hung_request_and_where_it_waits() -> None:
    """A prefetch that never returns (third call): the watchdog names the request, its step
    and the frame it waits in, and the run still ends."""

    def stuck_prefetch(cache: HiCache) -> None:
        prefetcher = cache.prefetcher
        assert prefetcher is not None
        fetch = prefetcher.fetch
        calls = 0

        async def fetch_or_hang(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 3:
                await anyio.sleep_forever()
            return await fetch(*args, **kwargs)

        prefetcher.fetch = fetch_or_hang  # type: ignore[method-assign]

    report = _quick(stuck_prefetch, hang_after_s=1.0, segment_seconds=2.5)
    assert report["hangs"] >= 1
    # The request is named (a segment's drain waiting on it may be named too, and first).
    named = [hang for hang in report["hang_details"] if hang["step"] in ("prefetch", "load")]
    assert named, report["hang_details"]
    assert any("fetch_or_hang" in frame for hang in named for frame in hang["stack"])
    assert not report["ok"]


async def test_run_soak_on_the_callers_loop() -> None:
    """``run_soak`` runs on the caller's loop (pytest's asyncio and uvloop here)."""
    options = SoakOptions(
        seconds=1.0, seed=7, sessions=8, l3="memory", faults=CI_FAULTS, bad_kinds=CI_BAD
    )
    assert_clean(await run_soak(options))


def test_the_traffic_and_the_oracle_are_deterministic() -> None:
    """Same seed, same requests (whatever the loop's interleaving); the KV oracle depends on
    the tenant and the prefix only."""
    prompts = Prompts.make(seed=4)

    def plans(seed: int) -> list[RequestPlan]:
        load = Workload(3, seed, prompts, cancel_rate=0.2, bad_rate=0.1)
        out = []
        for _ in range(40):
            plan = load.next()
            load.served(plan)
            out.append(plan)
        return out

    assert plans(4) == plans(4)
    assert plans(4) != plans(5)
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", page_size=4)
    tokens = list(range(100, 140))
    bits = expected_kv(layout, prefix_hashes(tokens, "t")).view(torch.int16)
    assert torch.equal(bits, expected_kv(layout, prefix_hashes(tokens, "t")).view(torch.int16))
    other_tenant = expected_kv(layout, prefix_hashes(tokens, None)).view(torch.int16)
    assert not torch.equal(bits[0], other_tenant[0])
    longer = expected_kv(layout, prefix_hashes([*tokens, 7], "t")).view(torch.int16)
    assert torch.equal(longer[:40], bits)  # a position's KV depends on its prefix only


def test_cli_soak_prints_one_json_document(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["soak", "--seconds", "1", "--sessions", "4", "--l3", "memory", "--json"]
    status = main([*args, "--faults", "slow,bad", "--bad-kinds", "negative_allocate"])
    report = json.loads(capsys.readouterr().out)
    assert status == (0 if report["ok"] else 1)
    assert_clean(report)
    assert report["bad_requests"].keys() <= {"negative_allocate"}
    assert main(["soak", "--faults", "gremlins"]) == 2  # a configuration error


def test_the_ledger_counts_a_page_that_left_l1_with_no_copy() -> None:
    def batch(*events: Any) -> EventBatch:
        return EventBatch(tuple(events))

    def stored(medium: StorageMedium, *blocks: str) -> BlockStored:
        return BlockStored(blocks, None, (), 4, medium)

    ledger = Ledger(check_losses=True)
    ledger.apply(
        batch(stored(StorageMedium.GPU, "a", "b", "c"), stored(StorageMedium.CPU_PINNED, "a"))
    )
    ledger.apply(batch(stored(StorageMedium.DISK, "b")))
    ledger.apply(batch(BlockRemoved(("a", "b", "c"), StorageMedium.GPU)))
    assert (ledger.lost, ledger.examples) == (1, ["c"])  # a is on L2, b on L3, c nowhere
    ledger.apply(batch(BlockRemoved(("a",), StorageMedium.CPU_PINNED)))
    ledger.apply(batch(stored(StorageMedium.GPU, "a"), BlockRemoved(("a",), StorageMedium.GPU)))
    assert ledger.lost == 2
    relaxed = Ledger(check_losses=False)  # write_through*: a skipped backup may drop pages
    relaxed.apply(batch(stored(StorageMedium.GPU, "x"), BlockRemoved(("x",), StorageMedium.GPU)))
    assert relaxed.lost == 0


def test_options_refuse_unknown_names() -> None:
    with pytest.raises(ValueError, match="unknown fault kinds"):
        SoakOptions(faults=frozenset({"gremlins"}))
    with pytest.raises(ValueError, match="l3 must be one of"):
        SoakOptions(l3="tape")
