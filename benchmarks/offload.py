"""Issue 6 on a GPU: a GLM-4-9B-shaped INT4 model under a GPU memory cap, blocks split between GPU and CPU.

    python benchmarks/offload.py [--model glm-4-9b-chat] [--cap 6GiB,4GiB] [--budget 8GiB --ctx 8192] [--accelerate]

Writes a random INT4 checkpoint with the model's real shapes (lowvram.converters.fullsize), then one
`lowvram bench` per row, each in its own process: every block on the CPU, every block on the GPU, under each
--cap with the planner's split (the blocks that do not fit compute on the CPU, where their weights live), and the same cap with
those blocks streamed through the GPU instead. Then the memory model against the GPU: --budget enforced
with torch.cuda.set_per_process_memory_fraction, a --ctx-token prompt, the plan's bytes for cuda:0
beside torch.cuda.max_memory_allocated. --accelerate adds transformers + accelerate's offload of the
bf16 model (glm-4-9b-chat-hf layout, random, written here): device_map="auto" under the same cap, and
a device_map with the same blocks on the CPU as lowvram's plan (CPU blocks' weights copied to the GPU
at each forward). Without a GPU only the all-CPU row runs. --layers N: same shapes, fewer blocks.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantize_rss import write_source  # noqa: E402

from lowvram.bench import bench  # noqa: E402
from lowvram.config import load_config  # noqa: E402
from lowvram.converters.fullsize import write_fullsize  # noqa: E402
from lowvram.loading import embeddings_will_map  # noqa: E402
from lowvram.placement import parse_size, plan  # noqa: E402


def bench_in_child(path: Path, prompt: int, steps: int, kw: dict) -> dict:
    """One `bench` in its own process: its peak RSS and GPU memory are that row's alone (this process wrote the
    checkpoint, and a process's peak RSS never goes down)."""
    code = ("import json, sys; from lowvram.bench import bench; "
            "r = bench(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), **json.loads(sys.argv[4])); "
            "print('\\n' + json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code, str(path), str(prompt), str(steps), json.dumps(kw)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"bench {kw} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def lowvram_rows(path: Path, caps: list[int], prompt: int, steps: int) -> tuple[list[dict], int, list[int]]:
    """All CPU, all GPU, then per cap the planner's split and the same cap streamed. Returns the rows and the
    first cap that put blocks on the CPU with those blocks (the accelerate rows reuse that split)."""
    rows = [("all CPU", dict(device="cpu"))]
    split_cap, split_blocks = caps[0], []
    if torch.cuda.is_available():
        rows.append(("all GPU", dict(device="cuda")))
        for cap in caps:
            capped = dict(device="cuda", max_memory={"cuda:0": cap, "cpu": 1 << 40}, ctx=prompt + steps + 8)
            p = plan(load_config(path), capped["max_memory"], capped["ctx"], 4, 128,
                     mapped_embeddings=embeddings_will_map(path))
            cpu_blocks = p.blocks.get("cpu", [])
            if not cpu_blocks:  # the cap rows would repeat "all GPU"
                print(f"cap {cap / 2**30:.1f} GiB: every block fits on the GPU at {capped['ctx']} tokens "
                      f"({p.bytes['cuda:0'] / 2**30:.2f} GiB planned); no split to measure")
                continue
            if not split_blocks:
                split_cap, split_blocks = cap, cpu_blocks
            rows += [(f"cap {cap / 2**30:.1f} GiB: {len(cpu_blocks)} blocks on the CPU", capped),
                     (f"cap {cap / 2**30:.1f} GiB, streamed", dict(capped, stream=True))]
    out = []
    for label, kw in rows:
        r = bench_in_child(path, prompt, steps, kw)
        r["row"] = label
        out.append(r)
        print(f"| lowvram | {label} | {r['decode_ms_median']:.1f} | {r['prefill_tok_s']:.1f} | "
              f"{(r.get('peak_cuda_bytes') or 0) / 2**30:.2f} | {r['peak_rss_bytes'] / 2**30:.2f} |", flush=True)
    return out, split_cap, split_blocks


def memory_check(path: Path, budget: int, ctx: int) -> dict:
    """The plan's bytes on cuda:0 for `ctx` tokens against what the GPU really allocated, under `budget`."""
    cfg = load_config(path)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), 0)
    budgets = {"cuda:0": budget, "cpu": 1 << 40}
    p = plan(cfg, budgets, ctx, 4, 128, mapped_embeddings=embeddings_will_map(path))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    r = bench(path, ctx - 16, 8, warmup=1, device="cuda", max_memory=budgets, ctx=ctx)
    torch.cuda.set_per_process_memory_fraction(1.0, 0)
    got, want = r["peak_cuda_bytes"], p.bytes["cuda:0"]
    print(f"memory model: {len(p.blocks['cuda:0'])} blocks on cuda:0 under {budget / 2**30:.1f} GiB at {ctx} tokens; "
          f"predicted {want / 2**30:.2f} GiB, max_memory_allocated {got / 2**30:.2f} GiB ({got / want - 1:+.1%})")
    return {"budget": budget, "ctx": ctx, "predicted_cuda_bytes": want, "max_memory_allocated": got,
            "blocks_on_gpu": len(p.blocks["cuda:0"])}


