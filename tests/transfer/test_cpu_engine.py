from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest
import torch

from hicache_async import HostLayout, KVLayout
from hicache_async.errors import IndexStateError, LayoutError, TransferError
from hicache_async.memory import DeviceKVPool, HostKVPool, pages_to_slots
from hicache_async.transfer import CpuTransferEngine, EventPoller, make_transfer_engine
from hicache_async.transfer.plan import plan_pages
from tests.transfer.conftest import MHA, MLA, alloc_slots, bits, randomize

LAYOUTS = list(HostLayout)


def make(layout: KVLayout, host_layout: HostLayout, device_pages: int = 24, **options):
    device = DeviceKVPool(layout, device_pages, device="cpu")
    host = HostKVPool(layout, 2 * device_pages, host_layout)
    return device, host, CpuTransferEngine(device, host, **options)


@pytest.mark.parametrize("layout", [MHA, MLA], ids=["mha", "mla"])
@pytest.mark.parametrize("host_layout", LAYOUTS)
@pytest.mark.parametrize("shuffle", [False, True], ids=["runs", "scattered"])
async def test_backup_then_load_is_bit_exact(layout, host_layout, shuffle) -> None:
    device, host, engine = make(layout, host_layout, inline_bytes=0)  # through the threads
    ps = layout.page_size
    src = alloc_slots(device.allocator, ps, 10, shuffle=shuffle, seed=1)
    dst_host = alloc_slots(host.allocator, ps, 10, shuffle=shuffle, seed=2)
    randomize(device.kv, seed=3)
    original = device.kv[:, :, src].clone()

    await engine.backup(src, dst_host)
    randomize(device.kv, seed=4)  # scribble L1: the load must bring everything back
    back = alloc_slots(device.allocator, ps, 10, shuffle=shuffle, seed=5)
    scribbled = device.kv.clone()
    await engine.load(dst_host, back)

    assert torch.equal(bits(device.kv[:, :, back]), bits(original))
    untouched = torch.ones(device.num_tokens, dtype=torch.bool)
    untouched[back] = False
    assert torch.equal(bits(device.kv[:, :, untouched]), bits(scribbled[:, :, untouched]))
    for i, page in enumerate((dst_host[::ps] // ps).tolist()):  # canonical page bytes on L2
        expected = torch.cat(
            [
                bits(original[layer, plane, i * ps : (i + 1) * ps]).reshape(-1)
                for layer in range(layout.num_layers)
                for plane in range(layout.kv_planes)
            ]
        )
        assert torch.equal(host.get_data_page(page), expected)
    assert engine.stats.backups == engine.stats.loads == 1


def test_plans_coalesce_runs_and_fall_back_to_index_ops() -> None:
    src = torch.tensor([4, 5, 6, 9, 10, 2], dtype=torch.int64)
    dst = torch.tensor([0, 1, 2, 3, 7, 8], dtype=torch.int64)
    plan = plan_pages(src, dst, bytes_per_page=1 << 20)
    assert plan.runs == ((4, 0, 3), (9, 3, 1), (10, 7, 1), (2, 8, 1))
    assert [c.num_pages for c in plan.chunks(2)] == [2, 2, 2]
    assert sum(n for c in plan.chunks(2) for *_, n in c.runs or ()) == 6
    scattered = torch.randperm(64)
    assert plan_pages(scattered, torch.arange(64), bytes_per_page=64).runs is None
    assert len(plan_pages(scattered, torch.arange(64), 64).chunks(10)) == 7
    assert plan_pages(torch.arange(0), torch.arange(0), 64).runs == ()


async def test_small_chunks_and_empty_transfers() -> None:
    device, host, engine = make(MHA, HostLayout.PAGE_FIRST, chunk_bytes=1)
    src = alloc_slots(device.allocator, 4, 7, shuffle=True)
    dst = alloc_slots(host.allocator, 4, 7, shuffle=False)
    randomize(device.kv, seed=7)
    await engine.backup(src, dst)
    for i, page in enumerate((dst[::4] // 4).tolist()):
        assert torch.equal(bits(host.buffer[page]), bits(device.kv[:, :, src[4 * i : 4 * i + 4]]))
    empty = torch.empty(0, dtype=torch.int64)
    await engine.backup(empty, empty)
    await engine.load(empty, empty)


@pytest.mark.parametrize("host_layout", LAYOUTS)
async def test_backup_pages_equals_backup_of_their_slots(host_layout) -> None:
    """The page-table entry point copies what the slot one copies, and checks the same."""
    device, host, engine = make(MHA, host_layout)
    ps = MHA.page_size
    src = alloc_slots(device.allocator, ps, 6, shuffle=True, seed=11)
    by_slots = alloc_slots(host.allocator, ps, 6, shuffle=True, seed=12)
    by_pages = alloc_slots(host.allocator, ps, 6, shuffle=True, seed=13)
    randomize(device.kv, seed=14)
    await engine.backup(src, by_slots)
    await engine.backup_pages(src[::ps] // ps, by_pages[::ps] // ps)
    for a, b in zip((by_slots[::ps] // ps).tolist(), (by_pages[::ps] // ps).tolist(), strict=True):
        assert torch.equal(host.get_data_page(a), host.get_data_page(b))
    pages = src[::ps] // ps
    with pytest.raises(LayoutError, match="equally many"):
        await engine.backup_pages(pages, pages[:2])
    with pytest.raises(LayoutError, match="1-D int64"):
        await engine.backup_pages(pages.int(), by_pages[::ps] // ps)
    with pytest.raises(IndexStateError, match="not allocated"):
        await engine.backup_pages(pages[:2], torch.tensor([40, 41]))


async def test_bad_slots_are_rejected_at_the_edge() -> None:
    device, host, engine = make(MHA, HostLayout.LAYER_FIRST)
    src = alloc_slots(device.allocator, 4, 2, shuffle=False)
    dst = alloc_slots(host.allocator, 4, 2, shuffle=False)
    with pytest.raises(LayoutError, match="equally many"):
        await engine.backup(src, dst[:4])
    with pytest.raises(LayoutError, match="whole"):
        await engine.backup(src[1:5], dst[:4])
    with pytest.raises(IndexStateError, match="not allocated"):
        await engine.backup(src, pages_to_slots(torch.tensor([40, 41]), 4))
    with pytest.raises(IndexStateError, match="host pages"):
        await engine.load(pages_to_slots(torch.tensor([0, 1]), 4) + 4 * 30, src)
    other = HostKVPool(MLA, 4)
    with pytest.raises(LayoutError, match="differs"):
        CpuTransferEngine(device, other)


async def test_factory_picks_the_cpu_engine() -> None:
    device, host, _ = make(MHA, HostLayout.PAGE_FIRST)
    async with EventPoller.open() as poller:
        engine = make_transfer_engine(device, host, poller, io_backend="kernel", threads=1)
        assert isinstance(engine, CpuTransferEngine)
        assert engine.limiter.total_tokens == 1
        with pytest.raises(ValueError, match="bogus"):
            make_transfer_engine(device, host, poller, io_backend="bogus")


@pytest.mark.parametrize("host_layout", LAYOUTS)
@pytest.mark.parametrize("inline_bytes", [0, 1 << 20], ids=["threads", "inline"])
async def test_layers_become_ready_in_order(host_layout, inline_bytes) -> None:
    device, host, engine = make(
        MHA, host_layout, min_layer_group_bytes=0, run_call_bytes=0, inline_bytes=inline_bytes
    )
    src_host = alloc_slots(host.allocator, 4, 6, shuffle=True)
    dst = alloc_slots(device.allocator, 4, 6, shuffle=True)
    randomize(host.buffer, seed=8)
    expected = torch.stack([host.get_data_page(p) for p in (src_host[::4] // 4).tolist()])
    seen: list[int] = []
    async with engine.load_layers(src_host, dst) as ticket:
        for layer in range(MHA.num_layers):
            await ticket.layer_ready(layer)
            assert all(ticket.is_layer_ready(j) for j in range(layer + 1))
            if inline_bytes and layer == 0:  # one layer per step: layer 2 is still to come
                assert not ticket.is_layer_ready(2)
            seen.append(layer)
            got = device.kv[layer, :, dst].reshape(2, 6, -1).transpose(0, 1)
            per_layer = MHA.bytes_per_page_per_layer
            want = expected[:, layer * per_layer : (layer + 1) * per_layer]
            assert torch.equal(bits(got).reshape(6, -1), want)
        with pytest.raises(LayoutError):
            await ticket.layer_ready(MHA.num_layers)
    assert seen == [0, 1, 2]
    await engine.layer_ready(2)  # nothing in flight: returns at once


async def test_engine_layer_ready_waits_for_every_load_in_flight() -> None:
    device, host, engine = make(
        MHA, HostLayout.PAGE_FIRST, min_layer_group_bytes=0, run_call_bytes=0
    )
    a_host, b_host = (alloc_slots(host.allocator, 4, 3, shuffle=False) for _ in range(2))
    a_dev, b_dev = (alloc_slots(device.allocator, 4, 3, shuffle=False) for _ in range(2))
    async with engine.load_layers(a_host, a_dev) as a, engine.load_layers(b_host, b_dev) as b:
        await engine.layer_ready(1)
        assert a.is_layer_ready(1)
        assert b.is_layer_ready(1)
    assert engine.stats.loads == 2
    await engine.layer_ready(2)


async def test_cancelled_backup_finishes_the_chunk_in_flight_and_leaks_nothing() -> None:
    layout = KVLayout(num_layers=8, num_kv_heads=8, head_dim=128, page_size=16)  # 512 KiB/page
    device, host, engine = make(
        layout, HostLayout.PAGE_FIRST, device_pages=128, chunk_bytes=8 << 20
    )
    start = (device.allocator.available, host.allocator.available)
    randomize(device.kv, seed=9)
    src = alloc_slots(device.allocator, 16, 128, shuffle=False)
    dst = alloc_slots(host.allocator, 16, 128, shuffle=False)
    host.buffer.zero_()
    committed = False

    async def cancel_once_copying(scope: anyio.CancelScope) -> None:
        while engine.limiter.borrowed_tokens == 0:  # until the first chunk's thread runs
            await anyio.lowlevel.checkpoint()
        scope.cancel()

    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(cancel_once_copying, scope)
            try:  # reserve -> move -> commit, or roll back
                await engine.backup(src, dst)
                committed = True
            finally:
                if not committed:
                    # The thread is done: nothing writes the host pages once backup() left.
                    snapshot = host.buffer.clone()
                    with anyio.CancelScope(shield=True):
                        await anyio.sleep(0.02)
                    assert torch.equal(bits(host.buffer), bits(snapshot))
                device.allocator.free(src[::16] // 16)
                host.allocator.free(dst[::16] // 16)
    assert scope.cancelled_caught
    assert not committed
    assert engine.limiter.borrowed_tokens == 0
    assert engine.stats.cancelled == 1
    # The chunk in flight (8 MiB thread calls, 64 MiB in all) was not cut short: every page
    # is either fully copied or untouched.
    copied = [
        torch.equal(bits(host.buffer[i]), bits(device.kv[:, :, src[16 * i : 16 * i + 16]]))
        for i in range(128)
    ]
    untouched = [not bool(bits(host.buffer[i]).any()) for i in range(128)]
    assert all(c or u for c, u in zip(copied, untouched, strict=True))
    assert any(copied)
    assert (device.allocator.available, host.allocator.available) == start


async def test_cancelled_load_stops_between_layers_and_leaves_nothing_running() -> None:
    layout = KVLayout(num_layers=16, num_kv_heads=8, head_dim=128, page_size=16)
    device, host, engine = make(
        layout, HostLayout.LAYER_FIRST, device_pages=64, min_layer_group_bytes=0, run_call_bytes=0
    )
    start = (device.allocator.available, host.allocator.available)
    src = alloc_slots(host.allocator, 16, 64, shuffle=True)
    dst = alloc_slots(device.allocator, 16, 64, shuffle=True)
    tickets = []
    with anyio.CancelScope() as scope:
        async with engine.load_layers(src, dst) as ticket:
            tickets.append(ticket)
            await ticket.layer_ready(0)
            scope.cancel()  # while later layers still copy
            await ticket.done()
    assert scope.cancelled_caught
    assert engine.limiter.borrowed_tokens == 0
    assert not engine._inflight
    ticket = tickets[0]
    ready = sum(ticket.is_layer_ready(i) for i in range(16))
    assert ready < 16
    with pytest.raises(TransferError, match="cancelled"):
        await ticket.done()
    await engine.layer_ready(15)  # a cancelled load does not block the batch
    device.allocator.free(dst[::16] // 16)
    host.allocator.free(src[::16] // 16)
    assert (device.allocator.available, host.allocator.available) == start


async def test_a_failing_copy_is_a_transfer_error(monkeypatch) -> None:
    device, host, engine = make(MHA, HostLayout.PAGE_FIRST)
    src = alloc_slots(device.allocator, 4, 2, shuffle=False)
    dst = alloc_slots(host.allocator, 4, 2, shuffle=False)

    def boom(*args, **kwargs) -> None:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("hicache_async.transfer.cpu.copy_pages", boom)
    with pytest.raises(TransferError, match="disk on fire"):
        await engine.backup(src, dst)
    with pytest.raises(TransferError, match="failed"):
        await engine.load(dst, src)
    assert engine.stats.failed == 2
    assert not engine._inflight


async def test_concurrent_backups_share_the_limiter() -> None:
    layout = KVLayout(num_layers=4, num_kv_heads=8, head_dim=128, page_size=16)  # 256 KiB/page
    device, host, engine = make(layout, HostLayout.PAGE_FIRST, device_pages=32, threads=2)
    randomize(device.kv, seed=10)
    jobs = [
        (
            alloc_slots(device.allocator, 16, 8, shuffle=True, seed=i),
            alloc_slots(host.allocator, 16, 8, shuffle=True, seed=i + 10),
        )
        for i in range(4)
    ]
    async with anyio.create_task_group() as tg:
        for src, dst in jobs:
            tg.start_soon(engine.backup, src, dst)
    for src, dst in jobs:
        for i, page in enumerate((dst[::16] // 16).tolist()):
            want = device.kv[:, :, src[16 * i : 16 * i + 16]]
            assert torch.equal(bits(host.buffer[page]), bits(want))
    stats = engine.statistics()
    assert stats["loads_in_flight"] == 0
    assert stats["backups"] == 4
    assert stats["backup_bytes"] == 32 * layout.bytes_per_page
    assert engine.limiter.borrowed_tokens == 0


async def test_an_error_inside_load_layers_comes_out_unwrapped_and_leaves_no_copy() -> None:
    device, host, engine = make(MHA, HostLayout.PAGE_FIRST, inline_bytes=0)
    src = alloc_slots(host.allocator, 4, 4, shuffle=False)
    dst = alloc_slots(device.allocator, 4, 4, shuffle=False)

    async def model_fails() -> None:
        async with engine.load_layers(src, dst) as ticket:
            await ticket.layer_ready(0)
            raise ValueError("model failed")

    with pytest.raises(ValueError, match="model failed"):
        await model_fails()
    assert engine.limiter.borrowed_tokens == 0
    assert not engine._inflight
