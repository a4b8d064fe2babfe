"""Adversarial reproductions: the runtime driven as a demanding user would (issue 17's promises).

Each finding was a minimal deterministic test, first marked ``xfail(strict=True)`` with what
was wrong, unmarked with its fix; the others are guards for edges no other test covered.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Generator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import torch

from hicache_async import HiCache, HiCacheConfig, KVLayout
from hicache_async.errors import HiCacheError
from hicache_async.metrics import Tier, Transition
from hicache_async.radix import Tier as RadixTier
from hicache_async.testing._soak_kv import expected_kv, prefix_hashes, write_kv, wrong_bytes
from hicache_async.testing.soak import CancelAtSuspension

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype="float16", page_size=4)
PS = LAYOUT.page_size
PROMPT = list(range(1000, 1000 + 16 * PS))  # 16 pages
HANG_GUARD_S = 60  # a liveness guard (a hang fails the test), not a speed check


def config(**kw: Any) -> HiCacheConfig:
    options: dict[str, Any] = {
        "layout": LAYOUT,
        "device": "cpu",
        "device_pages": 64,
        "host_pages": 128,
        "storage_backend": "none",
        "prefetch_threshold": 4,
    }
    options.update(kw)
    return HiCacheConfig(**options)


def file_config(path: Path, **kw: Any) -> HiCacheConfig:
    options: dict[str, Any] = {
        "model_name": "adversarial-model",
        "storage_backend": "file",
        "storage_backend_extra_config": f'{{"path": "{path}"}}',
    }
    options.update(kw)
    return config(**options)


async def serve(
    cache: HiCache, tokens: list[int], extra_key: str | None = None, **session: Any
) -> int:
    """One request through a session with the soak's KV oracle; the hit length (bit-exact)."""
    kv = expected_kv(cache.layout, prefix_hashes(tokens, extra_key))
    async with cache.session(tokens, extra_key, **session) as s:
        await s.prefetch()
        hit = await s.load()
        assert wrong_bytes(cache.device_pool, hit.device_indices, kv[: hit.length]) == 0
        slots = await s.allocate(len(tokens) - hit.length)
        write_kv(cache.device_pool, slots, kv[hit.length :])
        await s.commit(slots)
    return int(hit.length)


async def assert_settled(cache: HiCache) -> None:
    """Background work drained; nothing locked, no page leaked, the index consistent."""
    await cache.drain()
    cache.check()
    tree = cache.tree
    assert tree.protected_size(RadixTier.DEVICE) == 0
    assert tree.protected_size(RadixTier.HOST) == 0
    assert cache.l1.allocator.used == tree.total_size(RadixTier.DEVICE) // PS


# -- cancellation at every await: write_back + file L3 + best_effort ----------------------------

FILLER = list(range(5000, 5000 + 12 * PS))  # 12 pages, on L1 only (write_back: no host copy)


@pytest.fixture
def stored(tmp_path: Path) -> Path:
    """A file L3 that holds PROMPT, written by an earlier (write_through) cache."""

    async def write() -> None:
        async with HiCache.open(file_config(tmp_path, write_policy="write_through")) as cache:
            await serve(cache, PROMPT)

    anyio.run(write)
    return tmp_path


