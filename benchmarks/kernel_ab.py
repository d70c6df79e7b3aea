"""Paired A/B of the native kernel as built from another git revision against the installed build, in one process.

    python benchmarks/kernel_ab.py CHECKPOINT [--rev HEAD~1 | --isa avx2] [--cap avx2] [--rounds 24] [--context 64]
                                          [--prompt-len 128] [--prompt-rounds 3] [--load-rounds 2]

With --isa PATH the other side is the installed build itself capped at one of its slower paths (avx2, generic),
to see whether a CPU's best path is also its fastest. With --cap PATH both sides run that path (a revision's
AVX2 code measured on an AVX-512 machine).

Compiles `kernels/native/lvq.c` of REV with setup.py's flags into a temporary library, then alternates the two
libraries call for call: single GEMV/GEMM calls on random weights of the checkpoint's shapes (outputs must be
bit-identical when the arithmetic is meant to be unchanged; printed), whole loads of the checkpoint (the repack
into the kernel's layout runs in the library), decode steps of the checkpoint on one KV cache, and prompts.
Alternating puts a shared VM's slow and fast phases on both builds alike. Both builds read the same repacked
weights, so a revision whose weight layout differs cannot be compared this way.
"""

import argparse
import ctypes
import gc
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

import lowvram
from lowvram.kernels import PackedWeight, fused, native, pack_cols, pack_rows

ROOT = Path(__file__).resolve().parents[1]
FUNCS = ("lvq_gemm", "lvq_rmsnorm", "lvq_swiglu", "lvq_attend_one", "lvq_attend_one_i8", "lvq_attend_rows",
         "lvq_decode_blocks", "lvq_dequant_bf16", "lvq_repack", "lvq_hugepages")


def build(rev: str, out: Path) -> ctypes.CDLL:
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:kernels/native/lvq.c"], check=True,
                         capture_output=True, text=True).stdout
    c = out / "lvq.c"
    c.write_text(src)
    so = out / "lvq_ab.so"
    subprocess.run(["gcc", "-O3", "-std=c11", "-fopenmp", "-fPIC", "-shared", f"-I{sysconfig.get_paths()['include']}",
                    str(c), "-o", str(so)], check=True)
    lib = ctypes.CDLL(str(so))
    cur = native._load()
    for f in FUNCS:
        if not hasattr(lib, f):  # older than the function: decode then runs the separate calls on both sides
            print(f"{rev} has no {f}")
            if f in ("lvq_decode_blocks", "lvq_attend_one_i8"):  # lvq_decode_blocks took INT8 caches' scales since
                fused.decode_blocks = fused.decode_block = lambda *a, **k: None  # lvq_attend_one_i8 came
            if f == "lvq_attend_rows":  # prompts then attend through SDPA on both sides
                fused.attend_rows = lambda *a, **k: None
            continue
        getattr(lib, f).argtypes, getattr(lib, f).restype = getattr(cur, f).argtypes, getattr(cur, f).restype
    return lib


