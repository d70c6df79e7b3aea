"""Load time of a checkpoint with and without the repack cache (lowvram/repack_cache.py), each load in its own
process, alternating; peak RSS of each and whether both give the same logits.

    python benchmarks/load_time.py /tmp/c3-int4 --rounds 3 [--cold] [--first 3]

--cold also drops the page cache before one more cached load (needs root: writes /proc/sys/vm/drop_caches),
so the cache file is read from disk. The cache goes to a temporary LOWVRAM_CACHE_DIR, written by a first load.
--first N times N more first loads (each writing a cache into an empty directory) alternating with loads without
the cache: what the first load after `lowvram quantize` costs; --write mapped|direct forces how they write it
(through the page cache, or with O_DIRECT from ordinary memory; default: as the load chooses).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, torch, lowvram
from lowvram import repack_cache
from lowvram.bench import peak_rss
if sys.argv[2] != "auto":  # how a first load writes the cache: through the page cache, or O_DIRECT beside it
    repack_cache.dirty_headroom = lambda: 0 if sys.argv[2] == "direct" else 1 << 60
t = time.perf_counter()
m = lowvram.load(sys.argv[1], tokenizer=False)
load = time.perf_counter() - t
with torch.inference_mode():
    y = m.logits(list(range(100, 116)))[-1].float()
print(json.dumps({"load_s": load, "cache": m.report.get("repack_cache"), "peak_rss_gib": peak_rss() / 2**30, "logits_sum": float(y.abs().sum()),
                  "argmax": int(y.argmax())}))
"""


def run(path: str, cache_dir: str, on: bool, write: str = "auto") -> dict:
    env = dict(os.environ, LOWVRAM_CACHE="1" if on else "0", LOWVRAM_CACHE_DIR=cache_dir)
    p = subprocess.run([sys.executable, "-c", CHILD, path, write], env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def summary(name: str, rs: list[dict]) -> str:
    each = ", ".join("%.2f" % r["load_s"] for r in rs)
    return (f"{name:<20}: load {statistics.median(r['load_s'] for r in rs):.2f} s median ({each}), "
            f"peak RSS {max(r['peak_rss_gib'] for r in rs):.2f} GiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--write", choices=("auto", "mapped", "direct"), nargs="+", default=["auto"])
    a = ap.parse_args()
    if a.first:
        rows = {w: [] for w in a.write} | {"no cache": []}
        for i in range(a.first):
            order = list(rows)
            for w in order[i % len(order):] + order[: i % len(order)]:  # each goes first in turn
                with tempfile.TemporaryDirectory(prefix="lowvram-cache-") as d:
                    rows[w].append(run(a.model, d, w != "no cache", w))
                os.sync()  # each starts without the one before's writeback still under way
        for w, rs in rows.items():
            print(summary(w if w == "no cache" else f"first load, {w}", rs) + f"; {rs[-1]['cache']}")
        if a.rounds == 0:
            return 0
    with tempfile.TemporaryDirectory(prefix="lowvram-cache-") as d:
        first = run(a.model, d, True)
        print(f"first load (writes the cache): {first['load_s']:.2f} s, {first['cache']}")
        rows = {False: [], True: []}
        for _ in range(a.rounds):
            for on in (False, True):
                rows[on].append(run(a.model, d, on))
        for on, rs in rows.items():
            print(summary("cache mapped" if on else "no cache", rs))
        same = len({(r["argmax"], r["logits_sum"]) for rs in rows.values() for r in rs}) == 1
        print(f"same logits in every load: {same}")
        if a.cold:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            r = run(a.model, d, True)
            print(f"cache mapped, page cache dropped first: load {r['load_s']:.2f} s, peak RSS {r['peak_rss_gib']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