async def _write_back_request_cancelled_at(path: Path, at: int) -> tuple[int, bool]:
    """On a small L1 full of unbacked write_back pages, serve PROMPT from L3 (best_effort),
    cancelled at suspension ``at``; then: nothing leaked, FILLER not lost (it was on L1 only:
    making room must back it up), and both prompts served bit-exact."""
    cfg = file_config(
        path,
        device_pages=20,
        host_pages=64,
        write_policy="write_back",
        prefetch_policy="best_effort",
    )
    async with HiCache.open(cfg) as cache:
        await serve(cache, FILLER)
        await cache.drain()
        assert cache.tree.total_size(RadixTier.HOST) == 0  # write_back: FILLER is on L1 only

        hits: list[Any] = []

        async def request() -> None:
            async with cache.session(PROMPT) as s:
                await s.prefetch()
                await anyio.lowlevel.checkpoint()  # queued for the model: the prefetch starts
                await cache.drain()  # and lands
                hit = await s.load()
                hits.append(hit)
                kv = expected_kv(cache.layout, prefix_hashes(PROMPT, None))
                assert wrong_bytes(cache.device_pool, hit.device_indices, kv[: hit.length]) == 0
                slots = await s.allocate(len(PROMPT) - hit.length)
                write_kv(cache.device_pool, slots, kv[hit.length :])
                await s.commit(slots)

        with anyio.fail_after(HANG_GUARD_S), anyio.CancelScope() as scope:
            step = CancelAtSuspension(request(), scope, at)
            await step
        if at == 0:  # the uncut request: its hit came from L3, past a full L1
            assert hits[0].tokens_by_tier[Tier.STORAGE] == len(PROMPT)
            assert cache.stats().transitions[Transition.BACKUP].pages >= len(FILLER) // PS // 2
        with anyio.fail_after(HANG_GUARD_S):
            await assert_settled(cache)
            assert await serve(cache, FILLER) == len(FILLER), "a write_back page was lost"
            await serve(cache, PROMPT)
            await assert_settled(cache)
        return step.suspensions, scope.cancelled_caught


async def test_write_back_best_effort_request_cancelled_at_every_await(stored: Path) -> None:
    total, _ = await _write_back_request_cancelled_at(stored, 0)
    assert total >= 4, f"the request suspended only {total} times: not the path meant"
    for at in range(1, total + 1):
        await _write_back_request_cancelled_at(stored, at)


# -- two models on one file L3 directory, in two processes at once ----------------------------

MODEL_PROMPTS = [list(range(7000 + 100 * i, 7000 + 100 * i + 12 * PS)) for i in range(4)]
MODELS = [("alpha", "float16", 1), ("beta", "float16", 2), ("alpha", "bfloat16", 3)]


def _model_kv(layout: KVLayout, tokens: list[int], salt: int) -> torch.Tensor:
    """The KV one model computes: the soak's oracle, salted per model so that two models'
    pages differ for the same tokens (a page read across models is then wrong bytes)."""
    return expected_kv(layout, prefix_hashes(tokens, None) ^ salt)


async def _serve_model(path: str, name: str, dtype: str, salt: int) -> list[tuple[int, int]]:
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=dtype, page_size=PS)
    cfg = file_config(
        Path(path),
        model_name=name,
        layout=layout,
        prefetch_policy="wait_complete",
        write_policy="write_through",
    )
    out = []
    async with HiCache.open(cfg) as cache:
        for tokens in MODEL_PROMPTS:
            kv = _model_kv(layout, tokens, salt)
            async with cache.session(tokens) as s:
                await s.prefetch()
                hit = await s.load()
                wrong = wrong_bytes(cache.device_pool, hit.device_indices, kv[: hit.length])
                slots = await s.allocate(len(tokens) - hit.length)
                write_kv(cache.device_pool, slots, kv[hit.length :])
                await s.commit(slots)
            out.append((int(hit.length), wrong))
            await cache.drain()  # written to L3 before the other process's next request
    return out


def _model_worker(path: str, name: str, dtype: str, salt: int, queue: Any) -> None:
    try:
        queue.put((name, dtype, anyio.run(_serve_model, path, name, dtype, salt)))
    except BaseException as exc:  # the parent reports it
        queue.put((name, dtype, repr(exc)))


def _run_models(path: Path) -> dict[tuple[str, str], Any]:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_model_worker, args=(str(path), name, dtype, salt, queue))
        for name, dtype, salt in MODELS
    ]
    for proc in procs:
        proc.start()
    results = {}
    for _ in procs:
        name, dtype, result = queue.get(timeout=120)
        results[name, dtype] = result
    for proc in procs:
        proc.join(timeout=30)
        assert proc.exitcode == 0
    return results


