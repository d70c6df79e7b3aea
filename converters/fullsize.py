"""Random quantized checkpoints with the exact shapes of the released models, for benchmarks.

No weights can be downloaded here, and a 12 GB fp16 model would not fit a laptop's RAM anyway:
this writes the GPTQ-format checkpoint `lowvram quantize` would produce (same tensor names,
same config files) straight from random integers, one tensor at a time.

    python -m lowvram.converters.fullsize chatglm3-6b --bits 4 -o /tmp/chatglm3-int4
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from lowvram.checkpoint import FUSED_PARTS, original_name
from lowvram.config import parse_config
from lowvram.kernels import pack_cols
from lowvram.known import known_config
from lowvram.models.glm import GLM

from . import atomic_directory
from .quantize import BLOCK_LINEAR, ShardWriter, _write_metadata


def write_fullsize(name: str, out: str | Path, bits: int = 4, group_size: int = 128, quantize_head: bool = True,
                   head_bits: int = 8, seed: int = 0, max_shard_bytes: int = 2 << 30, layers: int | None = None,
                   head_group_size: int = -1) -> Path:
    config = known_config(name, layers)
    cfg = parse_config(config)
    with torch.device("meta"):
        net = GLM(cfg)
    g = torch.Generator().manual_seed(seed)
    out = Path(out)
    with atomic_directory(out) as tmp:
        w = ShardWriter(tmp, max_shard_bytes)
        for ours, p in net.named_parameters():
            shape = tuple(p.shape)
            quant = BLOCK_LINEAR.search(ours) or (quantize_head and ours == "output.weight")
            slots = [None]
            sizes = [shape[0]]
            if cfg.layout in FUSED_PARTS and ".attn.qkv." in ours:
                slots, sizes = [0, 1, 2], [cfg.q_size, cfg.kv_size, cfg.kv_size]
            for slot, n in zip(slots, sizes):
                cname = original_name(cfg.layout, ours, slot)
                if quant:
                    head_grp = head_group_size if head_group_size > 0 else shape[1]
                    b, grp = (head_bits, head_grp) if ours == "output.weight" else (bits, group_size)
                    k = shape[1]
                    prefix = cname[: -len(".weight")]
                    w.add(f"{prefix}.qweight", torch.randint(-2**31, 2**31 - 1, (k * b // 32, n), generator=g,
                                                             dtype=torch.int64).to(torch.int32))
                    mid = torch.full((k // grp, n), 2 ** (b - 1) - 1, dtype=torch.int32)  # v1: zero-1
                    w.add(f"{prefix}.qzeros", pack_cols(mid, b))
                    w.add(f"{prefix}.scales", (torch.rand(k // grp, n, generator=g) * 2e-3 + 1e-4).half())
                    w.add(f"{prefix}.g_idx", (torch.arange(k) // grp).to(torch.int32))
                elif ours.endswith("norm.weight"):
                    w.add(cname, torch.ones(n, *shape[1:], dtype=torch.float16))
                else:
                    w.add(cname, (torch.randn((n, *shape[1:]), generator=g) * 0.02).half())
        w.finish()
        src = tmp / "_src"
        src.mkdir()
        (src / "config.json").write_text(json.dumps(config))
        _write_metadata(src, tmp, cfg, bits, group_size, True, False, "random", quantize_head, head_bits,
                        head_group_size=head_group_size)
        shutil.rmtree(src)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8))
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--no-quantize-head", action="store_true")
    ap.add_argument("--head-bits", type=int, default=8, choices=(4, 8))
    ap.add_argument("--head-group-size", type=int, default=-1, help="-1: one scale per row")
    ap.add_argument("--layers", type=int, help="fewer blocks than the real model (same tensor shapes)")
    ap.add_argument("-o", "--out", required=True)
    a = ap.parse_args(argv)
    print(write_fullsize(a.name, a.out, a.bits, a.group_size, not a.no_quantize_head, head_bits=a.head_bits,
                         layers=a.layers, head_group_size=a.head_group_size))


if __name__ == "__main__":
    main()
