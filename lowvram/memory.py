"""How many bytes a GLM model needs, per block and per device, without loading it.

One formula per thing that takes memory: quantized weights in the GPTQ layout (what every backend
keeps, within ~10%), float weights, the KV cache per token, and the prefill workspace. The planner
and `lowvram plan` both read from here.
"""

from __future__ import annotations

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
    kvb = DTYPE_BYTES[kv_dtype or dtype]
    kv = 2 * cfg.kv_size * kvb
    up = 2 * cfg.ffn_hidden_size if cfg.mlp == "swiglu" else cfg.ffn_hidden_size
    work = prefill_chunk * (4 * cfg.hidden_size + up + cfg.q_size + 2 * cfg.kv_size) * 4
    work += prefill_chunk * cfg.vocab_size * 4 // prefill_chunk  # logits of the last position only
    return Footprint(blk, emb, out, kv, work)
