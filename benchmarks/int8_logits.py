"""INT8 per-channel RTN: relative L2 error of all logits against fp32 (issue 4's acceptance measure).

    python benchmarks/int8_logits.py [--seeds 3]

The trained example (examples/glm4-tiny, the first 600 characters of the held-out text) symmetric
and asymmetric, with the clipping search off (the 8-bit default) and on (`mse=True`), plus GPTQ
int8 per-channel for comparison; then the random tiny checkpoints of converters/synthetic.py per
generation (the ids tests/test_quantize.py uses), with the error that Gaussian weight noise of the
same relative size (0.6% of each block linear's norm) causes, to tell the quantizer's error from the
network's sensitivity; last the tiny models of the original code's test vectors
(../shared/reference/chatglm_cpp, as tests/test_reference.py builds them), when that folder is there.
"""

import argparse
import re
import sys
import tempfile
from pathlib import Path

import torch

import lowvram
from lowvram.converters.quantize import quantize
from lowvram.converters.synthetic import TINY, write_random

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"layers\.\d+\.(attn\.qkv|attn\.out|mlp\.up|mlp\.down)$")


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def q_err(src, ids, ref, d, **kw) -> tuple[float, float]:
    s = quantize(src, d / "q", bits=8, group_size=-1, progress=False, force=True, **kw)
    return rel(lowvram.load(d / "q", dtype="float32").logits(ids), ref), s["rel_error"]["median"]


def noise_err(model, ids, ref, size=0.006, trials=4) -> float:
    lins = [m for n, m in model.net.named_modules() if BLOCK.search(n)]
    g = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for _ in range(trials):
            saved = [m.weight.clone() for m in lins]
            for m in lins:
                m.weight.add_(torch.randn(m.weight.shape, generator=g) * size * m.weight.norm() / m.weight.numel() ** 0.5)
            out.append(rel(model.logits(ids), ref))
            for m, w in zip(lins, saved):
                m.weight.copy_(w)
    return sum(out) / len(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "examples" / "glm4-tiny"))
    ap.add_argument("--seeds", type=int, default=3, help="random tiny checkpoints per generation")
    a = ap.parse_args()
    d = Path(tempfile.mkdtemp())
    ex = Path(a.model)
    base = lowvram.load(ex, dtype="float32")
    ids = base.tokenizer.encode((ROOT / "examples" / "corpus" / "heldout.txt").read_text()[:600])
    ref = base.logits(ids)
    print(f"{ex.name}, {len(ids)} tokens; Gaussian 0.6% weight noise: {100 * noise_err(base, ids, ref):.3f}%")
    print("| variant | logits rel. L2 | median weight rel. error |")
    print("| --- | --- | --- |")
    for sym in (True, False):
        for mse in (False, True):
            e, w = q_err(ex, ids, ref, d, sym=sym, mse=mse)
            print(f"| RTN {'sym' if sym else 'asym'}{', mse' if mse else ''} | {100 * e:.3f}% | {100 * w:.3f}% |")
        e, w = q_err(ex, ids, ref, d, sym=sym, method="gptq", calib=str(ROOT / "examples" / "corpus" / "train.txt"),
                     calib_samples=64, calib_seq_len=128)
        print(f"| GPTQ {'sym' if sym else 'asym'} | {100 * e:.3f}% | {100 * w:.3f}% |")
    print()
    print("| random tiny (seeds) | RTN sym | RTN asym | median weight error sym / asym | Gaussian 0.6% weight noise |")
    print("| --- | --- | --- | --- | --- |")
    for gen in TINY:
        tids = [5, 7, 151, 152, 9] if gen == "chatglm-6b" else [5, 7, 9, 11, 13]
        cols = [[], [], [], [], []]
        for seed in range(a.seeds):
            src = write_random(d / f"{gen}-{seed}", gen, seed=seed)
            m = lowvram.load(src, dtype="float32")
            r = m.logits(tids)
            es, ws = q_err(src, tids, r, d, sym=True)
            ea, wa = q_err(src, tids, r, d, sym=False)
            for c, v in zip(cols, (es, ea, ws, wa, noise_err(m, tids, r))):
                c.append(100 * v)
        f = lambda c: " / ".join(f"{v:.3f}" for v in c)  # noqa: E731
        print(f"| {gen} | {f(cols[0])}% | {f(cols[1])}% | {sum(cols[2]) / len(cols[2]):.2f}% / "
              f"{sum(cols[3]) / len(cols[3]):.2f}% | {f(cols[4])}% |")
    reference_models(d)


def reference_models(d: Path):
    """chatglm.cpp's tiny test models (one 32-wide block; ChatGLM2/3/4's output layer, absent from the files,
    a seeded random one that stays fp16)."""
    ref_dir = ROOT.parent / "shared" / "reference" / "chatglm_cpp"
    if not ref_dir.exists():
        print(f"\n{ref_dir} not present: reference tiny models skipped")
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from test_reference import CASES

    from lowvram.converters.synthetic import write_checkpoint

    print()
    print("| reference tiny model | RTN sym | RTN asym |")
    print("| --- | --- | --- |")
    for fname in sorted(CASES):
        torch.manual_seed(0)
        config, sd, steps = CASES[fname](ref_dir / fname)
        src = write_checkpoint(d / fname, config, sd)
        ids = [i for x, _ in steps for i in x]
        ref = lowvram.load(src, dtype="float32").logits(ids)
        es, _ = q_err(src, ids, ref, d, sym=True)
        ea, _ = q_err(src, ids, ref, d, sym=False)
        print(f"| {fname} | {100 * es:.3f}% | {100 * ea:.3f}% |")


if __name__ == "__main__":
    main()
