"""The memory-bandwidth roofline for single-stream decode: every weight but the embedding table is read once
per token, so ms/token >= bytes streamed per token / read bandwidth.

    python benchmarks/roofline.py                       # bandwidth, then chatglm3-6b at 4 and 8 bits
    python benchmarks/roofline.py /tmp/chatglm3-int4    # bytes of a real (or random full-size) checkpoint
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

import torch

EMBED_NAMES = ("word_embeddings", "embed_tokens", "token_embd")


def read_bandwidth(threads: int = 2, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """The runtime's probe (lowvram.bench.read_bandwidth) over 1 GiB, best of 5."""
    from lowvram.bench import read_bandwidth as probe

    return probe(threads, nbytes, repeats)


def _safetensors_tensors(path: Path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    for name, meta in header.items():
        if name != "__metadata__":
            a, b = meta["data_offsets"]
            yield name, b - a


def checkpoint_bytes_per_token(folder: str | Path) -> int:
    """Bytes a decode step streams from a safetensors checkpoint: all tensors except the embedding table
    (one row is read) and act-order indices (used at load only)."""
    total = 0
    for f in sorted(Path(folder).glob("*.safetensors")):
        for name, nbytes in _safetensors_tensors(f):
            if not any(e in name for e in EMBED_NAMES) and not name.endswith("g_idx"):
                total += nbytes
    if total == 0:
        raise ValueError(f"{folder}: no safetensors tensors found")
    return total


def shape_bytes_per_token(name: str = "chatglm3-6b", bits: int = 4, group_size: int = 128, head_bits: int = 8) -> int:
    """The same count from the released config alone: GPTQ blocks (packed ints, fp16 scales, packed zeros),
    output layer per-channel at `head_bits`, norms and biases fp16."""
    from lowvram.config import parse_config
    from lowvram.known import known_config
    from lowvram.models.glm import GLM

    cfg = parse_config(known_config(name))
    with torch.device("meta"):
        net = GLM(cfg)
    total = 0
    for ours, p in net.named_parameters():
        if ours.startswith("embed."):
            continue
        if p.dim() == 2:
            n, k = p.shape
            b, g = (head_bits, k) if ours.startswith("output.") else (bits, group_size)
            total += k * n * b // 8 + (k // g) * n * (2 + b / 8)
        else:
            total += p.numel() * 2
    return int(total)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="*", help="checkpoint folders to size (default: chatglm3-6b shapes)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="chatglm3-6b")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    bw = read_bandwidth(a.threads)
    rows = []
    if a.checkpoints:
        rows = [(c, checkpoint_bytes_per_token(c)) for c in a.checkpoints]
    else:
        rows = [(f"{a.model} INT{b} g128 + int8 head (shapes)", shape_bytes_per_token(a.model, b)) for b in (4, 8)]
    out = {"threads": a.threads, "read_bandwidth_GBps": round(bw / 1e9, 2),
           "rows": [{"what": w, "bytes_per_token": n, "min_ms_per_token": round(1e3 * n / bw, 1)} for w, n in rows]}
    if a.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"read bandwidth ({a.threads} threads): {bw / 1e9:.1f} GB/s")
    for r in out["rows"]:
        print(f"  {r['what']}: {r['bytes_per_token'] / 1e9:.2f} GB/token -> >= {r['min_ms_per_token']} ms/token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
