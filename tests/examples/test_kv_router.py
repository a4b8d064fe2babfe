"""The router example follows two publishers, recovering a gap through replay."""

from __future__ import annotations

import anyio
import zmq

from hicache_async.config import KVEventsConfig
from hicache_async.events import BlockRemoved, BlockStored, EventHub, StorageMedium
from hicache_async.kv_publisher import ZmqEventPublisher
from hicache_async.radix import page_hashes

from .conftest import load_example

router = load_example("kv_router")
LOOPBACK = KVEventsConfig(endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
PS = 4


def stored(tokens: list[int], medium: StorageMedium) -> BlockStored:
    return BlockStored(tuple(page_hashes(tokens, PS)), None, tuple(tokens), PS, medium)


async def test_index_follows_two_workers_and_replays_a_gap() -> None:
    prompt = list(range(16))  # four pages
    hub_a, hub_b = EventHub(), EventHub()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with (
            ZmqEventPublisher.open(LOOPBACK, hub_a) as pub_a,
            ZmqEventPublisher.open(LOOPBACK, hub_b) as pub_b,
        ):
            assert pub_a.replay_endpoint is not None
            assert pub_b.replay_endpoint is not None
            # Worker B publishes before anyone listens: the router must replay it.
            hub_b.emit([stored(prompt[:8], StorageMedium.GPU)])
            with anyio.fail_after(30):
                while pub_b.published < 1:  # noqa: ASYNC110 - the pump is another task
                    await anyio.sleep(0.01)
            a = router.Worker("a", pub_a.endpoint, pub_a.replay_endpoint)
            b = router.Worker("b", pub_b.endpoint, pub_b.replay_endpoint)
            index = router.PrefixIndex([a, b], page_size=PS)
            async with anyio.create_task_group() as tg:
                tg.start_soon(router.follow, index, a, context)
                tg.start_soon(router.follow, index, b, context)
                await anyio.sleep(0.3)  # subscriptions reach the publishers
                hub_a.emit([stored(prompt, StorageMedium.GPU)])
                hub_a.emit([stored(prompt, StorageMedium.CPU_PINNED)])
                hub_a.emit([BlockRemoved(tuple(page_hashes(prompt, PS)[2:]), StorageMedium.GPU)])
                hub_b.emit([stored(prompt, StorageMedium.DISK)])
                with anyio.fail_after(30):
                    while a.next_seq < 3 or b.next_seq < 2:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
            assert b.replays == 1  # the batch sent before the router joined came by replay
            scores = index.score(prompt)
            assert scores["a"] == {"GPU": 2, "CPU": 4}  # vLLM's medium names (the default)
            assert scores["b"] == {"GPU": 2, "STORAGE": 4}
    finally:
        context.term()


async def test_a_gap_the_replay_buffer_no_longer_holds_resets_the_worker() -> None:
    """A router joining after more batches than the buffer keeps cannot replay them all: it
    forgets the worker's state and follows on (it used to discard every later batch)."""
    prompt = list(range(16))
    hub = EventHub()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    small = LOOPBACK.model_copy(update={"buffer_steps": 2})
    try:
        async with ZmqEventPublisher.open(small, hub) as pub:
            assert pub.replay_endpoint is not None
            for i in range(6):  # more than the buffer holds, before anyone listens
                hub.emit([stored([1000 + 4 * i + k for k in range(4)], StorageMedium.GPU)])
            with anyio.fail_after(30):
                while pub.published < 6:  # noqa: ASYNC110 - the pump is another task
                    await anyio.sleep(0.01)
            worker = router.Worker("w", pub.endpoint, pub.replay_endpoint)
            index = router.PrefixIndex([worker], page_size=PS)
            async with anyio.create_task_group() as tg:
                tg.start_soon(router.follow, index, worker, context)
                await anyio.sleep(0.3)  # the subscription reaches the publisher
                hub.emit([stored(prompt, StorageMedium.GPU)])
                hub.emit([stored(prompt, StorageMedium.CPU_PINNED)])
                with anyio.fail_after(30):
                    while worker.next_seq < 8:  # noqa: ASYNC110
                        await anyio.sleep(0.01)
                tg.cancel_scope.cancel()
            assert worker.lost == 1
            assert index.score(prompt)["w"] == {"GPU": 4, "CPU": 4}
    finally:
        context.term()
