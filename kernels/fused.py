"""The small ops of a CPU decode step (RMSNorm, RoPE + cache write + attention, SwiGLU) in one C call each,
a whole block in one call where every piece of it runs in C (`decode_block`), and every block of a token in one
call where all of them do (`decode_blocks`).

A token's step through a block is ~65 torch ops on tiny tensors; on a 2-core CPU that was 25-35 ms of a
~175 ms step. Each function here returns None where it does not apply (no native kernel, not on the
CPU, not bf16, more than a few rows, a layout it does not know), and the caller runs its torch code.
float32 is never taken: it is the exact reference path.
"""

from __future__ import annotations

import ctypes
import os

import torch

from . import native

_BF16 = 1
_MAX_ELEMS = 1 << 16  # a decode step's rows; prompts keep torch's multithreaded ops (but SwiGLU and attention)
_THREADS = int(os.environ.get("LOWVRAM_THREADS", 0))  # 0: attention on as many threads as the linears
_BLOCK = os.environ.get("LOWVRAM_FUSED_BLOCK", "1") != "0"  # 0: separate calls per block (for comparisons)


def _ok(x: torch.Tensor, max_elems: int | None = _MAX_ELEMS) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and (max_elems is None or x.numel() <= max_elems)
            and native.available() is None and x.is_contiguous())


