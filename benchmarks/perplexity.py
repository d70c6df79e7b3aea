"""Held-out perplexity of the example model: fp32 vs INT8 / INT4 RTN / INT4 GPTQ.

    python benchmarks/perplexity.py [--model examples/glm4-tiny] [--tokens 4096]

Each variant is made by `lowvram.converters.quantize.quantize` (what `lowvram quantize` runs, with
its defaults: the 4-bit ones search each group's clipping range; the "--no-mse" rows repeat them
without) and scored twice: with dtype=float32 (the weights exactly as stored, dequantized) and with
the fast default kernels (ONNX Runtime MatMulNBits, int8 activations, bf16 elsewhere).
"""

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

import lowvram
from lowvram.converters.quantize import quantize

ROOT = Path(__file__).resolve().parents[1]


def perplexity(model, ids: list[int], window: int) -> float:
    nll, n = 0.0, 0
    for s in range(0, len(ids) - 1, window):
        chunk = ids[s : s + window + 1]
        if len(chunk) < 2:
            break
        logits = model.logits(chunk[:-1])
        nll += torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum").item()
        n += len(chunk) - 1
    return math.exp(nll / n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "examples" / "glm4-tiny"))
    ap.add_argument("--heldout", default=str(ROOT / "examples" / "corpus" / "heldout.txt"))
    ap.add_argument("--calib", default=str(ROOT / "examples" / "corpus" / "train.txt"))
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--window", type=int, default=128, help="the example model was trained on 128-token windows")
    ap.add_argument("--no-mse-rows", action="store_true", help="skip the 4-bit rows without the clipping search")
    a = ap.parse_args()
    torch.manual_seed(0)
    base = lowvram.load(a.model, dtype="float32")
    ids = base.tokenizer.encode(Path(a.heldout).read_text(encoding="utf-8"))[: a.tokens]
    variants = [("INT8 RTN per-channel", dict(bits=8, group_size=-1)),
                ("INT8 RTN per-channel, asym", dict(bits=8, group_size=-1, sym=False)),
                ("INT8 RTN g128", dict(bits=8, group_size=128)),
                ("INT4 RTN g128", dict(bits=4, group_size=128)),
                ("INT4 GPTQ g128", dict(bits=4, group_size=128, method="gptq", act_order=True)),
                ("INT4 RTN g32", dict(bits=4, group_size=32)),
                ("INT4 GPTQ g32", dict(bits=4, group_size=32, method="gptq", act_order=True)),
                # the output layer quantized in the file too (otherwise float, and int8 per row at load on the fast path)
                ("INT4 GPTQ g128, head INT8 per-channel", dict(bits=4, group_size=128, method="gptq", act_order=True,
                                                               quantize_head=True, head_bits=8)),
                ("INT4 GPTQ g128, head INT4 g128", dict(bits=4, group_size=128, method="gptq", act_order=True,
                                                        quantize_head=True, head_bits=4, head_group_size=128))]
    if not a.no_mse_rows:  # the 4-bit defaults search the clipping range (mse); also show them without
        variants += [(f"{n}, --no-mse", dict(kw, mse=False)) for n, kw in variants
                     if kw["bits"] == 4 and not kw.get("quantize_head")]
    ref = perplexity(base, ids, a.window)
    fast_ref = perplexity(lowvram.load(a.model), ids, a.window)
    print(f"model {a.model}, {len(ids)} held-out tokens, window {a.window}")
    print("| variant | ppl (exact, fp32 compute) | vs fp32 | ppl (fast kernels) | vs fp32 | quantize s |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| fp32 / bf16 reference | {ref:.3f} | — | {fast_ref:.3f} | {100 * (fast_ref / ref - 1):+.2f}% | — |")
    with tempfile.TemporaryDirectory() as d:
        for name, kw in variants:
            out = Path(d) / name.replace(" ", "_")
            t = time.time()
            calib = dict(calib=a.calib, calib_samples=64, calib_seq_len=128) if kw.get("method") == "gptq" else {}  # RTN refuses calibration options
            quantize(a.model, out, progress=False, **calib, **kw)
            qs = time.time() - t
            p = perplexity(lowvram.load(out, dtype="float32"), ids, a.window)
            pf = perplexity(lowvram.load(out, repack_cache=False), ids, a.window)  # a temporary checkpoint
            print(f"| {name} | {p:.3f} | {100 * (p / ref - 1):+.2f}% | {pf:.3f} | {100 * (pf / ref - 1):+.2f}% | {qs:.1f} |")


if __name__ == "__main__":
    main()
