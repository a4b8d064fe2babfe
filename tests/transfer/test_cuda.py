"""The CUDA transfer engine: copy streams, events awaited through the poller (needs a GPU)."""

from __future__ import annotations

import time

import anyio
import pytest
import torch

from hicache_async import HostLayout, KVLayout
from hicache_async.errors import LayoutError
from hicache_async.memory import DeviceKVPool, HostKVPool
from hicache_async.transfer import EventPoller, make_transfer_engine
from tests.transfer.conftest import MHA, MLA, alloc_slots, bits, randomize

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LAYOUTS = list(HostLayout)
BIG = KVLayout(num_layers=16, num_kv_heads=8, head_dim=128, page_size=16)  # 1 MiB per page


def pools(layout: KVLayout, host_layout: HostLayout, pages: int = 24):
    device = DeviceKVPool(layout, pages, device="cuda")
    host = HostKVPool(layout, 2 * pages, host_layout)
    assert host.pinned
    return device, host


def gpu_sleep(ms: float) -> None:
    """Keep the current stream busy for about ``ms`` milliseconds."""
    torch.cuda._sleep(int(ms * 1e-3 * 1.5e9))  # ~1.5 GHz; only a lower bound matters here


@pytest.mark.parametrize("layout", [MHA, MLA], ids=["mha", "mla"])
@pytest.mark.parametrize("host_layout", LAYOUTS)
@pytest.mark.parametrize("shuffle", [False, True], ids=["runs", "scattered"])
async def test_cuda_round_trip_is_bit_exact(layout, host_layout, shuffle) -> None:
    from hicache_async.transfer.cuda import CudaTransferEngine

    device, host = pools(layout, host_layout)
    ps = layout.page_size
    async with EventPoller.open() as poller:
        engine = make_transfer_engine(device, host, poller)
        assert isinstance(engine, CudaTransferEngine)
        assert engine.backup_stream != torch.cuda.current_stream()
        assert engine.load_stream != engine.backup_stream
        src = alloc_slots(device.allocator, ps, 10, shuffle=shuffle, seed=1).cuda()
        dst_host = alloc_slots(host.allocator, ps, 10, shuffle=shuffle, seed=2)
        randomize(device.kv, seed=3)
        original = device.kv[:, :, src].clone()
        await engine.backup(src, dst_host)
        randomize(device.kv, seed=4)
        back = alloc_slots(device.allocator, ps, 10, shuffle=shuffle, seed=5).cuda()
        scribbled = device.kv.clone()
        await engine.load(dst_host, back)
        torch.cuda.current_stream().synchronize()  # test only: compare on the host
        assert torch.equal(bits(device.kv[:, :, back]).cpu(), bits(original).cpu())
        untouched = torch.ones(device.num_tokens, dtype=torch.bool, device="cuda")
        untouched[back] = False
        assert torch.equal(bits(device.kv[:, :, untouched]), bits(scribbled[:, :, untouched]))
        for i, page in enumerate((dst_host[::ps] // ps).tolist()):
            expected = torch.cat(
                [
                    bits(original[layer, plane, i * ps : (i + 1) * ps]).reshape(-1).cpu()
                    for layer in range(layout.num_layers)
                    for plane in range(layout.kv_planes)
                ]
            )
            assert torch.equal(host.get_data_page(page), expected)


async def test_backup_sees_what_the_model_just_wrote() -> None:
    device, host = pools(MHA, HostLayout.PAGE_FIRST)
    async with EventPoller.open() as poller:
        engine = make_transfer_engine(device, host, poller)
        slots = alloc_slots(device.allocator, 4, 2, shuffle=False)
        dst = alloc_slots(host.allocator, 4, 2, shuffle=False)
        k = torch.randn(8, 2, 4, device="cuda").to(torch.bfloat16)
        on_gpu = slots.cuda()  # before the sleep: a pageable upload would wait for it
        gpu_sleep(20)  # the write below lands late on the compute stream
        device.set_kv_buffer(0, on_gpu, k, k)
        began = time.perf_counter()
        await engine.backup(slots, dst)  # the backup stream waits for the compute stream
        assert time.perf_counter() - began > 0.005  # it waited for the write, on the GPU
        pages = (dst[::4] // 4).tolist()
        got = torch.cat([host.buffer[p, 0, 0] for p in pages])
        assert torch.equal(bits(got), bits(k.cpu()))


@pytest.mark.parametrize("host_layout", LAYOUTS)
async def test_cuda_layers_become_ready_in_order(host_layout) -> None:
    device, host = pools(BIG, host_layout, pages=64)
    async with EventPoller.open() as poller:
        engine = make_transfer_engine(device, host, poller)
        # Runs, not scattered pages: a scattered layer_first load enqueues one copy per page,
        # layer and plane (2048 here), which takes longer on the host than the copies take on
        # the GPU, so every layer would be ready before the first check (see RESULTS.md).
        src = alloc_slots(host.allocator, 16, 64, shuffle=False)
        dst = alloc_slots(device.allocator, 16, 64, shuffle=False)  # CPU slots: no stream sync
        randomize(host.buffer, seed=6)
        pages = (src[::16] // 16).tolist()
        expected = torch.stack([host.get_data_page(p) for p in pages])  # [64, page bytes]
        per_layer = BIG.bytes_per_page_per_layer
        seen = []
        gpu_sleep(50)  # the load stream starts after this: layers cannot all be ready at once
        async with engine.load_layers(src, dst) as ticket:
            assert not ticket.is_layer_ready(BIG.num_layers - 1)
            for layer in range(BIG.num_layers):
                await ticket.layer_ready(layer)
                assert all(ticket.is_layer_ready(j) for j in range(layer + 1))
                seen.append(layer)
                # The host saw the event: work queued from now on sees the layer.
                got = device.kv[layer, :, dst.cuda()].reshape(2, 64, -1).transpose(0, 1)
                want = expected[:, layer * per_layer : (layer + 1) * per_layer]
                assert torch.equal(bits(got.contiguous()).reshape(64, -1).cpu(), want)
            await engine.layer_ready(BIG.num_layers - 1)
        assert seen == list(range(BIG.num_layers))
        assert engine.load_stream.query()


async def test_compute_stream_can_wait_for_a_layer_on_the_gpu() -> None:
    device, host = pools(BIG, HostLayout.LAYER_FIRST, pages=16)
    async with EventPoller.open() as poller:
        engine = make_transfer_engine(device, host, poller)
        src = alloc_slots(host.allocator, 16, 16, shuffle=False)
        dst = alloc_slots(device.allocator, 16, 16, shuffle=False)
        randomize(host.buffer, seed=7)
        async with engine.load_layers(src, dst) as ticket:
            torch.cuda.current_stream().wait_event(ticket.events[3])  # no host wait at all
            copy = device.kv[3, :, dst].clone()
            torch.cuda.current_stream().synchronize()
        want = host.buffer[3, :, src].contiguous()
        assert torch.equal(bits(copy.cpu()), bits(want))


async def test_cancelled_cuda_backup_waits_for_its_copy() -> None:
    device, host = pools(BIG, HostLayout.PAGE_FIRST, pages=128)
    start = (device.allocator.available, host.allocator.available)
    async with EventPoller.open() as poller:
        engine = make_transfer_engine(device, host, poller)
        randomize(device.kv, seed=8)
        src = alloc_slots(device.allocator, 16, 128, shuffle=True)  # CPU slots: no stream sync
        dst = alloc_slots(host.allocator, 16, 128, shuffle=False)
        host.buffer.zero_()
        expected = device.kv[:, :, src.cuda()].clone()
        gpu_sleep(50)  # the copy cannot even start before the deadline below
        began = time.perf_counter()
        committed = False
        with anyio.move_on_after(0.001) as scope:
            try:
                await engine.backup(src, dst)
                committed = True
            finally:
                if not committed:  # roll back: the copy is over, so the pages may be reused
                    assert engine.backup_stream.query()
                    device.allocator.free(src[::16] // 16)
                    host.allocator.free(dst[::16] // 16)
        assert scope.cancelled_caught
        assert not committed
        assert time.perf_counter() - began > 0.02  # it waited (shielded) for the GPU
        assert engine.stats.cancelled == 1
        # A GPU copy cannot be stopped half-way: it ran to the end, whole.
        for i, page in enumerate((dst[::16] // 16).tolist()):
            block = expected[:, :, 16 * i : 16 * i + 16].cpu()
            assert torch.equal(bits(host.buffer[page]), bits(block))
        assert (device.allocator.available, host.allocator.available) == start
        assert poller.pending == 0


async def test_cancelled_cuda_load_waits_for_every_layer() -> None:
    device, host = pools(BIG, HostLayout.LAYER_FIRST, pages=64)
    async with EventPoller.open() as poller:
        engine = make_transfer_engine(device, host, poller)
        src = alloc_slots(host.allocator, 16, 64, shuffle=False)  # runs: a quick enqueue
        dst = alloc_slots(device.allocator, 16, 64, shuffle=False)
        gpu_sleep(50)
        tickets = []
        with anyio.move_on_after(0.001) as scope:
            async with engine.load_layers(src, dst) as ticket:
                tickets.append(ticket)
                await ticket.done()
        assert scope.cancelled_caught
        assert all(tickets[0].is_layer_ready(i) for i in range(BIG.num_layers))
        assert engine.load_stream.query()
        assert not engine._inflight
        assert poller.pending == 0


async def test_cuda_engine_needs_pinned_host_memory() -> None:
    from hicache_async.transfer.cuda import CudaTransferEngine

    device = DeviceKVPool(MHA, 4, device="cuda")
    host = HostKVPool(MHA, 8, pin_memory=False)
    async with EventPoller.open() as poller:
        with pytest.raises(LayoutError, match="pinned"):
            CudaTransferEngine(device, host, poller)


async def test_poller_awaits_real_cuda_events() -> None:
    async with EventPoller.open() as poller:
        stream = torch.cuda.Stream()
        event = torch.cuda.Event()
        with torch.cuda.stream(stream):
            gpu_sleep(20)
            event.record(stream)
        assert not event.query()
        await poller.wait(event)
        assert event.query()
        assert poller.completions >= 1
