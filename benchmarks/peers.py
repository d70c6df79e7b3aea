"""lowvram next to chatglm.cpp and llama.cpp on the same random ChatGLM3-6B-shaped weights, same threads.

Each runtime gets the weights in its own format, written by its own code where it has any:
lowvram a GPTQ checkpoint (`lowvram.converters.fullsize`), chatglm.cpp a GGML file from its converter
classes (`chatglm_cpp.convert`, driven with a stand-in config, a lazy random state dict and the real
ChatGLM3 tokenizer.model), llama.cpp an F16 GGUF (architecture `chatglm`, written with the `gguf`
package) quantized by `llama_cpp.llama_model_quantize`. Each runtime then runs in its own process
(peak RSS is per process): prefill of --prompt-len random ids, then greedy decode steps.

The peers are not dependencies; install them outside the repository, e.g.

    python -m venv --system-site-packages /tmp/peers/venv && . /tmp/peers/venv/bin/activate
    pip install gguf tabulate  # chatglm_cpp.convert imports tabulate
    CMAKE_ARGS="-DCMAKE_POLICY_VERSION_MINIMUM=3.5 -DGGML_NATIVE=ON" pip install --no-binary chatglm-cpp chatglm-cpp==0.4.2
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF \
      -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
    python benchmarks/peers.py --bits 4 8 --tokenizer /path/to/chatglm3/tokenizer.model

(llama.cpp's AMX path, as built by GCC 12.2 here, crashes on the first batch: see GLM_FACTS §9. The flags
above are for a CPU with AVX512-BF16; elsewhere, e.g. Ice Lake or Zen 3, build llama.cpp with
`-DGGML_NATIVE=ON` and the AMX options off.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MODEL = "chatglm3-6b"
PEER_TYPE = {4: "q4_0", 8: "q8_0"}
ROOFLINE_PAIRS = 12  # lowvram's extra decode steps, each right after a bandwidth probe


def peak_rss() -> int:
    """VmHWM, as lowvram.bench reads it (not imported: it would bring torch into the peers' processes).
    getrusage's ru_maxrss carries the parent's peak across the fork+exec of a child: this harness held 3.9 GB
    after writing chatglm.cpp's file, and both 4-bit peers reported exactly that."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prompt_ids(n: int, vocab: int = 64000) -> list[int]:
    """Random ids without importing torch (a peer's process should hold only the peer)."""
    import random

    rng = random.Random(0)
    return [rng.randrange(100, vocab) for _ in range(n)]


# ---- writers (run in the parent, one at a time) ---------------------------------------------------


def _shapes():
    """(original tensor name, shape) of chatglm3-6b, from the released config via lowvram's own model."""
    import torch

    from lowvram.checkpoint import original_name
    from lowvram.config import parse_config
    from lowvram.known import known_config
    from lowvram.models.glm import GLM

    cfg = parse_config(known_config(MODEL))
    with torch.device("meta"):
        net = GLM(cfg)
    return known_config(MODEL), [(original_name(cfg.layout, n), tuple(p.shape)) for n, p in net.named_parameters()]


def _random(name: str, shape, seed: int):
    import torch

    if "layernorm" in name:
        return torch.ones(shape)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.02


class LazyStateDict(dict):
    """Random tensors made on access, so the fp32 model is never in memory at once."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes = dict(shapes)

    def __getitem__(self, name):
        if name in self.keys():
            return dict.__getitem__(self, name)
        return _random(name, self.shapes[name], zlib.crc32(name.encode()))

    def __contains__(self, name):
        return name in self.shapes


def write_lowvram(out: Path, bits: int, group_size: int = 128) -> Path:
    from lowvram.converters.fullsize import write_fullsize

    if not out.exists():
        write_fullsize(MODEL, out, bits=bits, group_size=group_size, quantize_head=True, head_bits=8)
    return out


def write_chatglm_cpp(out: Path, bits: int, tokenizer: Path) -> Path:
    if out.exists():
        return out
    import sentencepiece as spm
    from chatglm_cpp import convert as cc

    config, shapes = _shapes()
    conf = SimpleNamespace(**config, pre_seq_len=None, rope_ratio=1)
    model = SimpleNamespace(config=conf, state_dict=lambda: LazyStateDict(shapes))
    tok = SimpleNamespace(tokenizer=SimpleNamespace(sp_model=spm.SentencePieceProcessor(model_file=str(tokenizer))))
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f, contextlib.redirect_stdout(sys.stderr):  # it prints a table of tensors to stdout
        cc.ChatGLM3Converter.convert(f, model, tok, cc.GGMLType[PEER_TYPE[bits].upper()])
    tmp.rename(out)
    return out


def _gguf_vocab(tokenizer: Path, vocab_size: int):
    """Token list, scores and types the way llama.cpp's ChatGLM3 vocabulary expects them."""
    import gguf
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    T = gguf.TokenType
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    toks, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        toks.append(sp.id_to_piece(i).encode())
        scores.append(sp.get_score(i))
        types.append(T.UNKNOWN if sp.is_unknown(i) else T.CONTROL if sp.is_control(i) else
                     T.BYTE if sp.is_byte(i) else T.UNUSED if sp.is_unused(i) else T.NORMAL)
    for i in range(sp.vocab_size(), vocab_size):
        j = i - sp.vocab_size()
        toks.append(specials[j].encode() if j < len(specials) else f"[PAD{i}]".encode())
        scores.append(0.0)
        types.append(T.CONTROL if j < len(specials) else T.UNUSED)
    return toks, scores, types


GGUF_NAMES = {
    "transformer.embedding.word_embeddings.weight": "token_embd.weight",
    "transformer.encoder.final_layernorm.weight": "output_norm.weight",
    "transformer.output_layer.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attention.query_key_value.weight": "attn_qkv.weight",
    "self_attention.query_key_value.bias": "attn_qkv.bias",
    "self_attention.dense.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.dense_h_to_4h.weight": "ffn_up.weight",  # gate ‖ up, as llama.cpp's chatglm graph splits it
    "mlp.dense_4h_to_h.weight": "ffn_down.weight",
}


def _gguf_name(orig: str) -> str:
    if orig in GGUF_NAMES:
        return GGUF_NAMES[orig]
    parts = orig.split(".")  # transformer.encoder.layers.{i}.<rest>
    return f"blk.{parts[3]}." + GGUF_NAMES[".".join(parts[4:])]


def write_gguf_f16(out: Path, tokenizer: Path) -> Path:
    if out.exists():
        return out
    import gguf
    import numpy as np

    config, shapes = _shapes()
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "chatglm")
    w.add_context_length(config["seq_length"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["ffn_hidden_size"])
    w.add_block_count(config["num_layers"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["multi_query_group_num"])
    w.add_layer_norm_rms_eps(config["layernorm_epsilon"])
    w.add_rope_dimension_count(config["kv_channels"] // 2)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_add_bos_token(False)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("chatglm-spm")
    toks, scores, types = _gguf_vocab(tokenizer, config["padded_vocab_size"])
    w.add_token_list(toks)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_eos_token_id(config["eos_token_id"])
    w.add_pad_token_id(config["pad_token_id"])
    f32 = lambda n, s: len(s) == 1  # noqa: E731  norms and biases stay fp32, matrices fp16
    for name, shape in shapes:
        dt = np.float32 if f32(name, shape) else np.float16
        w.add_tensor_info(_gguf_name(name), shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for name, shape in shapes:  # one tensor in memory at a time
        t = _random(name, shape, zlib.crc32(name.encode())).numpy()
        w.write_tensor_data(t.astype(np.float32 if f32(name, shape) else np.float16))
    w.close()
    tmp.rename(out)
    return out


def write_llama_cpp(out: Path, bits: int, tokenizer: Path, threads: int) -> Path:
    if out.exists():
        return out
    import llama_cpp

    f16 = write_gguf_f16(out.parent / f"{MODEL}-f16.gguf", tokenizer)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {4: llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, 8: llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0}[bits]
    params.nthread = threads
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(f16).encode(), str(tmp).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {f16}")
    tmp.rename(out)
    return out


# ---- runners (each in its own process) ------------------------------------------------------------


def run_lowvram(path, prompt_len, steps, threads):
    from lowvram.bench import bench

    r = bench(path, prompt_len, steps, threads=threads, roofline_pairs=ROOFLINE_PAIRS)
    return {"load_s": r["load_s"], "prefill_tok_s": r["prefill_tok_s"], "decode_ms": r["decode_ms_median"],
            "peak_rss": r["peak_rss_bytes"], "roofline_ratio_paired": r["roofline_ratio_paired"],
            "native_path": r.get("native_path")}


def run_chatglm_cpp(path, prompt_len, steps, threads):
    import chatglm_cpp

    t = time.perf_counter()
    p = chatglm_cpp.Pipeline(str(path), max_length=prompt_len + steps + 8)
    load_s = time.perf_counter() - t
    ids = prompt_ids(prompt_len)
    cfg = chatglm_cpp._C.GenerationConfig(max_length=prompt_len + steps + 8, max_context_length=prompt_len + 8,
                                         do_sample=False)
    p.model.generate_next_token(ids, None, cfg, 0, len(ids))  # warm-up prompt, as every runtime here gets
    t = time.perf_counter()
    nxt = p.model.generate_next_token(ids, None, cfg, 0, len(ids))
    prefill = time.perf_counter() - t
    times = []
    for _ in range(steps + 3):
        n_past = len(ids)
        ids.append(nxt)
        t = time.perf_counter()
        nxt = p.model.generate_next_token(ids, None, cfg, n_past, len(ids))
        times.append(time.perf_counter() - t)
    return {"load_s": load_s, "prefill_tok_s": prompt_len / prefill, "decode_ms": 1e3 * statistics.median(times[3:]),
            "peak_rss": peak_rss()}


def run_llama_cpp(path, prompt_len, steps, threads):
    import llama_cpp
    import numpy as np

    t = time.perf_counter()
    # the prompt in one call, computed 512 rows at a time (llama.cpp's default, and lowvram's prefill chunk): a
    # whole 4096-token batch held 3.5 GB more of compute buffers
    llm = llama_cpp.Llama(str(path), n_ctx=prompt_len + steps + 16, n_batch=prompt_len, n_ubatch=min(prompt_len, 512),
                          n_threads=threads, n_threads_batch=threads, use_mmap=False, verbose=False)
    load_s = time.perf_counter() - t
    ids = prompt_ids(prompt_len)
    def last_logits():  # llama-cpp-python 0.3 keeps no scores without logits_all; read the context's own
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

    llm.eval(ids)  # warm-up prompt, as every runtime here gets
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t
    nxt = int(np.argmax(last_logits()))
    times = []
    for _ in range(steps + 3):
        t = time.perf_counter()
        llm.eval([nxt])
        nxt = int(np.argmax(last_logits()))
        times.append(time.perf_counter() - t)
    return {"load_s": load_s, "prefill_tok_s": prompt_len / prefill, "decode_ms": 1e3 * statistics.median(times[3:]),
            "peak_rss": peak_rss()}


RUNNERS = {"lowvram": run_lowvram, "chatglm.cpp": run_chatglm_cpp, "llama.cpp": run_llama_cpp}


def _child(a) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", str(a.threads))
    print(json.dumps(RUNNERS[a.run](a.path, a.prompt_len, a.decode_steps, a.threads)))
    return 0


# ---- the side-by-side table ------------------------------------------------------------------------


def bits_per_weight(path: Path, params: int) -> float:
    size = sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size
    return 8 * size / params


def streamed_bytes(runtime: str, path: Path, bits: int, config: dict) -> int:
    """Bytes of weights read per token: the file minus its embedding table."""
    from roofline import checkpoint_bytes_per_token

    if runtime == "lowvram":
        return checkpoint_bytes_per_token(path)
    emb = config["padded_vocab_size"] * config["hidden_size"]
    if runtime == "llama.cpp":
        import gguf

        emb_bytes = next(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if t.name == "token_embd.weight")
    else:  # chatglm.cpp quantizes the embedding to the file's type (blocks of 32)
        emb_bytes = emb // 32 * (18 if bits == 4 else 34)
    return path.stat().st_size - emb_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=(4, 8))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--decode-steps", type=int, default=24)
    ap.add_argument("--dir", default="/tmp/lowvram-peers", help="where the random checkpoints go (~25 GB at peak)")
    ap.add_argument("--runtimes", default="lowvram,chatglm.cpp,llama.cpp")
    ap.add_argument("--group-size", type=int, default=128,
                    help="lowvram's GPTQ group size (32: the peers' block size, at 4.6 bits/weight against Q4_0's 4.5)")
    ap.add_argument("--tokenizer", default=os.environ.get("CHATGLM3_TOKENIZER", "/work/shared/reference/tokenizers/chatglm3/tokenizer.model"),
                    help="ChatGLM3 tokenizer.model (the peers' files embed it)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every runtime this many times, interleaved (the order rotates each round); the table "
                         "gives medians, and each ratio is the median of the ratios within a round")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--run", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--table", metavar="FILE", help="print the table of a saved --json run and exit")
    a = ap.parse_args(argv)
    if a.run:
        return _child(a)
    if a.table:
        d = json.loads(Path(a.table).read_text())
        table(d["results"], sorted({r["bits"] for r in d["results"]}), d["threads"], d["read_bandwidth_GBps"] * 1e9,
              d.get("prompt_len", 512))
        return 0

    from roofline import read_bandwidth

    from lowvram.known import known_config

    config = known_config(MODEL)
    _, shapes = _shapes()
    params = sum(int(__import__("math").prod(s)) for _, s in shapes)
    d = Path(a.dir)
    d.mkdir(parents=True, exist_ok=True)
    bw = read_bandwidth(a.threads)
    results = []
    runtimes = a.runtimes.split(",")
    paths: dict = {}
    order = [(bits, rnd, rt) for bits in a.bits for rnd in range(a.rounds)
             for rt in runtimes[rnd % len(runtimes):] + runtimes[: rnd % len(runtimes)]]  # no runtime always first
    for bits, rnd, rt in order:
        if (bits, rt) not in paths:
            try:
                lv = f"lowvram-int{bits}" + ("" if a.group_size == 128 else f"-g{a.group_size}")
                paths[bits, rt] = {
                    "lowvram": lambda: write_lowvram(d / lv, bits, a.group_size),
                    "chatglm.cpp": lambda: write_chatglm_cpp(d / f"chatglm-cpp-{PEER_TYPE[bits]}.bin", bits, Path(a.tokenizer)),
                    "llama.cpp": lambda: write_llama_cpp(d / f"llama-{PEER_TYPE[bits]}.gguf", bits, Path(a.tokenizer), a.threads),
                }[rt]()
            except ImportError as e:
                paths[bits, rt] = None
                results.append({"runtime": rt, "bits": bits, "error": f"not installed ({e.name})"})
                print(f"{rt}: not installed ({e})", file=sys.stderr)
        path = paths[bits, rt]
        if path is None:
            continue
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), LOWVRAM_THREADS=str(a.threads))
        bw_before = read_bandwidth(a.threads)  # this VM's bandwidth drifts by 15-35% over minutes: bracket each run
        p = subprocess.run([sys.executable, __file__, "--run", rt, "--path", str(path), "--threads", str(a.threads),
                            "--prompt-len", str(a.prompt_len), "--decode-steps", str(a.decode_steps)],
                           capture_output=True, text=True, env=env)
        if p.returncode != 0:
            results.append({"runtime": rt, "bits": bits, "error": p.stderr.strip().splitlines()[-1:]})
            print(f"{rt} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
            continue
        bw_after = read_bandwidth(a.threads)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        n = streamed_bytes(rt, path, bits, config)
        bw_run = (bw_before + bw_after) / 2
        r.update(runtime=rt, bits=bits, round=rnd, format=(f"GPTQ g{a.group_size} + int8 head" if rt == "lowvram" else PEER_TYPE[bits].upper()),
                 bits_per_weight=round(bits_per_weight(path, params), 2), bytes_per_token=n,
                 roofline_ms=round(1e3 * n / bw, 1),
                 read_bandwidth_GBps=[round(bw_before / 1e9, 2), round(bw_after / 1e9, 2)],
                 roofline_ms_at_run=round(1e3 * n / bw_run, 1))
        results.append(r)
        print(json.dumps(r), file=sys.stderr)
    if a.json:
        print(json.dumps({"threads": a.threads, "prompt_len": a.prompt_len, "read_bandwidth_GBps": round(bw / 1e9, 2),
                          "results": results}, indent=2))
        return 0
    table(results, a.bits, a.threads, bw, a.prompt_len)
    return 0


def merge_rounds(results) -> list[dict]:
    """One row per (bits, runtime): medians over rounds, and each ratio to lowvram as the median of the ratios
    within a round (a VM's phase moves both runtimes of a round alike). A single round passes through."""
    keys = list(dict.fromkeys((r["bits"], r["runtime"]) for r in results))
    out = []
    for bits, rt in keys:
        rs = [r for r in results if (r["bits"], r["runtime"]) == (bits, rt) and "error" not in r]
        if not rs:
            out.append(next(r for r in results if (r["bits"], r["runtime"]) == (bits, rt)))
            continue
        m = dict(rs[0], rounds=len(rs))
        for k in ("decode_ms", "prefill_tok_s", "roofline_ms_at_run", "roofline_ratio_paired", "load_s"):
            if all(k in r for r in rs):
                m[k] = statistics.median(r[k] for r in rs)
        m["peak_rss"] = max(r["peak_rss"] for r in rs)
        m["each_decode_ms"] = [round(r["decode_ms"], 1) for r in rs]
        base = {r.get("round", 0): r for r in results if r["bits"] == bits and r["runtime"] == "lowvram" and "error" not in r}
        for k in ("decode_ms", "prefill_tok_s", "peak_rss"):
            ratios = [r[k] / base[r.get("round", 0)][k] for r in rs if r.get("round", 0) in base]
            if ratios:
                m[f"ratio_{k}"] = statistics.median(ratios)
        out.append(m)
    return out


def table(results, bits_list, threads, bw, prompt_len):
    """The side-by-side markdown table (also from a saved --json run: --table FILE)."""
    per_run = any("roofline_ms_at_run" in r for r in results)
    rounds = max((r.get("round", 0) for r in results), default=0) + 1
    print(f"read bandwidth ({threads} threads): {bw / 1e9:.1f} GB/s at the start; "
          + ("each row's roofline at the mean bandwidth measured just before and after its run; " if per_run else "")
          + f"prompt {prompt_len} tokens; ratios are peer / lowvram"
          + (f"; {rounds} interleaved rounds: medians, ratios the median of each round's ratio" if rounds > 1 else ""))
    print("| runtime | format | bits/weight | decode ms/token | ×lowvram | roofline ms | ×roofline | prefill tok/s "
          "| ×lowvram | peak RSS GB | ×lowvram |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    merged = merge_rounds(results)
    for bits in bits_list:
        for r in (r for r in merged if r["bits"] == bits):
            if "error" in r:
                print(f"| {r['runtime']} | {bits}-bit | — | {r['error']} | | | | | | | |")
                continue
            ratio = lambda k: f"{r[f'ratio_{k}']:.2f}" if f"ratio_{k}" in r else "—"  # noqa: E731
            roof = r.get("roofline_ms_at_run", r["roofline_ms"])  # at the bandwidth measured around this run
            print(f"| {r['runtime']} | {r['format']} | {r['bits_per_weight']} | {r['decode_ms']:.0f} | {ratio('decode_ms')} "
                  f"| {roof:.1f} | {r['decode_ms'] / roof:.2f} | {r['prefill_tok_s']:.1f} | {ratio('prefill_tok_s')} | {r['peak_rss'] / 1e9:.2f} "
                  f"| {ratio('peak_rss')} |")
    for r in merged:
        if "roofline_ratio_paired" in r:
            print(f"lowvram {r['bits']}-bit, each of {ROOFLINE_PAIRS} more decode steps against the bandwidth probed just before it: "
                  f"{r['roofline_ratio_paired']:.2f}x roofline (median)")
    for bits in bits_list:
        loads = [f"{r['runtime']} {r['load_s']:.2f}" for r in merged if r["bits"] == bits and "load_s" in r]
        if loads:
            print(f"{bits}-bit load s (median): " + ", ".join(loads))
    if rounds > 1:
        for r in merged:
            if "each_decode_ms" in r:
                print(f"{r['runtime']} {r['bits']}-bit decode ms/token per round: {r['each_decode_ms']}")


if __name__ == "__main__":
    sys.exit(main())
