"""A KV-aware router's view of several caches, built from their KV events.

Each cache publishes KV events over ZMQ (``KVEventsConfig``). This subscriber keeps, per worker
and per storage medium, the set of block hashes it holds, and scores a prompt by how many of
its leading pages each worker holds on each tier, which is what a router uses to send the
request where its prefix lives. Sequence gaps (a subscriber that joined late or lost messages
at the high-water mark) are recovered from the worker's replay socket; a gap the replay buffer
no longer holds resets what the router knows of that worker.

Run it beside caches started with ``kv_events=KVEventsConfig(endpoint=..., replay_endpoint=...)``:

    python examples/kv_router.py tcp://127.0.0.1:5557,tcp://127.0.0.1:5558 ...

(one ``live,replay`` endpoint pair per worker).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
import zmq

from hicache_async.events import hash_to_int64
from hicache_async.kv_publisher import END_SEQ, decode_batch
from hicache_async.radix import page_hashes


@dataclass
class Worker:
    """One cache: its live PUB endpoint, its replay endpoint, and what it holds."""

    name: str
    endpoint: str
    replay_endpoint: str
    next_seq: int = 0
    blocks: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    replays: int = 0
    lost: int = 0  # gaps replay could not fill (the worker's state was reset)


class PrefixIndex:
    """Per-worker, per-medium block sets, kept up to date from KV event batches."""

    def __init__(self, workers: Sequence[Worker], *, page_size: int) -> None:
        self.workers = {w.name: w for w in workers}
        self.page_size = page_size

    def apply(self, worker: Worker, payload: bytes) -> None:
        """Apply one batch of ``worker``'s events."""
        _, events, _ = decode_batch(payload)
        for event in events:
            kind = event["type"]
            if kind == "BlockStored":
                worker.blocks[event["medium"]].update(event["block_hashes"])
            elif kind == "BlockRemoved":
                worker.blocks[event["medium"]].difference_update(event["block_hashes"])
            elif kind == "AllBlocksCleared":
                media = [event["medium"]] if event.get("medium") else list(worker.blocks)
                for medium in media:
                    worker.blocks[medium].clear()

    def score(
        self, tokens: Sequence[int], extra_key: str | None = None
    ) -> dict[str, dict[str, int]]:
        """For each worker and medium: how many leading pages of ``tokens`` it holds."""
        hashes = [hash_to_int64(h) for h in page_hashes(list(tokens), self.page_size, extra_key)]
        scores: dict[str, dict[str, int]] = {}
        for name, worker in self.workers.items():
            scores[name] = {}
            for medium, held in worker.blocks.items():
                count = 0
                for h in hashes:
                    if h not in held:
                        break
                    count += 1
                scores[name][medium] = count
        return scores


async def _recv(socket: zmq.Socket[bytes]) -> list[bytes]:
    while True:
        try:
            return socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            await anyio.sleep(0.002)


async def follow(
    index: PrefixIndex, worker: Worker, context: zmq.Context[zmq.Socket[bytes]]
) -> None:
    """Apply ``worker``'s batches in sequence order forever, replaying any gap."""
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(worker.endpoint)
    replay = context.socket(zmq.DEALER)
    replay.setsockopt(zmq.LINGER, 0)
    replay.connect(worker.replay_endpoint)
    try:
        while True:
            _, seq_bytes, payload = await _recv(sub)
            seq = int.from_bytes(seq_bytes, "big")
            if seq > worker.next_seq:  # missed some: fetch them from the replay buffer
                await _replay(index, worker, replay, upto=seq)
                if worker.next_seq < seq:
                    # Lost for good (older than the replay buffer, or dropped by a full
                    # publisher queue): what the worker holds is unknown, so forget it and
                    # follow on from here (routing then underestimates, never misroutes).
                    worker.lost += 1
                    worker.blocks.clear()
                    worker.next_seq = seq
            if seq == worker.next_seq:
                index.apply(worker, payload)
                worker.next_seq += 1
    finally:
        sub.close()
        replay.close()


async def _replay(index: PrefixIndex, worker: Worker, socket: zmq.Socket[bytes], upto: int) -> None:
    worker.replays += 1
    socket.send_multipart([b"", worker.next_seq.to_bytes(8, "big")])
    while True:
        frames = await _recv(socket)
        if frames[2] == END_SEQ:
            return
        seq = int.from_bytes(frames[2], "big")
        if seq == worker.next_seq and seq < upto:
            index.apply(worker, frames[3])
            worker.next_seq += 1


async def main(argv: Sequence[str]) -> None:  # pragma: no cover - manual use
    workers = []
    for i, pair in enumerate(argv):
        live, replay = pair.split(",")
        workers.append(Worker(f"worker{i}", live, replay))
    index = PrefixIndex(workers, page_size=16)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        async with anyio.create_task_group() as tg:
            for worker in workers:
                tg.start_soon(follow, index, worker, context)
            while True:
                await anyio.sleep(5)
                for worker in workers:
                    sizes = {m: len(b) for m, b in worker.blocks.items()}
                    print(worker.name, sizes, "replays:", worker.replays)
    finally:
        context.term()


if __name__ == "__main__":  # pragma: no cover
    anyio.run(main, sys.argv[1:])
