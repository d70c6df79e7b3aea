"""How many bytes a GLM model needs, per block and per device, without loading it.

One formula per thing that takes memory: quantized weights in the GPTQ layout (what every backend
keeps, within ~10%), float weights, the KV cache per token, and the prefill workspace. The planner
and `lowvram plan` both read from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import GLMConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}
RUNTIME_OVERHEAD = {"cpu": 350 << 20, "cuda": 500 << 20, "mps": 300 << 20}  # Python+torch / CUDA context


def quantized_bytes(n_out: int, n_in: int, bits: int | None, group: int, dtype_bytes: int = 2) -> int:
    """A linear's resident bytes: packed ints + fp16 scales + packed zeros + g_idx (or plain floats)."""
    if not bits:
        return n_out * n_in * dtype_bytes
    groups = 1 if group <= 0 else -(-n_in // group)
    return n_out * n_in * bits // 8 + groups * n_out * 2 + groups * n_out * bits // 8 + n_in * 4


def block_linears(cfg: GLMConfig) -> list[tuple[int, int]]:
    up = 2 * cfg.ffn_hidden_size if cfg.mlp == "swiglu" else cfg.ffn_hidden_size
    return [(cfg.q_size + 2 * cfg.kv_size, cfg.hidden_size), (cfg.hidden_size, cfg.q_size),
            (up, cfg.hidden_size), (cfg.hidden_size, cfg.ffn_hidden_size)]


@dataclass
class Footprint:
    block_weights: int  # one transformer block
    embeddings: int
    output: int
    kv_per_token_per_block: int
    prefill_workspace: int  # activations of one prefill chunk

    def block(self, ctx: int) -> int:
        return self.block_weights + self.kv_per_token_per_block * ctx

    def total(self, ctx: int, layers: int) -> int:
        return self.embeddings + self.output + layers * self.block(ctx) + self.prefill_workspace


def footprint(cfg: GLMConfig, bits: int | None = 4, group: int = 128, head_bits: int | None = 8,
              dtype: str = "bfloat16", kv_dtype: str | None = None, prefill_chunk: int = 512) -> Footprint:
    """Bytes for `cfg` quantized to `bits` (None = unquantized `dtype`)."""
    db = DTYPE_BYTES[dtype]
    blk = sum(quantized_bytes(o, i, bits, group, db) for o, i in block_linears(cfg))
    blk += (4 if cfg.norm == "layernorm" else 2) * cfg.hidden_size * db  # norms (+biases)
    blk += (cfg.q_size + 2 * cfg.kv_size) * db if cfg.qkv_bias else 0
    emb = cfg.vocab_size * cfg.hidden_size * db
    out = 0 if cfg.tie_word_embeddings else quantized_bytes(cfg.vocab_size, cfg.hidden_size, head_bits, -1, db)
    if qe_bits := (cfg.quantization or {}).get("embeddings") and cfg.quantization.get("thudm_bits"):
        # THUDM quantized embeddings: the packed table (int rows + a scale each) and a head over the same ints
        emb = out = cfg.vocab_size * (cfg.hidden_size * qe_bits // 8 + 2)
    kvb = DTYPE_BYTES[kv_dtype or dtype]
    kv = 2 * cfg.kv_size * kvb
    up = 2 * cfg.ffn_hidden_size if cfg.mlp == "swiglu" else cfg.ffn_hidden_size
    work = prefill_chunk * (4 * cfg.hidden_size + up + cfg.q_size + 2 * cfg.kv_size) * 4
    work += prefill_chunk * cfg.vocab_size * 4 // prefill_chunk  # logits of the last position only
    return Footprint(blk, emb, out, kv, work)


# ---- peak RSS of a CPU run, predicted from a checkpoint's own tensors --------------------------------
# The runtime baseline: VmHWM of a process that imported torch + lowvram, built a tiny float model and
# generated a few tokens (measured on this project's machine, torch 2.13, Python 3.11: 255 MiB, of which
# ~100 MiB are mapped shared libraries; it was 313 MiB while building on the meta device still ran nn's
# initialisers, which import torch._dynamo and sympy). ONNX Runtime (backend "ort", or "native" handing
# it the shapes it does not take: in_features not a multiple of 128) adds its libraries and session state:
# +36 MiB measured the same way; the native kernel and torch's int4pack/int8pack add nothing measurable.
# Re-measure on another machine/torch with
# `python -c "import lowvram; m = lowvram.load('examples/glm4-tiny'); m.generate([1, 2, 3], 4)"` and VmHWM.
CPU_RUNTIME_BYTES = 255 << 20
# What is resident when the first tensor is read (torch and lowvram imported, nothing built or run yet):
# the baseline of the output layer's load, which comes first (`python -c "import lowvram"`: 220 MiB).
CPU_IMPORT_BYTES = 220 << 20
QUANT_KERNEL_RUNTIME_BYTES = {"ort": 36 << 20, "bnb": 120 << 20}  # bnb: `import bitsandbytes`, measured the same way


@dataclass
class RSSPrediction:
    runtime: int  # imported runtime (CPU_RUNTIME_BYTES + ONNX Runtime when it runs a linear)
    weights: int  # resident weights after load (mapped embeddings: only the rows a run looks up)
    mapped: int  # bytes of the mapped embedding table that are NOT counted (they stay in the file)
    kv_cache: int
    workspace: int  # prefill activations of one chunk + the last position's logits
    load_transient: int  # largest buffer alive beside the weights while loading (a tensor being converted)
    head_first: int = 0  # the output layer, loaded first, with its file copy: resident before anything else

    @property
    def peak(self) -> int:
        return max(self.runtime + self.weights + max(self.load_transient, self.kv_cache + self.workspace),
                   CPU_IMPORT_BYTES + self.head_first)

    def as_dict(self) -> dict:
        return {"peak": self.peak, "runtime": self.runtime, "weights": self.weights, "mapped": self.mapped,
                "kv_cache": self.kv_cache, "workspace": self.workspace, "load_transient": self.load_transient,
                "head_first": self.head_first}


def predict_rss(path, dtype=None, backend: str | None = None, prompt_len: int = 512, new_tokens: int = 32,
                prefill_chunk: int = 512, kv_int8: bool = False, cfg: GLMConfig | None = None) -> RSSPrediction:
    """Peak RSS of loading checkpoint `path` on the CPU and generating `new_tokens` after a `prompt_len` prompt.

    Weights come from the checkpoint's tensors as stored: float tensors in the compute dtype, quantized
    linears at their file bytes (every CPU backend keeps about the GPTQ layout's bytes), the word
    embeddings at ~0 when they are looked up in the file (see loading._map_embeddings)."""
    import torch

    from .checkpoint import Checkpoint, map_name
    from .config import load_config
    from .kernels import default_backend
    from .kernels.native import supports_shape
    from .loading import QUANT_SUFFIXES, embeddings_mappable, resolve_dtype
    from .quantized import int8_head

    cfg = cfg or load_config(path)
    ckpt = Checkpoint(path)
    dt = resolve_dtype(dtype, "cpu")
    db = torch.empty((), dtype=dt).element_size()
    mapped_name = embeddings_mappable(ckpt, cfg, torch.device("cpu"))
    weights = mapped = transient = head_first = 0
    quant_mods: dict[str, int] = {}
    qkv_parts: dict[str, list[tuple[int, int]]] = {}  # a fused q/k/v's parts as (bits, codes), see quantized.fuse
    float_qkv: set[str] = set()  # q/k/v with parts left float: all three run as one float linear
    needs_ort = False  # the native kernel hands shapes it does not take to ORT (its libraries then load)
    for name in ckpt.names():
        m = map_name(cfg.layout, name)
        if m is None or m[0] is None or (m[0].startswith("vision.") and cfg.vision):
            continue
        ours = m[0]
        numel = math.prod(ckpt.shape(name))
        fbytes = numel * ckpt.dtype(name).itemsize
        mod, _, suffix = ours.rpartition(".")
        if suffix in QUANT_SUFFIXES or not ckpt.dtype(name).is_floating_point:
            weights += fbytes
            quant_mods[mod] = quant_mods.get(mod, 0) + fbytes
            if suffix == "qweight" and mod.endswith("attn.qkv") and m[1] is not None:
                rows, n = ckpt.shape(name)
                qkv_parts.setdefault(mod, []).append((32 * rows // cfg.hidden_size, cfg.hidden_size * n))
            if suffix == "weight":  # THUDM's int4/int8 layout: ORT takes it
                needs_ort = True
            elif suffix == "g_idx":
                k = ckpt.shape(name)[0]
                scales = name.rpartition(".")[0] + ".scales"
                groups = ckpt.shape(scales)[0] if scales in ckpt.names() else 0
                needs_ort |= supports_shape(4, k, k // groups if groups else k) is not None
            continue
        if suffix == "weight" and mod.endswith("attn.qkv") and m[1] is not None:
            float_qkv.add(mod)
        if name == mapped_name:
            mapped += numel * db
            weights += min(prompt_len + new_tokens, cfg.vocab_size) * cfg.hidden_size * ckpt.dtype(name).itemsize
            continue
        if ours == "output.weight" and int8_head(cfg, "cpu", dt, backend, ckpt.shape(name)[-1]):
            n_out, k = ckpt.shape(name)
            weights += numel + 2 * n_out  # int8 codes and a scale per row
            # loaded first: the file's copy, the packed codes, the kernel's copy, a slice of rows in float32
            head_first += fbytes + 2 * numel + 256 * k * 4
            continue
        weights += numel * db
        if ours.startswith("output."):  # loaded first (loading.fill): its conversion overlaps nothing else
            head_first += numel * db + (fbytes if ckpt.dtype(name) != dt else 0)
        elif ckpt.dtype(name) != dt:  # the file's copy lives while it is converted
            transient = max(transient, fbytes)
    for mod, parts in qkv_parts.items():  # parts of fewer bits widen to the most bits of the three when fused
        if mod in float_qkv:  # the quantized parts dequantized beside the float ones
            weights += sum(codes for _, codes in parts) * db - quant_mods[mod]
        else:
            top = max(b for b, _ in parts)
            weights += sum(codes * (top - b) // 8 for b, codes in parts)
    if "embed" in quant_mods:  # THUDM quantized embeddings: the lookup table and the head's copy of its ints
        weights += quant_mods["embed"]
    head_q = quant_mods.get("output", 0)
    if head_q:  # a quantized output layer: its file tensors beside the backend's copy, before the blocks
        head_first += 2 * head_q
    others = [v for k, v in quant_mods.items() if k != "output"]
    if others:  # a quantized linear's file tensors live beside the backend's repacked copy
        transient = max(transient, max(others))
    backend = backend or (default_backend(torch.device("cpu"), dt) if quant_mods else None)
    uses_ort = backend == "ort" or (backend == "native" and needs_ort)
    runtime = CPU_RUNTIME_BYTES + (QUANT_KERNEL_RUNTIME_BYTES["ort"] if quant_mods and uses_ort else 0)
    if quant_mods and backend == "bnb":  # bitsandbytes re-quantizes from a 16-bit copy of each whole weight
        runtime += QUANT_KERNEL_RUNTIME_BYTES["bnb"]
        bits = int((cfg.quantization or {}).get("bits") or 4)
        transient = max(transient, max(v * 16 // bits for v in quant_mods.values()))
    slots = cfg.pre_seq_len + prompt_len + new_tokens
    kv = cfg.num_layers * 2 * cfg.num_kv_heads * slots * (cfg.head_dim + 4 if kv_int8 else cfg.head_dim * db)
    T = min(prompt_len, prefill_chunk)
    up = 2 * cfg.ffn_hidden_size if cfg.mlp == "swiglu" else cfg.ffn_hidden_size
    work = T * (4 * cfg.hidden_size + up + cfg.q_size + 2 * cfg.kv_size) * 4 + cfg.vocab_size * 4
    # the prompt attention in C (lvq_attend_rows) holds a layer's keys and values in float32, up to 16K slots; an
    # INT8 cache is first read back in the compute dtype
    work += 2 * cfg.kv_size * (min(slots, 16384) * 4 + (slots * db if kv_int8 else 0))
    return RSSPrediction(runtime, weights, mapped, kv, work, transient, head_first)
