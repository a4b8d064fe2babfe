"""The chaos soak: the whole runtime driven the way a server drives it, with faults.

```python
report = soak(SoakOptions(seconds=15, seed=1), backend="trio")
assert report["hangs"] == report["wrong_bytes"] == report["leaked_pages"] == 0
```

Many concurrent sessions (``sessions``, one request at a time each) send multi-turn
conversations of a few tenants (``extra_key``) over a few long shared system prompts to a cache
with a small L1 and L2 and an L3 (file, memory or redis). The run is cut into segments, one
cache instance each over the same L3, rotating every prefetch policy and write policy; every
other segment sends its traffic in waves (every session at once, the next wave when all are
back), so a request waiting for an event no later request fires becomes a hang, not a blip. In
each segment faults are injected at random (:data:`FAULT_KINDS`): flaky, slow, corrupting and
stalling storage, failed and late copies, requests cancelled at random awaits, bad requests.

Each request draws its lifecycle (:mod:`hicache_async.testing._soak_workload`): a prefill in one
commit or in chunks of random sizes, a few decode steps whose tokens the next turn's prompt
contains, a budget for waiting for L1 room, and ``async with`` or the scheduler-level API
(``enter`` / ``try_allocate`` / ``commit_nowait`` / ``finish`` / ``abort``). Every third segment
runs on a small L1 (``small_device_pages``), where requests queue for room and some wait past
their budget: a counted ``CapacityError``, never a hang.

What it checks, and reports in one JSON-ready dict:

- liveness: every request ends within ``hang_after_s``; a watchdog names any that does not,
  with its step and its coroutine's stack (``hangs``, ``hang_details``);
- every hit is bit-exact: the KV of each token position derives from the tenant and the token
  prefix (:mod:`hicache_async.testing._soak_kv`), so any hit is checked against a
  recomputation (``wrong_bytes``, ``wrong_hits``); so is, at the end of each served request,
  its whole page table (``device_indices``: the hit, its chunks and decode steps, where the
  tree's pages replaced its own; ``wrong_tables``);
- the lifecycle was driven (``lifecycle``: chunk commits, decode steps, waits for room and
  their timeouts, scheduler-level requests finished, aborted and retracted);
- the cache never dies: no exception escapes ``HiCache.open`` (``cache_deaths``);
- bad requests are refused with a ``HiCacheError`` at their call (``bad_requests``);
- after each segment (drained, every session closed): ``tree.check()``, no lock held, the
  allocators hold exactly what the tree holds (``leaked_pages``, ``invariant_failures``);
- no page is lost: under ``write_back``, a page leaves L1 only with a copy on L2 or L3 (a
  ledger of the KV events, :mod:`hicache_async.testing._soak_ledger`; ``lost_pages``);
- over the run, RSS and the thread count stay bounded (``resources``).

Random choices come from ``random.Random`` seeded by ``seed`` (per worker and per segment), so
a run is as deterministic as the loop's scheduling allows.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from hicache_async.cache import HiCache
from hicache_async.config import HiCacheConfig, HostLayout, PrefetchPolicy, WritePolicy
from hicache_async.errors import CapacityError, HiCacheError
from hicache_async.events import EventStream
from hicache_async.layout import KVLayout
from hicache_async.radix import Tier as RadixTier
from hicache_async.storage import HiCacheStorage, HiCacheStorageConfig, create_storage
from hicache_async.testing._soak_env import Resources, l3_place
from hicache_async.testing._soak_faults import FAULT_KINDS, SegmentFaults, install_faulty_engine
from hicache_async.testing._soak_ledger import Ledger
from hicache_async.testing._soak_requests import LIFECYCLE_COUNTS, Ctx, Tally, run_bad, serve
from hicache_async.testing._soak_watch import CancelAtSuspension, Watch
from hicache_async.testing._soak_workload import BAD_KINDS, Prompts, RequestPlan, Waves, Workload

__all__ = [
    "BAD_KINDS",
    "FAULT_KINDS",
    "LIFECYCLE_COUNTS",
    "CancelAtSuspension",
    "SoakOptions",
    "install_faulty_engine",
    "run_soak",
    "soak",
]

MODEL_NAME = "soak"
L3_KINDS = ("file", "memory", "redis")


@dataclass
class SoakOptions:
    """How long, how hard and with which faults to soak (the CLI's flags)."""

    seconds: float = 30.0
    seed: int = 0
    sessions: int = 64
    l3: str = "file"
    l3_path: Path | None = None  # file: the directory (default: a fresh temporary one)
    redis_url: str | None = None  # redis: a server to use (default: a redis-server started here)
    faults: frozenset[str] = frozenset(FAULT_KINDS)
    bad_kinds: frozenset[str] = frozenset(BAD_KINDS)  # which bad requests "bad" mixes in
    segment_seconds: float = 1.5  # one cache instance (one policy pair) per segment
    hang_after_s: float = 10.0  # a request still waiting after this long is a hang
    stall_s: float = 3.0  # how long a stalled storage call waits unless released
    device: str = "cpu"  # L1's device: cpu, or cuda to soak the CUDA copy engine too
    page_size: int = 8
    device_pages: int = 512
    small_device_pages: int = 128  # L1 of every ``small_l1_every``-th segment (0: never)
    small_l1_every: int = 3
    host_pages: int = 1024
    max_tokens: int = 320  # conversations restart past this many tokens
    waves: bool = True  # every other segment sends its traffic in bursts (Waves)
    system_prompts: int = 4  # shared by every tenant (their keys differ by extra_key)
    system_prompt_tokens: tuple[int, int] = (64, 192)  # length range
    cancel_rate: float = 0.12  # of the requests, when "cancel" faults are on
    chunk_rate: float = 0.5  # of the requests, prefilled in chunks of random sizes
    decode_rate: float = 0.5  # decoding 1-12 tokens after the prefill
    scheduler_rate: float = 0.2  # through the scheduler-level API instead of async with
    bad_rate: float = 0.04  # likewise, when "bad" faults are on
    # Test hook: called with each cache once it is open (e.g. to break it on purpose).
    instrument: Callable[[HiCache], None] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.faults) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULT_KINDS}")
        unknown = set(self.bad_kinds) - set(BAD_KINDS)
        if unknown:
            raise ValueError(f"unknown bad request kinds {sorted(unknown)}; known: {BAD_KINDS}")
        if self.l3 not in L3_KINDS:
            raise ValueError(f"l3 must be one of {L3_KINDS}, not {self.l3!r}")


