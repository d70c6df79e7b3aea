"""Paired A/B of one C call per decode block against the block's separate calls, in one process.

    python benchmarks/fused_ab.py CHECKPOINT [--rounds 40]

Alternates the two paths step by step on the same KV cache (64-token prompt), so a shared VM's slow and
fast phases fall on both alike; prints each path's median and the median paired difference.
"""

import argparse
import statistics
import time

import torch

import lowvram
from lowvram.kernels import fused


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--rounds", type=int, default=40)
    a = ap.parse_args()
    m = lowvram.load(a.checkpoint, tokenizer=False)
    if not any(type(x).__module__ == "lowvram.kernels.native" for x in m.net.modules()):
        raise SystemExit(f"{a.checkpoint}: no linear runs on the native kernel (unquantized, or another backend), "
                         "so a block is never one call and both paths would be the same")
    ids = list(range(100, 164))
    caches = m.new_cache(len(ids) + 2 * a.rounds + 1)
    res = {True: [], False: []}
    with torch.inference_mode():
        m.forward(ids, 0, len(ids), caches)
        for _ in range(a.rounds):
            for block in (True, False):
                fused._BLOCK = block
                ids.append(5)
                t = time.perf_counter()
                m.net.head(m.forward(ids, len(ids) - 1, 1, caches))
                res[block].append(time.perf_counter() - t)
    for block in (True, False):
        print(f"{'one call per block' if block else 'separate calls    '}: median {statistics.median(res[block]) * 1e3:.1f} ms")
    d = [s - b for b, s in zip(res[True], res[False])]
    print(f"paired difference (separate - block): median {statistics.median(d) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
