"""A decode step's attention on the CPU as the model meets it: one call per layer over every layer's KV cache,
which a step's weight stream has pushed out to DRAM (a single layer's cache timed in a loop stays in L3).

    python benchmarks/decode_attention.py [--slots 8000] [--kv bf16|int8] [--rev REV] [--rounds 7] [--threads 2]
                                          [--isa avx2]

ChatGLM3-6B's attention shapes (28 layers, 32 query heads over 2 kv heads of 128) at `--slots` cached tokens,
bf16 or the INT8 cache (codes and per-slot scales, as lowvram.models.glm.Int8KV holds them). The installed
kernel, and with --rev the kernel of another git revision built as benchmarks/kernel_ab.py builds it,
alternated round by round so a shared VM's phases fall on both alike. Prints the median and minimum per step.
"""

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_ab import build  # noqa: E402

from lowvram.config import GLMConfig  # noqa: E402
from lowvram.kernels import native  # noqa: E402
from lowvram.models.glm import rope_tables  # noqa: E402

H, G, D, LAYERS = 32, 2, 128, 28


def caches(kind: str, slots: int) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(0)
    if kind == "bf16":
        return [tuple(torch.randn(1, G, slots, D, generator=g).bfloat16() for _ in range(2)) for _ in range(LAYERS)]
    return [(torch.randint(-127, 128, (1, G, slots, D), dtype=torch.int8, generator=g),
             torch.rand(1, G, slots, 1, generator=g) / 50,
             torch.randint(-127, 128, (1, G, slots, D), dtype=torch.int8, generator=g),
             torch.rand(1, G, slots, 1, generator=g) / 50) for _ in range(LAYERS)]


def step(lib, kind: str, kvs, rope, qkv0: torch.Tensor, o: torch.Tensor, slot: int, threads: int) -> float:
    """One decode step's attention over every layer; seconds."""
    p = ctypes.c_void_p
    cos, sin = rope
    t = time.perf_counter()
    for kv in kvs:
        qkv = qkv0.clone()
        args = [p(qkv.data_ptr()), 1, p(cos.data_ptr()), p(sin.data_ptr()), 64, H, G, D,
                *(p(x.data_ptr()) for x in kv), kv[0].shape[2], slot, p(o.data_ptr()), threads]
        rc = (lib.lvq_attend_one if kind == "bf16" else lib.lvq_attend_one_i8)(*args)
        assert rc == 0, rc
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slots", type=int, default=8000, help="cached tokens before the new one")
    ap.add_argument("--kv", choices=("bf16", "int8"), default="bf16")
    ap.add_argument("--rev", help="also time the kernel of this git revision")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--isa", choices=native.ISAS, help="cap both kernels at this path (AVX2's loops on an AVX-512 CPU)")
    args = ap.parse_args()
    if native.available() is not None:
        sys.exit(native.available())
    libs = {"installed": native._load()}
    tmp = tempfile.TemporaryDirectory()
    if args.rev:
        lib = build(args.rev, Path(tmp.name))
        if args.kv == "int8" and not hasattr(lib, "lvq_attend_one_i8"):
            print(f"{args.rev} has no lvq_attend_one_i8 (its INT8 cache was read in torch): installed kernel only")
        else:
            libs[args.rev] = lib
    if args.isa:
        for lib in libs.values():
            lib.lvq_set_isa(native.ISAS.index(args.isa))
    cfg = GLMConfig(layout="chatglm", generation="chatglm3-6b", vocab_size=64, hidden_size=H * D, num_layers=LAYERS,
                    num_heads=H, num_kv_heads=G, head_dim=D, ffn_hidden_size=64, norm_eps=1e-5,
                    max_length=args.slots + 1, rotary_dim=64)
    kvs = caches(args.kv, args.slots + 1)
    rope = rope_tables(cfg, torch.tensor([[args.slots]]))
    qkv0 = torch.randn(1, 1, (H + 2 * G) * D).bfloat16()
    o = torch.empty(1, 1, H * D).bfloat16()
    torch.set_num_threads(1)  # as during a decode step: torch's OpenMP threads would spin beside the kernel's
    junk = torch.zeros(256 << 20, dtype=torch.uint8)  # a step's weights, passing through the caches between steps
    times = {name: [] for name in libs}
    for _ in range(args.rounds):
        for name, lib in libs.items():
            junk.add_(1)
            times[name].append(step(lib, args.kv, kvs, rope, qkv0, o, args.slots, args.threads))
    cached = args.slots * LAYERS * 2 * G * D * (2 if args.kv == "bf16" else 1) / 1e9
    print(f"{args.kv} cache, {args.slots} slots, {LAYERS} layers ({cached:.2f} GB read per step), "
          f"{args.threads} threads, {args.rounds} rounds, {args.isa or native.isa()} path")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:>12}: {med * 1e3:7.2f} ms per step (min {min(ts) * 1e3:.2f}), {cached / med:.1f} GB/s")


if __name__ == "__main__":
    main()