@pytest.mark.slow
def test_models_sharing_a_file_l3_never_read_each_others_pages(tmp_path: Path) -> None:
    """Three processes at once on one directory: two model names with the same geometry, and
    one name in another dtype. Each first request of a prompt misses (no other model's page
    is read), and a second round in fresh processes hits its own pages bit-exact."""
    first = _run_models(tmp_path)
    for model, result in first.items():
        assert isinstance(result, list), f"{model}: {result}"
        assert result == [(0, 0)] * len(MODEL_PROMPTS), f"{model} read another model's pages"
    second = _run_models(tmp_path)
    full = [(len(tokens) // PS * PS, 0) for tokens in MODEL_PROMPTS]
    for model, result in second.items():
        assert result == full, f"{model}: {result}"


# -- a session closed while one of its steps is in flight --------------------------------------


async def host_only(cache: HiCache, tokens: list[int] = PROMPT) -> None:
    """``tokens``' KV on L2 only: served once, backed up, then evicted from L1."""
    await serve(cache, tokens)
    await cache.drain()
    cache.device_tier.evict(cache.l1.allocator.usable)
    assert cache.tree.total_size(RadixTier.DEVICE) == 0


def hold_loads(cache: HiCache) -> anyio.Event:
    """Hold every L2 -> L1 copy until the returned event is set (the copy then runs)."""
    assert cache.loader is not None
    engine = cache.loader.engine
    copy = engine.load
    gate = anyio.Event()

    async def held(host_slots: torch.Tensor, device_slots: torch.Tensor) -> Any:
        await gate.wait()
        return await copy(host_slots, device_slots)

    engine.load = held  # type: ignore[method-assign]
    return gate


async def test_close_while_load_is_in_flight_leaves_no_lock() -> None:
    """Was broken: Session.close() while the session's load() awaits its L2 copy: the load goes
    on, locks the loaded path for a session that is closed, and the lock is never released (its
    L1 pages can never be evicted again); session.py _load_here does not look at the state
    after `await loader.load(match)`."""
    async with HiCache.open(config(write_policy="write_through")) as cache:
        await host_only(cache)
        gate = hold_loads(cache)
        session = cache.session(PROMPT)
        await session.__aenter__()
        outcome: list[object] = []

        async def request() -> None:
            try:
                outcome.append(await session.load())
            except HiCacheError as exc:  # refused: the session was closed meanwhile
                outcome.append(exc)

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(request)
                await anyio.wait_all_tasks_blocked()
                session.close()  # e.g. the server's disconnect handler
                gate.set()
            await assert_settled(cache)


async def test_close_while_commit_awaits_its_load_keeps_the_index_intact() -> None:
    """Was broken: Session.close() while commit() awaits the load of its L2 part: close() frees
    the session's allocation, then commit() goes on and inserts those freed pages (state goes
    CLOSED -> COMMITTED): the tree holds pages the allocator will hand out again, and the next
    backup of them fails with IndexStateError, which ends the cache's task group; session.py
    commit() `hit = self._hit or await self.load()` does not look at the state after the await."""
    tokens = PROMPT + list(range(9000, 9000 + 4 * PS))  # 16 pages on L2, then 4 new ones
    async with HiCache.open(config(write_policy="write_through")) as cache:
        await host_only(cache)
        gate = hold_loads(cache)
        session = cache.session(tokens)
        await session.__aenter__()
        slots = await session.allocate(4 * PS)  # the new tokens' slots, before the load
        kv = expected_kv(cache.layout, prefix_hashes(tokens, None))
        write_kv(cache.device_pool, slots, kv[len(PROMPT) :])
        outcome: list[object] = []

        async def request() -> None:
            try:
                outcome.append(await session.commit(slots))  # awaits load() of the L2 part
            except HiCacheError as exc:  # refused: the session was closed meanwhile
                outcome.append(exc)

        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as tg:
                tg.start_soon(request)
                await anyio.wait_all_tasks_blocked()
                session.close()
                gate.set()
            assert session.state.value == "closed"
            await assert_settled(cache)


class _CloseSession:
    """Stands in for a cancel scope in :class:`CancelAtSuspension`: at the chosen suspension
    it closes the session instead (a disconnect handler running in another task)."""

    def __init__(self) -> None:
        self.session: Any = None

    def cancel(self) -> None:
        if self.session is not None:
            self.session.close()


async def _request_closed_at(path: Path, policy: str, at: int) -> int:
    """PROMPT + 2 new pages: its first 8 pages on L2 only, the rest on L3 (``policy``); the
    session is closed at the request's ``at``-th suspension. The request either ends or
    gets a HiCacheError; then nothing is locked or leaked and PROMPT is served bit-exact."""
    tokens = PROMPT + list(range(9000, 9000 + 2 * PS))
    cfg = file_config(path, write_policy="write_back", prefetch_policy=policy)
    async with HiCache.open(cfg) as cache:
        await serve(cache, PROMPT[: 8 * PS])
        await cache.drain()
        await cache.ensure_device_room(cache.l1.allocator.usable)  # write_back: to L2 first
        assert cache.tree.total_size(RadixTier.DEVICE) == 0
        closer = _CloseSession()

        async def request() -> None:
            kv = expected_kv(cache.layout, prefix_hashes(tokens, None))
            closer.session = s = cache.session(tokens)
            async with s:
                try:
                    await s.prefetch()
                    await anyio.lowlevel.checkpoint()
                    hit = await s.load()
                    assert wrong_bytes(cache.device_pool, hit.device_indices, kv[: hit.length]) == 0
                    slots = await s.allocate(len(tokens) - hit.length)
                    write_kv(cache.device_pool, slots, kv[hit.length :])
                    await s.commit(slots)
                except HiCacheError:
                    assert s.state.value == "closed"

        with anyio.fail_after(HANG_GUARD_S):
            step = CancelAtSuspension(request(), closer, at)  # type: ignore[arg-type]
            await step
            await assert_settled(cache)
            hit = await serve(cache, PROMPT)  # bit-exact (serve checks)
            assert hit == len(PROMPT) or policy == "best_effort"  # it takes what arrived
            await assert_settled(cache)
        return step.suspensions


@pytest.mark.parametrize("policy", ["wait_complete", "best_effort", "timeout"])
async def test_a_session_closed_at_any_await_leaves_nothing_behind(
    stored: Path, policy: str
) -> None:
    total = await _request_closed_at(stored, policy, 0)
    assert total >= 2, f"the request suspended only {total} times: not the path meant"
    for at in range(1, total + 1):
        await _request_closed_at(stored, policy, at)


# -- a request's priority ---------------------------------------------------------------------


async def test_a_bad_priority_never_breaks_the_requests_after_it() -> None:
    """Was broken: cache.session(priority=...) takes any object: a str or None priority is
    stored on the nodes the request inserts, and every later well-behaved request on that
    prefix fails with a builtin TypeError (tree.py _walk_for_insert `priority >
    child.priority`); cache.py session() does not check priority."""
    async with HiCache.open(config()) as cache:
        with contextlib.suppress(HiCacheError):  # refused at the edge, or served
            await serve(cache, PROMPT, priority="high")
        await assert_settled(cache)
        longer = PROMPT + list(range(9000, 9000 + 2 * PS))
        assert await serve(cache, longer) in (0, len(PROMPT))  # a good request is served
        await assert_settled(cache)


async def test_a_none_priority_under_the_priority_policy_keeps_the_index_intact() -> None:
    """Was broken: eviction_policy=priority and a non-int priority (None): the heap push in the
    insert raises TypeError after the node is in the tree; the session then frees the pages the
    tree holds (a device page owned twice, the allocator short of what the tree holds) and
    later good requests fail with TypeError (radix/policy.py PriorityStrategy key, tree.py
    _attach -> _refresh)."""
    async with HiCache.open(config(eviction_policy="priority", device_pages=32)) as cache:
        await serve(cache, list(range(40)))
        with contextlib.suppress(HiCacheError):  # refused at the edge, or served
            await serve(cache, PROMPT, priority=None)
        await assert_settled(cache)
        for i in range(4):
            await serve(cache, list(range(20000 + 1000 * i, 20000 + 1000 * i + 10 * PS)))
        await assert_settled(cache)


async def test_a_nan_priority_is_harmless_under_the_priority_policy() -> None:
    """A float priority compares (NaN compares false): nothing breaks, nothing leaks."""
    async with HiCache.open(config(eviction_policy="priority", device_pages=32)) as cache:
        await serve(cache, PROMPT, priority=float("nan"))
        for i in range(4):
            await serve(cache, list(range(20000 + 1000 * i, 20000 + 1000 * i + 10 * PS)))
        await assert_settled(cache)


# -- bad input at every public edge: a HiCacheError, never a builtin one -----------------------


async def _session_step(cache: HiCache, step: str, arg: Any) -> None:
    """Run one session step of PROMPT (an L1 hit of the whole prompt) with a bad ``arg``."""
    async with cache.session(PROMPT + list(range(9000, 9000 + 2 * PS))) as s:
        if step == "load":
            await s.load(limit=arg)
            return
        await s.load()
        if step == "allocate":
            await s.allocate(arg)
            return
        slots = await s.allocate(2 * PS)
        await s.commit(arg(slots))


BAD_STEPS = [
    pytest.param("load", "8", id="load-limit-str"),
    pytest.param("load", 5.5, id="load-limit-float"),
    pytest.param("load", -5, id="load-limit-negative"),
    pytest.param("allocate", 1.5, id="allocate-float"),
    pytest.param("allocate", "8", id="allocate-str"),
    pytest.param("allocate", True, id="allocate-bool"),
    pytest.param("commit", lambda slots: slots.tolist(), id="commit-list"),
    pytest.param("commit", lambda slots: slots.numpy(), id="commit-numpy"),
    pytest.param("commit", lambda slots: None, id="commit-none"),
    pytest.param(
        "commit", lambda slots: torch.empty_like(slots, device="meta"), id="commit-meta-tensor"
    ),
]


@pytest.mark.parametrize(("step", "arg"), BAD_STEPS)
async def test_a_bad_session_argument_is_a_hicache_error(step: str, arg: Any) -> None:
    """Was broken: a bad argument to a session step gives a builtin error (TypeError,
    AttributeError, NotImplementedError) or is taken (a negative limit, a bool count):
    session.py load() uses `limit` unchecked (`limit < length`, `indices[:length]`), allocate()
    checks only `n_tokens < 0`, commit() calls `new_slots.to(...)` before any check."""
    async with HiCache.open(config()) as cache:
        await serve(cache, PROMPT)
        try:
            await _session_step(cache, step, arg)
        except HiCacheError:
            pass
        else:
            pytest.fail(f"{step}({arg!r}) was accepted")
        await assert_settled(cache)
        assert await serve(cache, PROMPT) == len(PROMPT)  # and the index is intact


async def test_tokens_on_the_meta_device_are_a_hicache_error() -> None:
    """Was broken: a token tensor on the meta device gives a builtin NotImplementedError at
    cache.session() (radix/key.py copies it without checking the device)."""
    async with HiCache.open(config()) as cache:
        with pytest.raises(HiCacheError):
            cache.session(torch.empty(8, dtype=torch.int64, device="meta"))


WEIRD_TOKENS = [
    pytest.param(torch.arange(8, dtype=torch.float32), id="float-tensor"),
    pytest.param(torch.arange(8).view(2, 4), id="2d-tensor"),
    pytest.param(torch.tensor(3), id="0d-tensor"),
    pytest.param(torch.ones(8, dtype=torch.bool), id="bool-tensor"),
    pytest.param(torch.zeros(4, dtype=torch.complex64), id="complex-tensor"),
    pytest.param(True, id="bool"),
    pytest.param(5, id="int"),
    pytest.param(None, id="none"),
    pytest.param("abcd", id="str"),
    pytest.param(b"abc", id="bytes-not-int64"),
    pytest.param([1.0, 2.0], id="float-list"),
    pytest.param([[1, 2], [3, 4]], id="nested-list"),
    pytest.param([2**70], id="int-beyond-int64"),
    pytest.param([2**31], id="int-beyond-int32"),
    pytest.param([-1], id="negative"),
]


@pytest.mark.parametrize("tokens", WEIRD_TOKENS)
async def test_weird_token_containers_are_refused_at_the_session(tokens: Any) -> None:
    async with HiCache.open(config()) as cache:
        with pytest.raises(HiCacheError):
            cache.session(tokens)
        await serve(cache, PROMPT)
        await assert_settled(cache)


async def test_a_huge_prompt_is_a_capacity_error_and_leaks_nothing() -> None:
    tokens = list(range(200_000))  # 50,000 pages for an L1 of 64
    async with HiCache.open(config()) as cache:
        async with cache.session(tokens) as s:
            hit = await s.load()
            with pytest.raises(HiCacheError):
                await s.allocate(len(tokens) - hit.length)
            with pytest.raises(HiCacheError):
                await s.allocate(10**12)
            with pytest.raises(HiCacheError):
                await s.allocate(-1)
        await assert_settled(cache)
        assert await serve(cache, PROMPT) == 0
        await assert_settled(cache)


# -- bad settings: a ConfigError naming the field --------------------------------------------


def test_a_file_path_with_a_nul_byte_is_a_config_error() -> None:
    """Was broken: a file-backend path with a NUL byte gives a builtin ValueError ('embedded
    null byte') from HiCache(), not a ConfigError (backends/hicache_file/_options.py make_root
    catches OSError only)."""
    cfg = config(
        model_name="m",
        storage_backend="file",
        storage_backend_extra_config='{"path": "/tmp/a\\u0000b"}',
    )
    with pytest.raises(HiCacheError, match="path"):
        HiCache(cfg)


def test_an_empty_file_path_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was broken: a file-backend path of '' is taken as the current directory: the cache
    writes its page files (two levels of hex directories) into whatever directory the server
    runs in, e.g. a source checkout; an empty path (an unset variable in a template) should be
    a ConfigError (backends/hicache_file/_options.py: Path('') is Path('.'))."""
    monkeypatch.chdir(tmp_path)
    cfg = config(
        model_name="m", storage_backend="file", storage_backend_extra_config='{"path": ""}'
    )

    async def use() -> None:
        async with HiCache.open(cfg) as cache:
            await serve(cache, PROMPT)

    try:
        anyio.run(use)
    except HiCacheError:
        return
    assert not list(tmp_path.iterdir()), "page files were written into the working directory"


# -- the Redis L3 on trio -----------------------------------------------------------------------


@pytest.fixture
def redis_port(tmp_path: Path) -> Generator[int, None, None]:
    from hicache_async.testing.redis_server import RedisProcess, require_redis_server

    try:
        require_redis_server()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        yield server.port
    finally:
        server.stop()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_redis_l3_on_trio_is_refused_or_closes_cleanly(redis_port: int) -> None:
    """Was broken: storage_backend=redis on trio (the soak: `hicache-async soak --l3 redis
    --backend trio --seed 5` reports 21 cache deaths in 21 segments): HiCache.open() accepts
    it, every L3 call fails ('no running event loop', counted as misses), and leaving `async
    with HiCache.open()` raises a builtin RuntimeError/TypeError from redis.asyncio's
    disconnect (cache.py aclose -> backends/hicache_redis/_backend.py _aclose). The backend is
    asyncio-only (docs/backends.md): open() should refuse it on trio with a HiCacheError."""
    cfg = config(
        model_name="m",
        storage_backend="redis",
        storage_backend_extra_config=f'{{"url": "redis://127.0.0.1:{redis_port}"}}',
        prefetch_policy="wait_complete",
    )

    async def use() -> None:
        async with HiCache.open(cfg) as cache:
            await serve(cache, PROMPT)
            await cache.drain()
            await serve(cache, PROMPT)

    try:
        with contextlib.suppress(HiCacheError):  # refused with our error: fine
            anyio.run(use, backend="trio")
    finally:  # redis.asyncio's disconnect coroutine, never awaited on trio: collect it here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            gc.collect()


# -- drain() and a best_effort prefetch not started yet -----------------------------------------


async def test_drain_waits_for_a_best_effort_prefetch_not_yet_started(stored: Path) -> None:
    """Was broken: cache.drain() returns while a best_effort prefetch a session started (and
    left) has not begun to run: the prefetch holds the session's matched path locked (taken in
    _BackgroundPrefetch.__init__) but is counted in prefetcher.running only once its task runs,
    so cache.check() right after drain() (as its docstring says to call it) raises 'pages still
    locked' (session.py prefetch() start_soon; cache.py drain())."""
    async with HiCache.open(file_config(stored, prefetch_policy="best_effort")) as cache:
        await serve(cache, PROMPT[: 4 * PS])  # a device hit, so the prefetch locks a path
        await cache.drain()
        async with cache.session(PROMPT) as s:
            assert s.match.device_hit_length == 4 * PS
            await s.prefetch()
        await cache.drain()
        cache.check()


# -- the scheduler-level API alongside sessions (issue 17, defect 5) ----------------------------


async def _low_level_request(cache: HiCache, tokens: list[int], op: int) -> None:
    """One scheduler-level step on ``tokens``: insert a recomputed prompt, hold a match
    locked, or load a match's host part by hand (as examples/scheduler_loop.py does)."""
    tree = cache.tree
    key = cache.key(tokens)
    kv = expected_kv(cache.layout, prefix_hashes(tokens, None))
    if op == 0:
        aligned = len(tokens) // PS * PS
        slots = cache.device_tier.reserve(aligned // PS)
        if not aligned or slots is None:
            return
        write_kv(cache.device_pool, slots, kv[:aligned])
        prefix = cache.key(tokens[:aligned])
        present = tree.insert(prefix, slots)
        cache.device_tier.free(slots[: present // PS * PS])
        cache.after_insert(prefix, aligned - present)
        return
    match = cache.match_prefix(key)
    tree.lock(match.last_device_node)
    tree.lock_host(match.last_host_node)
    locked = match.last_device_node
    try:
        indices = match.device_indices
        if op == 2 and match.host_hit_length and cache.loader is not None:
            loaded = await cache.loader.load(match)
            if loaded.loaded_tokens:
                tree.lock(loaded.last_node)
                tree.unlock(locked)
                locked, indices = loaded.last_node, loaded.device_indices
        await anyio.lowlevel.checkpoint()
        assert wrong_bytes(cache.device_pool, indices, kv[: indices.numel()]) == 0
    finally:
        tree.unlock(locked)
        tree.unlock_host(match.last_host_node)


@pytest.mark.parametrize("write_policy", ["write_through", "write_back"])
@pytest.mark.parametrize("seed", [0, 1])
async def test_low_level_traffic_beside_cancelled_session_loads(
    write_policy: str, seed: int
) -> None:
    """Sessions loading from L2 (some cancelled at their k-th checkpoint) and scheduler-level
    inserts, locked matches, hand-made loads and evictions, in waves; every hit bit-exact, and
    once drained nothing locked or leaked, the tree consistent."""
    import random

    rng = random.Random(seed)
    bases = [list(range(1000 * i, 1000 * i + 16 * PS)) for i in range(1, 4)]
    prompts = [
        rng.choice(bases)[: rng.randrange(1, 16) * PS] + [60000 + rng.randrange(4)] * PS
        for _ in range(12)
    ]
    cfg = config(device_pages=48, host_pages=96, write_policy=write_policy)
    async with HiCache.open(cfg) as cache:
        assert cache.loader is not None
        copy = cache.loader.engine.load

        async def slow_copy(host_slots: torch.Tensor, device_slots: torch.Tensor) -> Any:
            for _ in range(rng.randrange(4)):  # the copy spans other tasks' steps
                await anyio.lowlevel.checkpoint()
            return await copy(host_slots, device_slots)

        cache.loader.engine.load = slow_copy  # type: ignore[method-assign]
        for tokens in prompts[:4]:
            await serve(cache, tokens)
        await cache.drain()
        cache.device_tier.evict(cache.l1.allocator.usable)  # L2 only from here

        async def one(tg: Any) -> None:
            tokens = rng.choice(prompts)
            use_session, op = rng.random() < 0.6, rng.randrange(3)
            with anyio.CancelScope() as scope:
                if rng.random() < 0.3:
                    k = rng.randrange(6)

                    async def cancel() -> None:
                        for _ in range(k):
                            await anyio.lowlevel.checkpoint()
                        scope.cancel()

                    tg.start_soon(cancel)
                with contextlib.suppress(HiCacheError):  # CapacityError: L1 full of locks
                    if use_session:
                        await serve(cache, tokens)
                    else:
                        await _low_level_request(cache, tokens, op)

        with anyio.fail_after(HANG_GUARD_S):
            for _wave in range(6):
                async with anyio.create_task_group() as tg:
                    for _ in range(16):
                        tg.start_soon(one, tg)
                cache.device_tier.evict(rng.randrange(1, 30))
            await assert_settled(cache)
            assert cache.stats().transitions[Transition.LOAD].count > 0  # the path meant
            for tokens in prompts:  # still served bit-exact
                await serve(cache, tokens)
            await assert_settled(cache)
