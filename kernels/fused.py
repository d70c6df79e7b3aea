"""The small ops of a CPU decode step (RMSNorm, RoPE + cache write + attention, SwiGLU) in one C call each.

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
_MAX_ELEMS = 1 << 16  # a decode step's rows; prompts keep torch's multithreaded ops
_THREADS = int(os.environ.get("LOWVRAM_THREADS", 0))  # 0: OpenMP's default (torch runs 1 thread in decode)


def _ok(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.numel() <= _MAX_ELEMS
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
    """silu(gate) * up for h = gate | up along the last dimension."""
    if not _ok(h):
        return None
    n = h.shape[-1] // 2
    y = torch.empty(*h.shape[:-1], n, dtype=h.dtype)
    native._lib.lvq_swiglu(_p(h), _BF16, h.numel() // (2 * n), n, _p(y))
    return y


def attend_one(cfg, qkv: torch.Tensor, rope, cache, start) -> torch.Tensor | None:
    """One new token of a batch of one: RoPE on its q and k (in place in qkv), k and v into cache slot
    `start`, attention over slots 0..start. Returns [1, 1, heads * head_dim], or None."""
    if (cfg.rope != "interleaved" or cfg.layout == "chatglm-v1" or not isinstance(start, int)
            or not isinstance(cache, tuple) or qkv.shape[0] != 1 or qkv.shape[1] != 1 or not _ok(qkv)):
        return None
    kc, vc = cache
    cos, sin = rope
    if not (kc.dtype == vc.dtype == qkv.dtype and kc.is_contiguous() and vc.is_contiguous()
            and cos.is_contiguous() and sin.is_contiguous() and cos.dtype == torch.float32):
        return None
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    o = torch.empty(1, 1, H * D, dtype=qkv.dtype)
    native._lib.lvq_attend_one(_p(qkv), _BF16, _p(cos), _p(sin), cfg.rotary_dim, H, G, D, _p(kc), _p(vc),
                               kc.shape[2], start, _p(o), _THREADS)
    return o