def accelerate_rows(model: str, layers: int | None, d: Path, cap: int, cpu_blocks: list[int], prompt: int,
                    steps: int, device: str = "cuda") -> list[dict]:
    """transformers + accelerate on the bf16 model: its own device_map="auto" under `cap`, and lowvram's split."""
    try:
        import accelerate  # noqa: F401  (transformers needs it for any device_map)
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        print(f"accelerate rows skipped: {e}")
        return []
    hf = write_source(f"{model}-hf", d / "hf-bf16", layers)
    n = load_config(hf).num_layers
    maps = {"device_map=auto": dict(device_map="auto", max_memory={0: cap, "cpu": 1 << 40})}
    if device != "cpu":
        same = {"model.embed_tokens": 0, "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
        same.update({f"model.layers.{i}": "cpu" if i in cpu_blocks else 0 for i in range(n)})
        maps["lowvram's split"] = dict(device_map=same)
    else:  # no GPU: one CPU run checks that the random source loads and decodes through transformers
        maps = {"CPU only (no GPU: a check of this code, not a measurement)": dict(device_map={"": "cpu"})}
    out = []
    for label, kw in maps.items():
        m = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.bfloat16, **kw)
        dev = next(p.device for p in m.parameters() if p.device.type != "meta")
        ids = torch.randint(100, 60000, (1, prompt), generator=torch.Generator().manual_seed(0)).to(dev)
        times = []
        with torch.no_grad():
            o = m(ids, use_cache=True)
            past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
            for _ in range(3 + steps):
                t = time.perf_counter()
                o = m(nxt, past_key_values=past, use_cache=True)
                past, nxt = o.past_key_values, o.logits[:, -1:].argmax(-1)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
        on_cpu = sum(1 for v in getattr(m, "hf_device_map", {}).values() if v == "cpu")
        r = {"row": label, "decode_ms_median": 1e3 * statistics.median(times[3:]), "modules_on_cpu": on_cpu}
        out.append(r)
        print(f"| transformers+accelerate bf16 | {label} ({on_cpu} modules on the CPU) | {r['decode_ms_median']:.1f} | | | |",
              flush=True)
        del m, past, o
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="glm-4-9b-chat")
    ap.add_argument("--layers", type=int, help="fewer blocks than the real model (same shapes): a quick check")
    ap.add_argument("--cap", default="6GiB,4GiB", help="GPU memory caps for the split rows, comma-separated "
                    "(GLM-4-9B INT4 fits 6 GiB whole at a 536-token context; 4 GiB splits it)")
    ap.add_argument("--budget", default="8GiB", help="GPU memory for the memory-model check")
    ap.add_argument("--ctx", type=int, default=8192, help="context of the memory-model check")
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--accelerate", action="store_true")
    ap.add_argument("--dir", default="/tmp/lowvram-offload")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{a.model}-int4{f'-{a.layers}l' if a.layers else ''}"
    try:
        if not path.exists():
            write_fullsize(a.model, path, bits=4, layers=a.layers)
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        print(f"{a.model}{f' ({a.layers} blocks)' if a.layers else ''} INT4 g128 + int8 head; {gpu}; "
              f"{a.prompt_len}-token prompt, {a.decode_steps} decode steps")
        print("| runtime | placement | decode ms/token | prefill tok/s | peak GPU GiB | peak RSS GiB |")
        print("| --- | --- | --- | --- | --- | --- |")
        caps = [parse_size(c) for c in a.cap.split(",")]
        res = {"gpu": gpu}
        res["lowvram"], cap, cpu_blocks = lowvram_rows(path, caps, a.prompt_len, a.decode_steps)
        if a.accelerate:
            res["accelerate"] = accelerate_rows(a.model, a.layers, d, cap, cpu_blocks, a.prompt_len, a.decode_steps,
                                                "cuda" if torch.cuda.is_available() else "cpu")
        if torch.cuda.is_available():
            res["memory"] = memory_check(path, parse_size(a.budget), a.ctx)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=2))
    finally:
        shutil.rmtree(d / "hf-bf16", ignore_errors=True)


if __name__ == "__main__":
    main()
