"""The loop-agnostic parts also run on trio (through anyio); the rest of the suite runs on
asyncio and uvloop."""

from __future__ import annotations

import anyio
import zmq

from hicache_async.config import KVEventsConfig
from hicache_async.events import BlockRemoved, EventHub, StorageMedium
from hicache_async.kv_publisher import END_SEQ, ZmqEventPublisher

REMOVED = BlockRemoved(("ab" * 32,), StorageMedium.GPU)


def test_event_hub_on_trio() -> None:
    async def main() -> int:
        hub = EventHub()
        async with hub.subscribe(max_batches=4) as stream:
            for _ in range(6):
                hub.emit([REMOVED])
            hub.close()
            seen = [batch async for batch in stream]
            assert stream.dropped == 2
        return len(seen)

    assert anyio.run(main, backend="trio") == 4


def test_zmq_replay_on_trio() -> None:
    async def main() -> list[int]:
        hub = EventHub()
        config = KVEventsConfig(endpoint="tcp://127.0.0.1:*", replay_endpoint="tcp://127.0.0.1:*")
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        try:
            async with ZmqEventPublisher.open(config, hub) as publisher:
                for _ in range(3):
                    hub.emit([REMOVED])
                with anyio.fail_after(30):
                    while publisher.published < 3:  # noqa: ASYNC110 - the pump is another task
                        await anyio.sleep(0.01)
                assert publisher.replay_endpoint is not None
                dealer = context.socket(zmq.DEALER)
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.connect(publisher.replay_endpoint)
                dealer.send_multipart([b"", (1).to_bytes(8, "big")])
                seqs = []
                with anyio.fail_after(30):
                    while True:
                        try:
                            frames = dealer.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            await anyio.sleep(0.005)
                            continue
                        if frames[2] == END_SEQ:
                            break
                        seqs.append(int.from_bytes(frames[2], "big"))
                dealer.close()
        finally:
            context.term()
        return seqs

    assert anyio.run(main, backend="trio") == [1, 2]
