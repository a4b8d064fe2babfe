"""Side by side with SGLang's RadixCache, interleaved per request, in one process.

``shared/peers/bench_radix.py`` replays one implementation after the other, and on a shared,
noisy VM the position in the process (heap growth, first-touch page faults, neighbours' jobs)
moved figures by up to 6x between runs. Here every request is matched and inserted by both
implementations back to back (rotating which goes first), so both see the same machine state;
the per-op ratio is the figure to trust. ``--impls`` with one name interleaves only that
implementation's page sizes (its standalone figures, without the other's cache pollution);
``hicache_async_slots`` is our adapter with per-token hit slots built on every match,
``hicache_async_pages`` inserts through ``insert_pages`` as the session commits (see
``peers_adapter.py``).

``--capacity-tokens N`` bounds every tree as a server's KV pool does: after each insert it
evicts (LRU) down to N tokens, timed as ``evict``, and ``request`` is match + insert + evict.
SGLang's ``evict`` heapifies all its evictable leaves on every call and takes whole leaves (so
it may take more than asked and then skip a few calls); ours pops a heap of leaves and takes
exactly the pages asked for, splitting the last leaf. Without it the trees grow unbounded (the
peers harness's replay), so every stored byte is fresh memory.
Run it with the peers venv:

    PYTHONPATH=. $PEERS_VENV/bin/python benchmarks/bench_radix_interleaved.py \
        --peers-dir ../shared/peers --page-sizes 16,1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers-dir", required=True)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--page-sizes", default="16,1")
    ap.add_argument("--impls", default="sglang,hicache_async", help="one or both")
    ap.add_argument("--block-tokens", type=int, default=512)
    ap.add_argument("--max-requests", type=int, default=0)
    ap.add_argument("--capacity-tokens", type=int, default=0, help="0: unbounded")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    sys.path.insert(0, a.peers_dir)
    import bench_radix as br  # the peers harness: its trace loader and SGLang adapter
    import torch

    from benchmarks.peers_adapter import make_cache, make_cache_pages, make_cache_slots

    ns = argparse.Namespace(
        trace=a.trace or f"{a.peers_dir}/../data/mooncake_fast25_conversation_trace.jsonl",
        block_tokens=a.block_tokens,
        max_requests=a.max_requests,
        insert_output=False,
    )
    reqs = br.load_trace(ns, None)
    values = torch.arange(max(len(f) for _, f in reqs), dtype=torch.int64)
    makers = {
        "sglang": br.SGLangRadix,
        "hicache_async": make_cache,
        "hicache_async_slots": make_cache_slots,
        "hicache_async_pages": make_cache_pages,
    }
    load0 = os.getloadavg()
    combos = [(i, int(p)) for i in a.impls.split(",") for p in a.page_sizes.split(",")]
    caches = [makers[i](p) for i, p in combos]
    cap = a.capacity_tokens
    evictors = [_evictor(c, cap) for c in caches] if cap else [_no_evict] * len(combos)
    t: list[dict[str, list[float]]] = [{"match": [], "insert": [], "evict": []} for _ in combos]
    hits = [0] * len(combos)
    pc = time.perf_counter
    for n, (prompt, full) in enumerate(reqs):
        for j in range(len(combos)):  # rotate who goes first
            k = (j + n) % len(combos)
            c = caches[k]
            t0 = pc()
            hits[k] += c.match(prompt)
            t1 = pc()
            c.insert(full, values[: len(full)])
            t2 = pc()
            evictors[k]()
            t3 = pc()
            t[k]["match"].append(t1 - t0)
            t[k]["insert"].append(t2 - t1)
            t[k]["evict"].append(t3 - t2)
    rows: list[dict[str, Any]] = []
    for k, (name, ps) in enumerate(combos):
        m, ins, ev = t[k]["match"], t[k]["insert"], t[k]["evict"]
        rows.append(
            {
                "impl": name,
                "page": ps,
                "requests": len(reqs),
                "capacity_tokens": cap,
                "match_us_mean": sum(m) / len(m) * 1e6,
                "match_us_median": statistics.median(m) * 1e6,
                "insert_us_mean": sum(ins) / len(ins) * 1e6,
                "insert_us_median": statistics.median(ins) * 1e6,
                "match_ops_s": len(m) / sum(m),
                "insert_ops_s": len(ins) / sum(ins),
                "evict_us_mean": sum(ev) / len(ev) * 1e6,
                "evict_us_median": statistics.median(ev) * 1e6,
                "request_us_mean": (sum(m) + sum(ins) + sum(ev)) / len(m) * 1e6,
                "hit_tokens": hits[k],
                "hit_ratio_tokens": hits[k] / sum(len(p) for p, _ in reqs),
            }
        )
    for r in rows:  # same-run ratios against sglang at the same page size, when it ran
        sg = [x for x in rows if x["impl"] == "sglang" and x["page"] == r["page"]]
        if sg and r["impl"] != "sglang":
            if not cap:  # bounded trees evict differently (see above): their hits may differ
                assert r["hit_tokens"] == sg[0]["hit_tokens"], (r, sg[0])
            for key in ("match_ops_s", "insert_ops_s"):
                r[f"{key}_x_sglang"] = r[key] / sg[0][key]
            for key in ("match_us_median", "insert_us_median", "request_us_mean"):
                r[f"{key}_x_sglang"] = sg[0][key] / r[key]
    cols = [
        "impl",
        "page",
        "match_us_mean",
        "match_us_median",
        "match_ops_s",
        "insert_us_mean",
        "insert_us_median",
        "insert_ops_s",
        "match_ops_s_x_sglang",
        "insert_ops_s_x_sglang",
        "match_us_median_x_sglang",
        "insert_us_median_x_sglang",
        "request_us_mean_x_sglang",
    ]
    if cap:
        cols[8:8] = ["evict_us_mean", "evict_us_median", "hit_ratio_tokens"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [_cell(r.get(c)) for c in cols]
        print("| " + " | ".join(cells) + " |")
    if a.json:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
        meta = {
            "commit": commit,
            "env": env,
            "loadavg_before": load0,
            "loadavg_after": os.getloadavg(),
        }
        with open(a.json, "w") as f:
            json.dump({"argv": sys.argv, "meta": meta, "rows": rows}, f, indent=1)


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if v < 1 else f"{v:.1f}"
    return "" if v is None else str(v)


def _no_evict() -> None:
    pass


def _evictor(cache: Any, cap: int) -> Callable[[], None]:
    """A call that evicts ``cache`` down to ``cap`` tokens (LRU), SGLang's or ours."""
    tree = getattr(cache, "tree", None)
    if tree is not None:  # ours (benchmarks.peers_adapter)

        def ours() -> None:
            over = tree.evictable_size() - cap
            if over > 0:
                tree.evict(-(-over // tree.page_size))

        return ours
    rc = cache.cache  # the harness's SGLangRadix: its RadixCache, built without an allocator
    rc.token_to_kv_pool_allocator = _NoAllocator()
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams  # the harness imported it

    def sglang() -> None:
        over = rc.evictable_size() - cap
        if over > 0:
            rc.evict(EvictParams(num_tokens=over))

    return sglang


class _NoAllocator:
    """SGLang's evict hands each leaf's slots to the pool allocator; here there is no pool."""

    device = "cpu"

    def free_segment(self, value: Any, start_pos: int = 0) -> None:
        pass

    def free(self, value: Any) -> None:
        pass


if __name__ == "__main__":
    main()
