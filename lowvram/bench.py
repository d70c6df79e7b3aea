"""`lowvram bench MODEL`: load time, prefill tok/s, time to first token, decode ms/token, peak memory."""

from __future__ import annotations

import json
import resource
import collections
import statistics
import sys
import time

import torch


def peak_rss() -> int:
    """This process's peak RSS: VmHWM on Linux (getrusage's ru_maxrss can carry the parent's RSS across a
    fork+exec, so a benchmark harness holding gigabytes would inflate it), getrusage elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def graphed_step(model, caches, next_slot: int):
    """Greedy decode step `ids -> next id` replayed from a CUDA graph (the slot and position are tensors).

    Capturing runs the step on placeholder input, which writes cache slot `next_slot`: the first real
    step overwrites it."""
    from lowvram.kernels.cuda import GraphedStep
    from lowvram.streaming import StreamedBlock

    net, dev = model.net, model.net.layer_device(0)
    if any(isinstance(b, StreamedBlock) for b in net.layers):  # its copies and events live outside a graph
        raise ValueError("--cuda-graph needs every block resident on the GPU (not --stream)")
    if any(type(m).__module__.endswith("kernels.bnb") for m in net.modules()):  # LLM.int8 syncs with the host
        raise ValueError("--cuda-graph does not capture the bnb backend; use the cuda backend")
    if any(net.layer_device(i) != dev for i in range(len(net.layers))) or dev.type != "cuda":
        raise ValueError("--cuda-graph needs the whole model on one CUDA device")
    if model.kv_int8:
        raise ValueError("--cuda-graph works with the float KV cache only (not --kv-int8)")
    P = model.config.pre_seq_len
    # the embedding row is looked up outside the graph: the table lives on the CPU (read from the file)
    bufs = (torch.zeros(1, 1, model.config.hidden_size, dtype=model.dtype, device=dev),
            model.positions([0], 0, 1).to(dev), torch.full((1,), P + next_slot, dtype=torch.long, device=dev))
    g = GraphedStep(lambda x, pos, slot: net.head(net.hidden(x, pos, caches, slot)).argmax(-1), *bufs)

    def step(ids):
        n = len(ids) - 1
        x = net.embed(torch.tensor([[ids[-1]]], device=net.embed.weight.device))
        return int(g(x, model.positions(ids, n, 1), torch.tensor([P + n])).view(-1)[0])

    return step


def streamed_bytes(net) -> int:
    """Bytes a decode step reads: every weight but the word embeddings (one row is looked up)."""
    total, seen = 0, set()
    for name, m in net.named_modules():
        if name == "embed" or name.startswith("embed.") or any(name.startswith(p + ".") for p in seen):
            continue
        if callable(getattr(m, "nbytes", None)):  # a quantized linear: its packed weights, scales, zeros, bias
            total += m.nbytes()
            seen.add(name)
            continue
        total += sum(t.numel() * t.element_size() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
    return total


def read_bandwidth(threads: int = 2, nbytes: int = 512 << 20, repeats: int = 2) -> float:
    """Bytes/s of a parallel sum over a buffer far larger than the last-level cache (best of `repeats`)."""
    x = torch.ones(nbytes // 4)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = float("inf")
        for _ in range(repeats):
            t = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t)
        return nbytes / best
    finally:
        torch.set_num_threads(old)


def bench(path, prompt_len: int = 512, decode_steps: int = 32, warmup: int = 3, threads: int | None = None,
          cuda_graph: bool = False, kv_int8: bool = False, roofline_pairs: int = 0, **load_kw) -> dict:
    """roofline_pairs (CPU): after the measurements, that many (bandwidth probe, decode step) pairs; each step's
    time against the roofline of the bandwidth measured just before it. A shared VM's bandwidth swings by
    15-35% within minutes, so a ratio to a bandwidth measured at another time says more about the VM."""
    import lowvram
    from .tokenizer import generation_of

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = lowvram.load(path, tokenizer=False, **load_kw)
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss()
    model.kv_int8 = kv_int8
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(cfg.vocab_size, 60000), (prompt_len,), generator=g).tolist()
    if cfg.rope == "2d" and cfg.gmask_token_id is not None:
        ids[-2:] = [cfg.gmask_token_id, cfg.sop_token_id]
    total = prompt_len + warmup + decode_steps + roofline_pairs

    def greedy(ids, caches):  # one decode step of the last id: the next id
        return int(model.net.head(model.forward(ids, len(ids) - 1, 1, caches)).float().argmax())

    with torch.inference_mode():
        # The first prompt pays one-time costs (oneDNN kernel generation per shape, workspace and page
        # faults): reported as the cold time to first token; prefill speed is that of the second prompt.
        # It runs through Model.generate, the path chat and the API take, so a slow step there shows up here
        # (one did: the head copied its whole float weight for generate's last-position slice).
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1)
        ttft_cold = time.perf_counter() - t
        caches = model.new_cache(cfg.pre_seq_len + total)
        t = time.perf_counter()
        h = model.forward(ids, 0, prompt_len, caches)
        prefill_s = time.perf_counter() - t
        nxt = int(model.net.head(h[-1:]).float().argmax())
        ttft = time.perf_counter() - t
        step = graphed_step(model, caches, len(ids)) if cuda_graph else None
        steps = []
        for i in range(warmup + decode_steps):
            ids.append(nxt)
            t = time.perf_counter()
            if step is not None:
                nxt = step(ids)
            else:
                nxt = greedy(ids, caches)
            steps.append(time.perf_counter() - t)
    dev = {"peak_rss_bytes": peak_rss()}  # before the roofline probes' buffer
    on_cpu = str(load_kw.get("device") or "cpu") == "cpu" and not load_kw.get("placement")
    if roofline_pairs and on_cpu:
        nbytes, ratios = streamed_bytes(model.net), []
        with torch.inference_mode():
            for _ in range(roofline_pairs):
                bw = read_bandwidth(torch.get_num_threads())
                ids.append(nxt)
                t = time.perf_counter()
                nxt = greedy(ids, caches)
                ratios.append((time.perf_counter() - t) / (nbytes / bw))
        dev.update(streamed_bytes=nbytes, roofline_ratio_paired=round(statistics.median(ratios), 3),
                   roofline_ratios=[round(r, 3) for r in ratios])
    if on_cpu:
        from .memory import predict_rss

        p = predict_rss(path, dtype=model.dtype, backend=load_kw.get("backend"), prompt_len=prompt_len,
                        new_tokens=warmup + decode_steps, prefill_chunk=model.prefill_chunk, kv_int8=kv_int8,
                        cfg=cfg)
        dev["predicted_rss_bytes"] = p.peak
        dev["predicted_rss"] = p.as_dict()
    if torch.cuda.is_available():
        dev["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    decode = steps[warmup:]
    # which quantized-linear modules ran, by backend module (e.g. {"native": 113}): says what was measured
    kernels = dict(collections.Counter(type(m).__module__.rpartition(".")[2] for m in model.net.modules()
                                       if type(m).__module__.startswith("lowvram.kernels")))
    if "native" in kernels:  # the native kernel's instruction-set path differs per CPU and decides its speed
        from .kernels import native

        dev["native_path"] = native.isa()
    return {
        "model": str(path), "generation": generation_of(path, cfg), "dtype": str(model.dtype).removeprefix("torch."),
        "kernels": kernels,
        "threads": torch.get_num_threads(), "cuda_graph": cuda_graph, "kv_int8": kv_int8, "load_s": round(load_s, 3),
        "repack_cache": model.report.get("repack_cache"), "prompt_len": prompt_len,
        "prefill_tok_s": round(prompt_len / prefill_s, 2), "ttft_s": round(ttft, 4), "ttft_cold_s": round(ttft_cold, 4),
        "decode_ms_median": round(1e3 * statistics.median(decode), 2), "decode_ms_min": round(1e3 * min(decode), 2),
        "decode_steps": len(decode), "peak_rss_after_load_bytes": rss_loaded, **dev,
    }


def bench_arguments(p):
    from .placement import placement_arguments

    p.add_argument("model", help="checkpoint directory")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--backend", default=None)
    p.add_argument("--placement", default=None)
    placement_arguments(p)
    p.add_argument("--ctx", type=int, default=None, help="context to plan for with --gpu-mem/--max-memory")
    p.add_argument("--cuda-graph", action="store_true", help="replay each decode step from a CUDA graph")
    p.add_argument("--kv-int8", action="store_true", help="int8 KV cache")
    p.add_argument("--roofline", type=int, default=0, metavar="N",
                   help="CPU: N more decode steps, each right after a read-bandwidth probe; prints the median ratio "
                        "of step time to the bytes-streamed / bandwidth roofline")
    p.add_argument("--json", action="store_true")


def bench_main(args) -> int:
    from .placement import budgets_from_arguments

    for flag, v, least in (("--prompt-len", args.prompt_len, 1), ("--decode-steps", args.decode_steps, 1),
                           ("--threads", args.threads, 1), ("--roofline", args.roofline, 0), ("--ctx", args.ctx, 1)):
        if v is not None and v < least:  # before the load: each would fail late or measure nothing
            raise ValueError(f"{flag} must be >= {least}, got {v}")
    r = bench(args.model, args.prompt_len, args.decode_steps, threads=args.threads, cuda_graph=args.cuda_graph, kv_int8=args.kv_int8,
              device=args.device,
              dtype=args.dtype, backend=args.backend, placement=args.placement, ctx=args.ctx,
              max_memory=budgets_from_arguments(args), stream=args.stream, roofline_pairs=args.roofline)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"{r['generation']} ({r['dtype']}, {r['threads']} threads) from {r['model']}")
    if r["kernels"]:
        path = f" (its {r['native_path']} path)" if r.get("native_path") else ""
        print("  kernels         " + ", ".join(f"{k} x{n}" for k, n in r["kernels"].items()) + path)
    cache = f" (repack cache: {r['repack_cache']})" if r.get("repack_cache") else ""
    print(f"  load            {r['load_s']:.2f} s{cache}")
    print(f"  prefill         {r['prefill_tok_s']:.1f} tok/s ({r['prompt_len']} tokens), first token {r['ttft_s']:.2f} s "
          f"({r['ttft_cold_s']:.2f} s for the first prompt after load)")
    print(f"  decode          {r['decode_ms_median']:.1f} ms/token median (min {r['decode_ms_min']:.1f}, {r['decode_steps']} steps)")
    print(f"  peak RSS        {r['peak_rss_bytes'] / 2**30:.2f} GiB (after load {r['peak_rss_after_load_bytes'] / 2**30:.2f})")
    if "predicted_rss_bytes" in r:
        p = r["predicted_rss"]
        print(f"  predicted RSS   {r['predicted_rss_bytes'] / 2**30:.2f} GiB (runtime {p['runtime'] / 2**30:.2f}, weights "
              f"{p['weights'] / 2**30:.2f}, KV {p['kv_cache'] / 2**30:.2f}, embeddings in the file {p['mapped'] / 2**30:.2f})")
    if "roofline_ratio_paired" in r:
        print(f"  roofline        {r['roofline_ratio_paired']:.2f}x (median over {len(r['roofline_ratios'])} steps, each "
              f"against {r['streamed_bytes'] / 1e9:.2f} GB / the bandwidth probed just before it)")
    if "peak_cuda_bytes" in r:
        print(f"  peak CUDA       {r['peak_cuda_bytes'] / 2**30:.2f} GiB")
    return 0
