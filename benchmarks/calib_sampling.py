"""GPTQ's self-written calibration text: time and peak RSS of sampling it, by the source or an INT8 copy.

    python benchmarks/calib_sampling.py [--model chatglm3-6b] [--samples 8] [--seq-len 64]

Writes a random fp16 source with the model's real shapes (benchmarks/quantize_rss.py), then runs the
calibration step of `lowvram quantize --method gptq` without --calib in a child process per mode:
the source model one row at a time (what the quantizer did before batched sampling), the source
with every row in one batch, and an INT8 RTN copy with every row in one batch (`--calib-model int8`;
its wall time includes writing the copy). Prints one line per mode; the directory is deleted after.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_rss import write_source  # noqa: E402

CHILD = """
import json, sys, time
from pathlib import Path
from lowvram.config import load_config
from lowvram.converters import quantize as q
src, mode, batch, samples, seq_len, work = sys.argv[1:7]
cfg = load_config(src)
if batch == "1":
    q.SAMPLING_KV_BYTES = 1  # one row per batch
copy = {"seconds": 0.0}
write_copy = q.quantize  # the INT8 copy is written by quantize(): timed apart from the sampling


def timed(*a, **k):
    t = time.time()
    try:
        return write_copy(*a, **k)
    finally:
        copy["seconds"] += time.time() - t


q.quantize = timed
t = time.time()
seqs, what = q._calibration_ids(Path(src), cfg, None, int(samples), int(seq_len), 0, "cpu", mode, Path(work), False)
wall = time.time() - t
rss = next(int(x.split()[1]) * 1024 for x in open("/proc/self/status") if x.startswith("VmRSS:"))
print(json.dumps({"seconds": wall, "copy_seconds": copy["seconds"], "peak_rss_bytes": q.peak_rss(), "rss_after": rss,
                  "tokens": sum(map(len, seqs)), **what}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="chatglm3-6b")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--modes", nargs="+", default=["source/1", "source/all", "int8/all"])
    ap.add_argument("--dir", default="/tmp/lowvram-calib")
    a = ap.parse_args()
    d = Path(a.dir)
    src = d / f"{a.model}-fp16"
    try:
        write_source(a.model, src)
        for m in a.modes:
            mode, batch = m.split("/")
            work = d / "work"
            work.mkdir(exist_ok=True)
            r = subprocess.run([sys.executable, "-c", CHILD, str(src), mode, "1" if batch == "1" else "all",
                                str(a.samples), str(a.seq_len), str(work)], capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr)
            s = json.loads(r.stdout)
            sampling = s["seconds"] - s["copy_seconds"]
            copy = f" (INT8 copy written in {s['copy_seconds']:.0f} s)" if mode == "int8" else ""
            print(f"{a.model}, {a.samples} x {a.seq_len} tokens, sampler {mode}, batch {s['batch']}: "
                  f"{s['seconds']:.0f} s{copy}, "
                  f"load + sampling {1000 * sampling / (a.samples * (a.seq_len - 1)):.0f} ms per sampled token, "
                  f"peak RSS {s['peak_rss_bytes'] / 1e9:.2f} GB, RSS after sampling {s['rss_after'] / 1e9:.2f} GB", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
