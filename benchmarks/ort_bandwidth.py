"""Throughput of the ORT int4 GEMV when weights come from DRAM, not L3: 8 distinct 27392x4096 matrices.

    python benchmarks/ort_bandwidth.py [group ...]
"""

import sys
import time

import torch

from lowvram.kernels import PackedWeight, make_linear, pack_cols


def rand_packed(n, k, bits=4, group=128):
    g = k // group
    q = torch.randint(-2**31, 2**31 - 1, (k * bits // 32, n), dtype=torch.int32)
    z = pack_cols(torch.full((g, n), 2 ** (bits - 1), dtype=torch.int32), bits)
    return PackedWeight(q, z, (torch.rand(g, n) * 0.002).half(), None, bits, group)


def main():
    torch.set_num_threads(2)
    for group in [int(a) for a in sys.argv[1:]] or [32, 64, 128]:
        lins = [make_linear(rand_packed(27392, 4096, group=group), "ort", torch.bfloat16) for _ in range(8)]
        x = torch.randn(1, 4096, dtype=torch.bfloat16)
        for lin in lins:
            lin(x)
        t = time.perf_counter()
        for _ in range(5):
            for lin in lins:
                lin(x)
        dt = (time.perf_counter() - t) / 40
        print(f"group {group}: {dt * 1e3:.2f} ms/GEMV, {27392 * 4096 * (0.5 + 2.5 / group) / dt / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