# Runs this long also count the threads left once anyio's idle workers expired (10 s idle):
# a leak shows there, while the peak only says how many calls ran at once.
_SETTLE_AFTER_S = 60.0


def soak(options: SoakOptions, backend: str = "asyncio") -> dict[str, Any]:
    """Run the soak on ``backend`` (``asyncio`` or ``trio``); the JSON-ready report."""
    report: dict[str, Any] = anyio.run(run_soak, options, backend=backend)
    report["backend"] = backend
    return report


async def run_soak(options: SoakOptions) -> dict[str, Any]:
    """Run the soak on the current event loop; the JSON-ready report."""
    with l3_place(options) as place:
        run = _Run(options, place)
        started = time.monotonic()
        await run.all_segments()
        elapsed = time.monotonic() - started
        if options.seconds >= _SETTLE_AFTER_S:
            await run.resources.settle()
        return run.report(elapsed)


class _Run:
    """One soak run: its segments, workers and counts."""

    def __init__(self, options: SoakOptions, place: dict[str, Any]) -> None:
        self.options = options
        self.place = place
        self.tally = Tally()
        self.hangs: list[dict[str, Any]] = []
        self.segments: list[dict[str, Any]] = []
        self.invariant_failures: list[dict[str, Any]] = []
        self.leaked_pages = 0
        self.lost_pages = 0  # write_back: pages L1 evicted without a copy anywhere
        self.events_dropped = 0
        self.locks_held = 0
        self.cache_deaths = 0
        self.faults: Counter[str] = Counter()
        self.counted: Counter[str] = Counter()  # what cache.stats() counted of them
        self.resources = Resources()
        self.layout = KVLayout(
            num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", page_size=options.page_size
        )
        prompts = Prompts.make(options.seed, options.system_prompts, options.system_prompt_tokens)
        cancel = options.cancel_rate if "cancel" in options.faults else 0.0
        bad = options.bad_rate if "bad" in options.faults and options.bad_kinds else 0.0
        bad_kinds = tuple(sorted(options.bad_kinds))
        self.workloads = [
            Workload(
                w,
                options.seed,
                prompts,
                options.max_tokens,
                cancel,
                bad,
                bad_kinds,
                chunk_rate=options.chunk_rate,
                decode_rate=options.decode_rate,
                scheduler_rate=options.scheduler_rate,
            )
            for w in range(options.sessions)
        ]
        pairs = list(itertools.product(PrefetchPolicy, WritePolicy))
        random.Random(f"soak:{options.seed}:policies").shuffle(pairs)
        self.policies = pairs

    # -- segments -------------------------------------------------------------------------

    async def all_segments(self) -> None:
        """Segments of ``segment_seconds`` of traffic until ``seconds`` have passed (the
        drain and checks between segments count against the run's time)."""
        options = self.options
        end = anyio.current_time() + options.seconds
        for index in itertools.count():
            left = end - anyio.current_time()
            if left <= 0 or (index and left < options.segment_seconds / 4):
                return
            await self.segment(index, min(options.segment_seconds, left))

    def device_pages(self, index: int) -> int:
        """L1's size in segment ``index``: every ``small_l1_every``-th one is small."""
        options = self.options
        every = options.small_l1_every
        if options.small_device_pages and every and index % every == every - 1:
            return options.small_device_pages
        return options.device_pages

    def config(
        self, prefetch: PrefetchPolicy, write: WritePolicy, device_pages: int
    ) -> HiCacheConfig:
        options = self.options
        values: dict[str, Any] = {
            "layout": self.layout,
            "device": options.device,
            "device_pages": device_pages,
            "host_pages": options.host_pages,
            "host_layout": HostLayout.PAGE_FIRST,
            "write_policy": write,
            "prefetch_policy": prefetch,
            "storage_backend": options.l3,
            "prefetch_threshold": 4 * options.page_size,
            "prefetch_timeout_base": 0.3,
            "prefetch_timeout_per_ki_token": 0.1,
        }
        if "model_name" in HiCacheConfig.model_fields:  # issue 17 makes it a config field
            values["model_name"] = MODEL_NAME
        return HiCacheConfig(**values)

    def storage(self, config: HiCacheConfig, faults: SegmentFaults) -> HiCacheStorage:
        inner = create_storage(
            self.options.l3,
            HiCacheStorageConfig(
                is_mla_model=False,
                is_page_first_layout=config.host_layout is not HostLayout.LAYER_FIRST,
                model_name=MODEL_NAME,
            ),
            **self.place,
        )
        return faults.wrap(inner)

    async def segment(self, index: int, seconds: float) -> None:
        prefetch, write = self.policies[index % len(self.policies)]
        config = self.config(prefetch, write, self.device_pages(index))
        rng = random.Random(f"soak:{self.options.seed}:segment:{index}")
        faults = SegmentFaults(self.options.faults, rng, self.options.stall_s)
        record: dict[str, Any] = {
            "index": index,
            "prefetch_policy": prefetch.value,
            "write_policy": write.value,
            "device_pages": config.device_pages,
            "requests_before": self.tally.requests,
        }
        options: dict[str, Any] = {
            "storage": self.storage(config, faults),
            "drain_timeout": 5.0,
            "wrap_engine": faults.wrap_engine,
        }
        if "model_name" not in HiCacheConfig.model_fields:
            options["model_name"] = MODEL_NAME
        watch = Watch(self.options.hang_after_s)
        try:
            async with HiCache.open(config, **options) as cache, cache.events(1 << 20) as events:
                if self.options.instrument is not None:
                    self.options.instrument(cache)
                wave = self.options.waves and index % 2 == 1
                record["traffic"] = "waves" if wave else "steady"
                ledger = Ledger(check_losses=write is WritePolicy.WRITE_BACK)
                await self.drive(cache, watch, faults, seconds, wave, ledger, events)
                faults.quiesce()
                await self.finish(cache, record)
                self.count_counted(cache, faults, record)
                self.settle_ledger(ledger, events, record)
        except Exception as exc:  # the cache died: its task group ended the segment
            self.cache_deaths += 1
            record["died"] = True
            self.tally.killed += len(watch.unreported())
            self.tally.error("cache_death", exc, segment=index)
        self.hangs.extend({**hang, "segment": index} for hang in watch.hangs)
        self.faults.update(faults.injected())
        self.faults.update({f"stall_{k}": v for k, v in faults.events.items()})
        record["requests"] = self.tally.requests - record.pop("requests_before")
        self.segments.append(record)
        self.resources.sample()

    async def drive(
        self,
        cache: HiCache,
        watch: Watch,
        faults: SegmentFaults,
        seconds: float,
        wave: bool,
        ledger: Ledger,
        events: EventStream,
    ) -> None:
        """Run the workers for ``seconds`` (``wave``: in bursts), then until every request
        ended or was named a hang (those are cancelled)."""
        stop = anyio.Event()
        waves = Waves(len(self.workloads)) if wave else None
        async with anyio.create_task_group() as helpers:
            helpers.start_soon(watch.run)
            helpers.start_soon(faults.control)
            helpers.start_soon(ledger.follow, events)
            async with anyio.create_task_group() as workers:
                for load in self.workloads:
                    workers.start_soon(self.worker, cache, watch, load, stop, waves)
                await anyio.sleep(seconds)
                stop.set()
                await watch.settled()
                workers.cancel_scope.cancel()  # only requests named as hangs are left
            helpers.cancel_scope.cancel()

    async def finish(self, cache: HiCache, record: dict[str, Any]) -> None:
        """Drain, then check the index and the allocators against the tree."""
        with anyio.move_on_after(self.options.hang_after_s) as drain:
            await cache.drain()
        if drain.cancelled_caught:
            self.hangs.append({"step": "drain", "waited_s": self.options.hang_after_s})
            self._invariant(record, "drain", "drain() did not finish")
            return
        tree, ps = cache.tree, cache.page_size
        try:
            tree.check()
        except Exception as exc:
            self._invariant(record, "tree_check", f"{type(exc).__name__}: {exc}")
        locked = tree.protected_size(RadixTier.DEVICE) + tree.protected_size(RadixTier.HOST)
        if locked:
            self.locks_held += locked // ps
            self._invariant(record, "locks_held", f"{locked // ps} pages still locked")
        pools = [("device", cache.l1.allocator, RadixTier.DEVICE)]
        if cache.host_pool is not None:
            pools.append(("host", cache.host_pool.allocator, RadixTier.HOST))
        for name, allocator, tier in pools:
            extra = allocator.used - tree.total_size(tier) // ps
            if extra:
                self.leaked_pages += abs(extra)
                self._invariant(
                    record,
                    f"{name}_pages",
                    f"{name} allocator holds {allocator.used} pages, the tree "
                    f"{tree.total_size(tier) // ps}",
                )

    def count_counted(self, cache: HiCache, faults: SegmentFaults, record: dict[str, Any]) -> None:
        """Every injected storage and copy fault must show in ``cache.stats()`` (a failure is
        counted, never silent): errors at least the calls that failed or read corrupt pages,
        transition failures at least the copies that failed."""
        snapshot = cache.stats()
        failures = sum(t.failures for t in snapshot.transitions.values())
        counted = {"storage_errors": snapshot.storage.errors, "transition_failures": failures}
        self.counted.update(counted)
        injected = faults.injected()
        storage_faults = injected["flaky"] + injected["corrupt"]
        if snapshot.storage.errors < storage_faults:
            detail = f"{storage_faults} storage faults injected, {snapshot.storage.errors} counted"
            self._invariant(record, "uncounted_storage_faults", detail)
        if failures < injected["copy_fail"]:
            detail = f"{injected['copy_fail']} copies failed, {failures} transition failures"
            self._invariant(record, "uncounted_copy_failures", detail)

    def settle_ledger(self, ledger: Ledger, events: EventStream, record: dict[str, Any]) -> None:
        """Apply the events the drain emitted; count the pages write_back lost."""
        for batch in events.drain_nowait():
            ledger.apply(batch)
        if events.dropped:
            self.events_dropped += events.dropped
            record["ledger"] = "skipped: the event stream lost batches"
            return
        if ledger.lost:
            self.lost_pages += ledger.lost
            detail = f"{ledger.lost} pages left L1 with no copy on L2 or L3: {ledger.examples}"
            self._invariant(record, "lost_pages", detail)

    def _invariant(self, record: dict[str, Any], check: str, detail: str) -> None:
        record.setdefault("invariant_failures", []).append(check)
        failure = {"segment": record["index"], "check": check, "detail": detail}
        self.invariant_failures.append(failure)

    # -- requests -------------------------------------------------------------------------

    async def worker(
        self,
        cache: HiCache,
        watch: Watch,
        load: Workload,
        stop: anyio.Event,
        waves: Waves | None,
    ) -> None:
        try:
            while not stop.is_set():
                plan = load.next()
                if waves is not None:
                    await waves.wait()
                else:
                    await anyio.sleep(plan.think_s)
                if stop.is_set():
                    return
                if await self.request(cache, watch, load.worker, plan):
                    load.served(plan)
        finally:
            if waves is not None:
                waves.leave()

    async def request(self, cache: HiCache, watch: Watch, worker: int, plan: RequestPlan) -> bool:
        """One request as ``plan`` says; True when it was served."""
        tally = self.tally
        policy = f"{cache.config.prefetch_policy.value}/{cache.config.write_policy.value}"
        kind = plan.bad_kind or (plan.mode if plan.api == "session" else f"{plan.mode}/{plan.api}")
        flight = watch.start(worker, kind, policy)
        tally.requests += 1
        ctx = Ctx(cache, tally, flight)
        try:
            if plan.mode == "bad":
                tally.bad_outcome(plan.bad_kind, "issued")
                flight.coro = coro = run_bad(ctx, plan)
                tally.bad_outcome(plan.bad_kind, await coro)
                return False
            flight.coro = served = serve(ctx, plan)
            if plan.mode == "normal":
                if await served:
                    tally.served += 1
                    return True
                return False  # aborted or retracted (scheduler-level requests)
            tally.cancels += 1
            ended = False
            with anyio.CancelScope() as scope:
                if plan.mode == "cancel_delay":
                    scope.deadline = anyio.current_time() + plan.delay
                    ended = await served
                else:
                    ended = await CancelAtSuspension(served, scope, plan.at)
            if scope.cancelled_caught:
                tally.cancelled += 1
            elif ended:
                tally.served += 1
            return False
        except CapacityError:
            tally.capacity_refusals += 1
            return False
        except HiCacheError as exc:
            tally.request_errors[type(exc).__name__] += 1
            tally.error("request", exc, kind=plan.bad_kind or plan.mode, step=flight.step)
            return False
        except Exception as exc:
            if plan.mode == "bad":
                tally.bad_outcome(plan.bad_kind, "wrong_error")
            tally.unexpected_errors[type(exc).__name__] += 1
            tally.error("request", exc, kind=plan.bad_kind or plan.mode, step=flight.step)
            return False
        finally:
            tally.ended += 1
            watch.end(flight)

    # -- the report -----------------------------------------------------------------------

    def report(self, elapsed: float) -> dict[str, Any]:
        tally, options = self.tally, self.options
        bad = {kind: dict(counts) for kind, counts in sorted(tally.bad.items())}
        refused = sum(c.get("refused", 0) for c in tally.bad.values())
        accepted = sum(c.get("accepted", 0) for c in tally.bad.values())
        hangs = len(self.hangs)
        injected = self.faults + Counter(
            cancel=tally.cancels, bad=sum(c.get("issued", 0) for c in tally.bad.values())
        )
        report: dict[str, Any] = {
            "seed": options.seed,
            "seconds": round(elapsed, 2),
            "seconds_requested": options.seconds,
            "sessions": options.sessions,
            "l3": options.l3,
            "faults": sorted(options.faults),
            "bad_kinds": sorted(options.bad_kinds) if "bad" in options.faults else [],
            "requests": tally.requests,
            "ended": tally.ended,
            "served": tally.served,
            "cancelled": tally.cancelled,
            "capacity_refusals": tally.capacity_refusals,
            "killed_by_cache_death": tally.killed,
            "hangs": hangs,
            "hang_details": self.hangs[:10],
            "wrong_bytes": tally.wrong_bytes,
            "wrong_hits": tally.wrong_hits,
            "wrong_tables": tally.wrong_tables,
            "hits_checked": tally.hits_checked,
            "hit_ratio": round(tally.hit_tokens / tally.prompt_tokens, 4)
            if tally.prompt_tokens
            else 0.0,
            "hit_tokens_by_tier": dict(tally.hits_by_tier),
            "lifecycle": {key: tally.lifecycle[key] for key in LIFECYCLE_COUNTS},
            "leaked_pages": self.leaked_pages,
            "lost_pages": self.lost_pages,
            "events_dropped": self.events_dropped,
            "locks_held_pages": self.locks_held,
            "invariant_failures": self.invariant_failures[:20],
            "cache_deaths": self.cache_deaths,
            "refused_bad_requests": refused,
            "accepted_bad_requests": accepted,
            "bad_requests": bad,
            "request_errors": dict(tally.request_errors),
            "unexpected_errors": dict(tally.unexpected_errors),
            "faults_injected": dict(sorted(injected.items())),
            "faults_counted": dict(sorted(self.counted.items())),
            "over_deadline": tally.late,
            "over_deadline_details": tally.over_deadline,
            "slowest_s": dict(sorted(tally.slowest_s.items())),
            "segments": self.segments,
            "resources": self.resources.as_dict(),
            "errors_seen": tally.errors_seen,
            "errors": tally.errors,
        }
        report["ok"] = not (
            hangs
            or tally.wrong_bytes
            or tally.wrong_tables
            or self.leaked_pages
            or self.lost_pages
            or self.cache_deaths
            or self.invariant_failures
            or not report["resources"]["bounded"]
        )
        return report
