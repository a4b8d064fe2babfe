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
from typing import Any


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peers-dir", required=True)
    ap.add_argument("--trace", default=None)
    ap.add_argument("--page-sizes", default="16,1")
    ap.add_argument("--impls", default="sglang,hicache_async", help="one or both")
    ap.add_argument("--block-tokens", type=int, default=512)
    ap.add_argument("--max-requests", type=int, default=0)
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
    t: list[dict[str, list[float]]] = [{"match": [], "insert": []} for _ in combos]
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
            t[k]["match"].append(t1 - t0)
            t[k]["insert"].append(t2 - t1)
    rows: list[dict[str, Any]] = []
    for k, (name, ps) in enumerate(combos):
        m, ins = t[k]["match"], t[k]["insert"]
        rows.append(
            {
                "impl": name,
                "page": ps,
                "requests": len(reqs),
                "match_us_mean": sum(m) / len(m) * 1e6,
                "match_us_median": statistics.median(m) * 1e6,
                "insert_us_mean": sum(ins) / len(ins) * 1e6,
                "insert_us_median": statistics.median(ins) * 1e6,
                "match_ops_s": len(m) / sum(m),
                "insert_ops_s": len(ins) / sum(ins),
                "hit_tokens": hits[k],
            }
        )
    for r in rows:  # same-run ratios against sglang at the same page size, when it ran
        sg = [x for x in rows if x["impl"] == "sglang" and x["page"] == r["page"]]
        if sg and r["impl"] != "sglang":
            assert r["hit_tokens"] == sg[0]["hit_tokens"], (r, sg[0])
            for key in ("match_ops_s", "insert_ops_s"):
                r[f"{key}_x_sglang"] = r[key] / sg[0][key]
            for key in ("match_us_median", "insert_us_median"):
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
    ]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r[c]:.1f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
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


if __name__ == "__main__":
    main()