def random_linear(n: int, k: int, bits: int, group: int = 128) -> native.NativeLinear:
    g = torch.Generator().manual_seed(n * 31 + k)
    q = torch.randint(0, 1 << bits, (k, n), generator=g, dtype=torch.int32)
    zeros = torch.full((k // group, n), 1 << (bits - 1), dtype=torch.int32)
    w = PackedWeight(qweight=pack_rows(q, bits), qzeros=pack_cols(zeros, bits),
                     scales=torch.rand(k // group, n, generator=g).half() * 0.01 + 0.001,
                     g_idx=torch.arange(k, dtype=torch.int32) // group, bits=bits, group_size=group)
    return native.NativeLinear(w, torch.bfloat16)


CAPS: dict = {}  # side -> the path it is capped at (--isa)


def use(libs: dict, key: str = "installed") -> None:
    """Route the kernel calls to one side: its library, at its path."""
    native._lib = libs[key]
    native.set_isa(CAPS.get(key))


def paired(libs: dict, run, rounds: int) -> dict:
    res = {k: [] for k in libs}
    for _ in range(rounds):
        for k in libs:
            use(libs, k)
            t = time.perf_counter()
            run(k)
            res[k].append(time.perf_counter() - t)
    use(libs)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--rev", default="HEAD~1", help="git revision whose lvq.c is the other side (default HEAD~1)")
    ap.add_argument("--isa", choices=native.ISAS[:-1], help="the other side: the installed build on this slower path")
    ap.add_argument("--rounds", type=int, default=24, help="decode steps per build")
    ap.add_argument("--context", type=int, default=64, help="tokens in the cache before the decode steps")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--prompt-rounds", type=int, default=3)
    ap.add_argument("--load-rounds", type=int, default=2)
    ap.add_argument("--cap", choices=native.ISAS[:-1], help="both sides on this path")
    a = ap.parse_args()
    threads = native.threads()
    with tempfile.TemporaryDirectory() as tmp:
        if a.isa:
            a.rev = f"installed@{a.isa}"
            CAPS[a.rev] = a.isa
            libs = {a.rev: native._load(), "installed": native._load()}
        else:
            libs = {a.rev: build(a.rev, Path(tmp)), "installed": native._load()}
        if a.cap:
            CAPS.update({k: a.cap for k in libs})
            use(libs)
        print(f"native kernel: {a.rev} against the installed build, {threads} threads, path {a.cap or native.isa()}")
        for bits in (4, 8):
            for n, k, m in ((27392, 4096, 1), (4096, 13696, 1), (4096, 4096, 128), (13696, 4096, 37)):
                lin = random_linear(n, k, bits)
                x = torch.randn(m, k, dtype=torch.bfloat16)
                ys = {key: torch.empty(m, n, dtype=torch.bfloat16) for key in libs}
                reps = max(1, 20 // m)

                def call(key):
                    for _ in range(reps):
                        libs[key].lvq_gemm(x.data_ptr(), 1, m, *lin._args, ys[key].data_ptr(), 1, threads)

                res = paired(libs, call, 7)
                med = {key: statistics.median(v) / reps for key, v in res.items()}
                unit = (f"{lin.nbytes() / med[a.rev] / 1e9:.1f} -> {lin.nbytes() / med['installed'] / 1e9:.1f} GB/s"
                        if m == 1 else
                        f"{m * n * k / med[a.rev] / 1e9:.1f} -> {m * n * k / med['installed'] / 1e9:.1f} GMAC/s")
                print(f"  {bits}-bit {n}x{k}, {m} row(s): {unit} ({med[a.rev] / med['installed']:.2f}x), "
                      f"outputs {'identical' if torch.equal(*ys.values()) else 'DIFFER'}")
        loads = {key: [] for key in libs}
        for _ in range(a.load_rounds):
            for key in libs:
                use(libs, key)
                t = time.perf_counter()
                m = lowvram.load(a.checkpoint, tokenizer=False, repack_cache=False)  # the repack itself is timed
                loads[key].append(time.perf_counter() - t)
                del m
                gc.collect()
        use(libs)
        if a.load_rounds:
            print(f"load ({a.checkpoint}): " + " / ".join(f"{x:.1f}" for x in loads[a.rev]) + " -> "
                  + " / ".join(f"{x:.1f}" for x in loads["installed"]) + " s")
        m = lowvram.load(a.checkpoint, tokenizer=False)
        ids = [100 + (i * 7) % 30000 for i in range(a.context)]
        caches = m.new_cache(len(ids) + 2 * a.rounds + 1)
        pos = [len(ids)]

        def step(_):
            m.net.head(m.forward(ids + [5] * (pos[0] - len(ids) + 1), pos[0], 1, caches))
            pos[0] += 1

        with torch.inference_mode():
            m.forward(ids, 0, len(ids), caches)
            res = paired(libs, step, a.rounds)
            d = statistics.median(x - y for x, y in zip(res[a.rev], res["installed"]))
            print(f"decode ({a.checkpoint}): median {statistics.median(res[a.rev]) * 1e3:.1f} -> "
                  f"{statistics.median(res['installed']) * 1e3:.1f} ms/token, paired difference {d * 1e3:.1f} ms")
            prompt = [100 + (i * 7) % 30000 for i in range(a.prompt_len)]

            def prefill(_):
                m.forward(prompt, 0, len(prompt), m.new_cache(len(prompt)))

            res = paired(libs, prefill, a.prompt_rounds)
            if a.prompt_rounds:
                print(f"prefill of {a.prompt_len} tokens: {a.prompt_len / statistics.median(res[a.rev]):.1f} -> "
                      f"{a.prompt_len / statistics.median(res['installed']):.1f} tok/s, median paired ratio "
                      f"{statistics.median(x / y for x, y in zip(res[a.rev], res['installed'])):.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
