"""Replay a Mooncake-format trace through the radix index: hit ratio and ops/s.

Each trace ``hash_ids`` entry is one page of ``--page-tokens`` tokens (token ids derived from the
hash id: ``id * page_tokens + j``). Requests run in timestamp order (ties keep file order). Per
request: ``match_prefix``, then ``insert`` of the whole request (as a server does when it
finishes), then ``evict`` down to ``--capacity-pages``. Hit ratios follow
``shared/data/trace_stats.py``: pages = hit pages / total pages; tokens =
sum(min(hit_pages * block_tokens, input_length)) / sum(input_length) with the trace's 512-token
blocks. ``--reference`` compares with a ``trace_stats_results.json`` (its "tail-first" entry).

    python benchmarks/bench_radix_trace.py --trace TRACE --capacity-pages 4096 \
        --eviction-policy lru --json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hicache_async.radix import RadixKey, RadixTree


def load_trace(path: str, max_requests: int = 0) -> list[tuple[int, list[int]]]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f):
            if line.strip():
                d = json.loads(line)
                rows.append(
                    (d.get("timestamp", 0), i, int(d.get("input_length", 0)), d["hash_ids"])
                )
    rows.sort(key=lambda r: (r[0], r[1]))
    if max_requests:
        rows = rows[:max_requests]
    return [(r[2], r[3]) for r in rows]


def _count_nodes(tree: RadixTree) -> int:
    stack = list(tree._roots.values())
    n = -len(stack)
    while stack:
        x = stack.pop()
        n += 1
        stack.extend(x.children.values())
    return n


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def replay(
    reqs: list[tuple[int, list[int]]],
    capacity_pages: int,
    policy: str,
    page_tokens: int,
    block_tokens: int,
) -> dict[str, Any]:
    offs = np.arange(page_tokens, dtype=np.int64)
    tokens = [
        (np.asarray(h, dtype=np.int64)[:, None] * page_tokens + offs).ravel() for _, h in reqs
    ]
    values = torch.arange(max(len(t) for t in tokens), dtype=torch.int64)
    gc.collect()
    rss0 = rss_bytes()
    tree = RadixTree(page_size=page_tokens, eviction_policy=policy)
    pc = time.perf_counter
    t_match = t_insert = t_evict = 0.0
    hit_pages = tot_pages = hit_tok = tot_tok = 0
    peak_pages = 0
    cap_tokens = capacity_pages * page_tokens
    for (n_in, hids), toks in zip(reqs, tokens, strict=True):
        t0 = pc()
        key = RadixKey(toks, copy=False)  # a view of the token array: no copy
        m = tree.match_prefix(key)
        t1 = pc()
        tree.insert(key, values[: len(toks)])
        t2 = pc()
        over = tree.total_size() - cap_tokens
        if over > 0:
            tree.evict(over // page_tokens)
        t3 = pc()
        t_match += t1 - t0
        t_insert += t2 - t1
        t_evict += t3 - t2
        h = m.device_hit_length // page_tokens
        hit_pages += h
        tot_pages += len(hids)
        hit_tok += min(h * block_tokens, n_in)
        tot_tok += n_in
        peak_pages = max(peak_pages, tree.total_size() // page_tokens)
    cached_pages = tree.total_size() // page_tokens
    rss_delta = rss_bytes() - rss0
    n = len(reqs)
    return {
        "requests": n,
        "capacity_pages": capacity_pages,
        "eviction_policy": policy,
        "page_tokens": page_tokens,
        "hit_ratio_pages": hit_pages / tot_pages,
        "hit_ratio_tokens": hit_tok / tot_tok if tot_tok else 0.0,
        "match_ops_per_s": n / t_match,
        "insert_ops_per_s": n / t_insert,
        "evict_ops_per_s": n / t_evict if t_evict else float("inf"),
        "match_us_per_op": t_match / n * 1e6,
        "insert_us_per_op": t_insert / n * 1e6,
        "avg_request_tokens": sum(len(t) for t in tokens) / n,
        "cached_pages": cached_pages,
        "tree_nodes": _count_nodes(tree),
        "rss_bytes_per_cached_page": rss_delta / cached_pages if cached_pages else 0.0,
    }


def reference_for(path: str, capacity: int) -> dict[str, float] | None:
    data = json.loads(Path(path).read_text())
    for name, entry in data.items():
        if name.endswith("|tail-first") and str(capacity) in entry["lru"]:
            return entry["lru"][str(capacity)]  # type: ignore[no-any-return]
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", required=True)
    ap.add_argument("--capacity-pages", default="4096", help="one or a comma list")
    ap.add_argument("--eviction-policy", default="lru")
    ap.add_argument("--page-tokens", type=int, default=16)
    ap.add_argument("--block-tokens", type=int, default=512, help="trace tokens per hash id")
    ap.add_argument("--max-requests", type=int, default=0)
    ap.add_argument("--reference", default=None, help="trace_stats_results.json to compare with")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    a = ap.parse_args(argv)
    reqs = load_trace(a.trace, a.max_requests)
    runs = []
    for cap in (int(c) for c in a.capacity_pages.split(",")):
        r = replay(reqs, cap, a.eviction_policy, a.page_tokens, a.block_tokens)
        if a.reference:
            ref = reference_for(a.reference, cap)
            if ref is not None:
                r["reference_hit_ratio_pages"] = ref["hit_ratio_blocks"]
                r["reference_hit_ratio_tokens"] = ref["hit_ratio_tokens"]
                r["delta_pp_pages"] = 100 * (r["hit_ratio_pages"] - ref["hit_ratio_blocks"])
        runs.append(r)
    if a.json:
        doc: dict[str, Any] = dict(runs[0]) if len(runs) == 1 else {"runs": runs}
        json.dump(doc, sys.stdout, indent=1)
        print()
        return
    cols = [
        "capacity_pages",
        "page_tokens",
        "hit_ratio_pages",
        "reference_hit_ratio_pages",
        "delta_pp_pages",
        "hit_ratio_tokens",
        "match_ops_per_s",
        "insert_ops_per_s",
        "evict_ops_per_s",
        "rss_bytes_per_cached_page",
    ]
    print(" | ".join(cols))
    for r in runs:
        print(
            " | ".join(
                f"{r[c]:.4f}"
                if isinstance(r.get(c), float) and c.startswith(("hit", "ref", "delta"))
                else f"{r[c]:.0f}"
                if isinstance(r.get(c), float)
                else str(r.get(c, "-"))
                for c in cols
            )
        )


if __name__ == "__main__":
    main()