def _p(t: torch.Tensor):
    return ctypes.c_void_p(t.data_ptr())


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    if not _ok(x) or weight.dtype not in (torch.bfloat16, torch.float32) or weight.device.type != "cpu":
        return None
    y = torch.empty_like(x)
    n = x.shape[-1]
    native._lib.lvq_rmsnorm(_p(x), _BF16, _p(weight), _BF16 if weight.dtype == torch.bfloat16 else 0,
                            x.numel() // n, n, eps, _p(y))
    return y


def swiglu(h: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up for h = gate | up along the last dimension; prompts too (one pass, no temporary)."""
    if not _ok(h, max_elems=None):
        return None
    n = h.shape[-1] // 2
    y = torch.empty(*h.shape[:-1], n, dtype=h.dtype)
    native._lib.lvq_swiglu(_p(h), _BF16, h.numel() // (2 * n), n, _p(y), native.threads())
    return y


def _cache_ok(cache, rope, dtype) -> bool:
    """A layer's (k, v) cache and RoPE tables as lvq_attend_one reads them."""
    kc, vc = cache
    cos, sin = rope
    return (kc.dtype == vc.dtype == dtype and kc.is_contiguous() and vc.is_contiguous() and cos.is_contiguous()
            and sin.is_contiguous() and cos.dtype == torch.float32)


def _int8_cache(cache, rope) -> tuple | None:
    """An INT8 KV cache (lowvram.models.glm.Int8KV: codes `q` and per-slot scales `s`, each [k, v]) of a batch of
    one as lvq_attend_one_i8 reads it: (k codes, k scales, v codes, v scales), or None."""
    q, s = getattr(cache, "q", None), getattr(cache, "s", None)
    if q is None or s is None:
        return None
    (kq, vq), (ks, vs) = q, s
    cos, sin = rope
    ok = (native.fast() and kq.shape[-1] % 8 == 0  # AVX2 or better: in plain C loops torch's matmuls are faster
          and kq.dtype == vq.dtype == torch.int8 and ks.dtype == vs.dtype == torch.float32 and kq.shape[0] == 1
          and all(t.device.type == "cpu" and t.is_contiguous() for t in (kq, vq, ks, vs, cos, sin))
          and cos.dtype == torch.float32)
    return (kq, ks, vq, vs) if ok else None


def attend_one(cfg, qkv: torch.Tensor, rope, cache, start, threads: int = 0) -> torch.Tensor | None:
    """One new token of a batch of one: RoPE on its q and k (in place in qkv), k and v into cache slot
    `start`, attention over slots 0..start. Returns [1, 1, heads * head_dim], or None. The cache is a bf16
    (k, v) pair, or an INT8 one (codes and per-slot scales, quantized as Int8KV.write does).

    threads: the native linears' count (LOWVRAM_THREADS overrides; 0: OpenMP's default, which is 1 during a
    decode step, as torch is set to one thread there)."""
    if (cfg.rope != "interleaved" or cfg.layout == "chatglm-v1" or not isinstance(start, int)
            or qkv.shape[0] != 1 or qkv.shape[1] != 1 or not _ok(qkv)):
        return None
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    cos, sin = rope
    o = torch.empty(1, 1, H * D, dtype=qkv.dtype)
    if (i8 := _int8_cache(cache, rope)) is not None:
        kq, ks, vq, vs = i8
        rc = native._lib.lvq_attend_one_i8(_p(qkv), _BF16, _p(cos), _p(sin), cfg.rotary_dim, H, G, D, _p(kq),
                                           _p(ks), _p(vq), _p(vs), kq.shape[2], start, _p(o), _THREADS or threads)
        if rc == -1:  # no loops for this CPU or head size (nothing was written): the torch code runs
            return None
    elif isinstance(cache, tuple) and _cache_ok(cache, rope, qkv.dtype):
        kc, vc = cache
        rc = native._lib.lvq_attend_one(_p(qkv), _BF16, _p(cos), _p(sin), cfg.rotary_dim, H, G, D, _p(kc), _p(vc),
                                        kc.shape[2], start, _p(o), _THREADS or threads)
    else:
        return None
    if rc:
        raise MemoryError(f"lvq_attend_one: no scratch for {H} heads x {start + 1} slots")
    return o


def attend_rows(cfg, qkv: torch.Tensor, rope, cache, start, threads: int = 0) -> torch.Tensor | None:
    """A prompt chunk of a batch of one: RoPE on its q and k (in place in qkv), k and v into cache slots
    start.., each row attending causally over slots 0..start+row (lvq_attend_rows). Returns
    [1, T, heads * head_dim], or None where it does not apply (the caller runs SDPA). The cache is a bf16 (k, v)
    pair or an INT8 one; over the latter the chunk's own rows attend to their keys and values before rounding
    to int8 (the torch code rounds first: a difference of the int8 rounding, ~0.4%, on those rows only)."""
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if (cfg.rope != "interleaved" or cfg.layout == "chatglm-v1" or not isinstance(start, int)
            or qkv.dim() != 3 or qkv.shape[0] != 1 or not _ok(qkv, None) or not native.fast() or D % 8 or H % G
            or rope[0].numel() != qkv.shape[1] * (cfg.rotary_dim // 2)):
        return None
    T = qkv.shape[1]
    i8 = _int8_cache(cache, rope) if getattr(cache, "dtype", None) == qkv.dtype else None
    if i8 is not None:
        if i8[0].shape[2] < start + T:
            return None
        # an INT8 cache: its slots read back in bf16 (as the torch code reads them), the chunk's rows attended
        # there, then quantized into the cache as the torch code writes them
        kc, vc = cache.read(start + T)
    elif isinstance(cache, tuple) and _cache_ok(cache, rope, qkv.dtype) and cache[0].shape[2] >= start + T:
        kc, vc = cache
    else:
        return None
    cos, sin = rope
    o = torch.empty(1, T, H * D, dtype=qkv.dtype)
    rc = native._lib.lvq_attend_rows(_p(qkv), _p(cos), _p(sin), cfg.rotary_dim, H, G, D, _p(kc), _p(vc),
                                     kc.shape[2], start, T, _p(o), _THREADS or threads)
    if rc:
        raise MemoryError(f"lvq_attend_rows: no scratch for {start + T} slots")
    if i8 is not None:
        cache.write(start, kc[:, :, start:], vc[:, :, start:])
    return o


class _Lin(ctypes.Structure):
    """lvq_lin in lvq.c: one NativeLinear's arguments."""
    _fields_ = [("K", ctypes.c_int64), ("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("zeros", ctypes.c_void_p),
                ("N", ctypes.c_int64), ("bits", ctypes.c_int64), ("group", ctypes.c_int64), ("bias", ctypes.c_void_p)]


class _Block(ctypes.Structure):
    """lvq_block in lvq.c: one block's fixed arguments of lvq_decode_block."""
    _fields_ = [("n1", ctypes.c_void_p), ("n2", ctypes.c_void_p), ("pn1", ctypes.c_void_p), ("pn2", ctypes.c_void_p),
                ("nt", ctypes.c_int64), ("eps", ctypes.c_double), ("qkv", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("up", ctypes.c_void_p), ("down", ctypes.c_void_p), ("nthreads", ctypes.c_int64)]


def _block_args(block) -> tuple | None:
    """(the block's lvq_block: norms, norm type and eps, the four linears, their threads; the lvq_lin structs it
    points to, kept alive), or None if a piece of the block is not native."""
    cfg = block.attn.cfg
    if (block.residual not in ("pre", "sandwich") or cfg.mlp != "swiglu" or cfg.norm != "rmsnorm"
            or cfg.rope != "interleaved" or cfg.layout == "chatglm-v1"):
        return None
    lins = (block.attn.qkv, block.attn.out, block.mlp.up, block.mlp.down)
    if any(type(m).__name__ != "NativeLinear" or m.perm is not None or m.dtype != torch.bfloat16 for m in lins):
        return None
    norms = [block.attn_norm, block.mlp_norm]
    if block.residual == "sandwich":
        norms += [block.post_attn_norm, block.post_mlp_norm]
    ws = [n.weight for n in norms]
    if (len({w.dtype for w in ws}) != 1 or ws[0].dtype not in (torch.bfloat16, torch.float32)
            or any(w.device.type != "cpu" or not w.is_contiguous() for w in ws)):
        return None
    structs = [_Lin(m.in_features, m.weight.data_ptr(), m.scales.data_ptr(), m.zeros.data_ptr(), m.out_features,
                    m.bits, m.group, None if m.bias is None else m.bias.data_ptr()) for m in lins]
    ptrs = [w.data_ptr() for w in ws] + [None] * (4 - len(ws))
    nt = _BF16 if ws[0].dtype == torch.bfloat16 else 0
    return _Block(*ptrs, nt, block.attn_norm.eps, *map(ctypes.addressof, structs), lins[0].threads), structs


def _fixed(block) -> _Block | None:
    """The block's lvq_block, computed once per block (its weights do not move), or None."""
    if type(block).__name__ != "Block":  # a streamed block computes elsewhere
        return None
    f = block.__dict__.get("_native_args", False)
    if f is False:
        f = block.__dict__["_native_args"] = _block_args(block)
    return None if f is None else f[0]


def _run(blocks, x: torch.Tensor, rope, caches, start) -> torch.Tensor | None:
    """x through `blocks` with their caches in one lvq_decode_blocks call, or None where it does not apply."""
    if (not _BLOCK or not isinstance(start, int) or caches is None or x.shape[:2] != (1, 1) or not _ok(x)
            or len(caches) != len(blocks)):
        return None
    fixed = [_fixed(b) for b in blocks]
    if None in fixed:
        return None
    i8 = [_int8_cache(c, rope) for c in caches]
    if all(c is not None for c in i8):  # INT8 caches: (k codes, k scales, v codes, v scales)
        arrays = [[c[i] for c in i8] for i in range(4)]
    elif all(isinstance(c, tuple) and _cache_ok(c, rope, x.dtype) for c in caches):
        arrays = [[c[0] for c in caches], None, [c[1] for c in caches], None]
    else:
        return None
    if len({t.shape[2] for t in arrays[0]}) != 1:
        return None
    slots = arrays[0][0].shape[2]
    n = len(blocks)
    kc, ks, vc, vs = [None if a is None else (ctypes.c_void_p * n)(*(t.data_ptr() for t in a)) for a in arrays]
    cos, sin = rope
    cfg = blocks[0].attn.cfg
    y = torch.empty_like(x)
    rc = native._lib.lvq_decode_blocks(_p(x), _p(y), (_Block * n)(*fixed), n, kc, vc, ks, vs, _p(cos), _p(sin),
                                       cfg.rotary_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, slots, start,
                                       _THREADS)
    if rc == -11:
        raise MemoryError("lvq_decode_blocks: out of memory")
    assert rc == 0, rc
    return y


def decode_block(block, x: torch.Tensor, rope, cache, start) -> torch.Tensor | None:
    """A bf16 token through a whole block in one C call (same arithmetic as the block's separate calls), or None."""
    return _run([block], x, rope, [cache], start)


def decode_blocks(blocks, x: torch.Tensor, rope, caches, start) -> torch.Tensor | None:
    """A bf16 token through every block in one C call (the same arithmetic block by block), or None."""
    return _run(blocks, x, rope, caches, start)
