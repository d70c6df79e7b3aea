"""Load time of a checkpoint with and without the repack cache (lowvram/repack_cache.py), each load in its own
process, alternating; peak RSS of each and whether both give the same logits.

    python benchmarks/load_time.py /tmp/c3-int4 --rounds 3 [--cold]

--cold also drops the page cache before one more cached load (needs root: writes /proc/sys/vm/drop_caches),
so the cache file is read from disk. The cache goes to a temporary LOWVRAM_CACHE_DIR, written by a first load.
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
from lowvram.bench import peak_rss
t = time.perf_counter()
m = lowvram.load(sys.argv[1], tokenizer=False)
load = time.perf_counter() - t
with torch.inference_mode():
    y = m.logits(list(range(100, 116)))[-1].float()
print(json.dumps({"load_s": load, "cache": m.report.get("repack_cache"), "peak_rss_gib": peak_rss() / 2**30, "logits_sum": float(y.abs().sum()),
                  "argmax": int(y.argmax())}))
"""


def run(path: str, cache_dir: str, on: bool) -> dict:
    env = dict(os.environ, LOWVRAM_CACHE="1" if on else "0", LOWVRAM_CACHE_DIR=cache_dir)
    p = subprocess.run([sys.executable, "-c", CHILD, path], env=env, capture_output=True, text=True, check=True)
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="lowvram-cache-") as d:
        first = run(a.model, d, True)
        print(f"first load (writes the cache): {first['load_s']:.2f} s, {first['cache']}")
        rows = {False: [], True: []}
        for _ in range(a.rounds):
            for on in (False, True):
                rows[on].append(run(a.model, d, on))
        for on, rs in rows.items():
            each = ", ".join("%.2f" % r["load_s"] for r in rs)
            print(f"{'cache mapped' if on else 'no cache    '}: load {statistics.median(r['load_s'] for r in rs):.2f} s median "
                  f"({each}), peak RSS {max(r['peak_rss_gib'] for r in rs):.2f} GiB")
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
