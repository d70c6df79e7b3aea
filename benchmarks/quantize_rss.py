"""Peak RSS and wall time of `lowvram quantize` (RTN or GPTQ) on a random fp16 checkpoint with real shapes.

    python benchmarks/quantize_rss.py [--model chatglm3-6b] [--layers N] [--dir /tmp/lowvram-qrss]
    python benchmarks/quantize_rss.py --method gptq --layers 2 --calib-samples 8 --calib-seq-len 256

The source (12 GB for chatglm3-6b) is written shard by shard without materialising the model; the
quantization runs in a child process so its peak RSS is its own. Both directories are deleted after.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from lowvram.converters import atomic_directory
from lowvram.converters.quantize import ShardWriter
from lowvram.converters.synthetic import state_shapes
from lowvram.known import known_config


def write_source(name: str, out: Path, layers: int | None = None) -> Path:
    config = known_config(name, layers)
    g = torch.Generator().manual_seed(0)
    with atomic_directory(out) as tmp:
        w = ShardWriter(tmp, 2 << 30)
        for cname, shape in state_shapes(config).items():
            t = torch.ones(shape) if "layernorm" in cname else torch.randn(shape, generator=g) * 0.02
            w.add(cname, t.half())
        w.finish()
        (tmp / "config.json").write_text(json.dumps(config))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="chatglm3-6b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--layers", type=int, help="fewer blocks than the real model (default: all)")
    ap.add_argument("--dir", default="/tmp/lowvram-qrss")
    ap.add_argument("--method", default="rtn", choices=("rtn", "gptq"))
    ap.add_argument("--calib-samples", type=int, default=8, help="GPTQ: calibration sequences")
    ap.add_argument("--calib-seq-len", type=int, default=256, help="GPTQ: tokens per sequence")
    a = ap.parse_args()
    d = Path(a.dir)
    src, out = d / f"{a.model}-fp16", d / f"{a.model}-int{a.bits}"
    try:
        t = time.time()
        write_source(a.model, src, a.layers)
        print(f"wrote {src} ({sum(f.stat().st_size for f in src.iterdir()) / 1e9:.2f} GB) in {time.time() - t:.0f} s")
        t = time.time()
        cmd = [sys.executable, "-m", "lowvram.cli", "quantize", str(src), "--bits", str(a.bits), "-o", str(out),
               "--force", "--json", "--method", a.method]
        if a.method == "gptq":  # random text ids as calibration: the source has no tokenizer, and GPTQ's memory
            calib = d / "calib.jsonl"  # does not depend on what the ids are
            g = torch.Generator().manual_seed(1)
            calib.write_text("".join(json.dumps({"input_ids": torch.randint(100, 60000, (a.calib_seq_len,), generator=g)
                                                 .tolist()}) + "\n" for _ in range(a.calib_samples)))
            cmd += ["--calib", str(calib), "--calib-samples", str(a.calib_samples), "--calib-seq-len",
                    str(a.calib_seq_len)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.time() - t
        if r.returncode:
            raise SystemExit(r.stderr)
        s = json.loads(r.stdout)
        child = s["peak_rss_bytes"]  # the child's own VmHWM: RUSAGE_CHILDREN also counts this process's RSS at fork
        print(f"{a.method.upper()} int{a.bits} g128 of {a.model}{f' ({a.layers} layers)' if a.layers else ''}: {wall:.0f} s wall, peak RSS {child / 1e9:.2f} GB, "
              f"{s['size_in'] / 1e9:.2f} GB -> {s['size_out'] / 1e9:.2f} GB, "
              f"largest tensor {max(torch.Size(x).numel() for x in state_shapes(known_config(a.model)).values()) * 2 / 1e9:.2f} GB fp16")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
