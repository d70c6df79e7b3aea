"""Quantized compute, one module per backend, behind one small interface.

Every quantized weight arrives here in one canonical form, `PackedWeight` (the GPTQ
layout with true zero points), whatever checkpoint format it came from. A backend turns
it into an `nn.Module` computing `x @ W.T + b` with its own packing, once, at load.
The model code never knows which backend runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PackedWeight:
    """A weight W [out_features, in_features] quantized per group along the input dim.

    qweight int32 [K*bits/32, N]: packed along K, low bits first.
    qzeros  int32 [groups, N*bits/32]: packed along N, **true** zero points (GPTQ v2).
    scales  [groups, N] (fp16 in files; any float here).
    g_idx   int32 [K] or None (None means g_idx[k] = k // group_size).
    W[n, k] = scales[g, n] * (q[k, n] - zero[g, n]) with g = g_idx[k].
    """

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    group_size: int
    bias: torch.Tensor | None = None

    @property
    def in_features(self) -> int:
        return self.qweight.shape[0] * 32 // self.bits

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.qweight.device) // self.group_size

    def has_act_order(self) -> bool:
        """True when g_idx is not the plain k // group_size (desc_act checkpoints)."""
        if self.g_idx is None:
            return False
        plain = torch.arange(self.in_features, device=self.g_idx.device) // self.group_size
        return not torch.equal(self.g_idx.long(), plain)

    def cols(self, n0: int, n1: int) -> "PackedWeight":
        """Outputs n0..n1 only (n0 and n1 multiples of 32 / bits, where the packed zeros' words begin)."""
        per = 32 // self.bits
        assert n0 % per == 0 and (n1 % per == 0 or n1 == self.out_features)
        return PackedWeight(self.qweight[:, n0:n1], self.qzeros[:, n0 // per : -(-n1 // per)], self.scales[:, n0:n1],
                            self.g_idx, self.bits, self.group_size, None if self.bias is None else self.bias[n0:n1])

    def nbytes(self) -> int:
        ts = [self.qweight, self.qzeros, self.scales, self.g_idx, self.bias]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 0 (low bits first) -> int32 [R*32/bits, C]."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    vals = (packed.unsqueeze(1) >> shifts.view(1, per, 1)) & ((1 << bits) - 1)
    return vals.reshape(packed.shape[0] * per, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] packed along dim 1 (low bits first) -> int32 [R, C*32/bits]."""
    if 32 % bits:  # 3-bit values straddle words: through the row unpacking
        return unpack_rows(packed.t().contiguous(), bits).t().contiguous()
    shifts = torch.arange(0, 32, bits, device=packed.device, dtype=torch.int32)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(packed.shape[0], -1)


def pack_rows(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of unpack_rows: int [R, C] with values < 2**bits -> int32 [R*bits/32, C]."""
    per = 32 // bits
    v = vals.to(torch.int64).reshape(-1, per, vals.shape[1])
    shifts = torch.arange(0, 32, bits, device=vals.device, dtype=torch.int64).view(1, per, 1)
    packed = (v << shifts).sum(dim=1)
    # Back to int32 with two's-complement wrap for values >= 2**31.
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def pack_cols(vals: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of unpack_cols. Word by word along the last dimension, in int32 (a value shifted into the
    sign bit wraps, as the format stores it): no transposes or int64 copies (zeros of groups of 32 spent
    most of a load's repacking in them)."""
    if 32 % bits:
        return pack_rows(vals.t().contiguous(), bits).t().contiguous()
    per = 32 // bits
    v = vals.to(torch.int32).reshape(vals.shape[0], -1, per)
    packed = v[..., 0].clone()
    for j in range(1, per):
        packed |= v[..., j] << (bits * j)
    return packed


def fp16_scale(x: torch.Tensor) -> torch.Tensor:
    """Quantization steps x (float) as the fp16 that files store: the nearest, except below 2**-14, where fp16 is
    subnormal and its spacing (2**-24) a large part of a small step: there the next fp16 up, so a row or group of
    small weights keeps its extremes on the grid (nearest rounding could shrink the step by a few percent, and the
    extremes then clamped at the last code, up to a whole step off). Tiny steps never round to zero."""
    h = x.to(torch.float16)
    low = (h.float() < x) & (h < 2**-14)
    return torch.where(low, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def dequantize(w: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [out_features, in_features] in `dtype`: the exact reference every backend must match."""
    q = unpack_rows(w.qweight, w.bits)  # [K, N]
    z = unpack_cols(w.qzeros, w.bits)[:, : w.out_features]  # [G, N]
    g = w.group_index()
    s = w.scales.to(torch.float32)
    wf = (q - z[g]).to(torch.float32) * s[g]
    return wf.t().contiguous().to(dtype)


BACKENDS = {
    # name -> module implementing `make(w: PackedWeight, dtype) -> nn.Module` and `available() -> str|None`
    "torch": "lowvram.kernels.torch_ref",
    "native": "lowvram.kernels.native",
    "ort": "lowvram.kernels.ort",
    "cpu": "lowvram.kernels.cpu",
    "cuda": "lowvram.kernels.cuda",
    "mps": "lowvram.kernels.mps",
    "bnb": "lowvram.kernels.bnb",  # optional (bitsandbytes): NF4 / LLM.int8, a re-quantization of the checkpoint
}


def check_backend(name: str, field: str = "backend") -> str:
    """A backend name the user gave, lower-cased, or one line listing the known ones."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{field} {name!r} not known; use one of {', '.join(sorted(BACKENDS))}")
    return name.lower()


def default_backend(device: str | torch.device, dtype: torch.dtype) -> str:
    """float32 is the exact reference (dequantize, fp32 matmul); otherwise the fastest kernel for the device:
    on x86-64 CPUs with AVX2 (or AVX512-VNNI) our own C kernel, elsewhere ONNX Runtime, then torch's int4pack.

    LOWVRAM_BACKEND overrides for every device, except float32's reference path.
    """
    import os

    if dtype == torch.float32:
        return "torch"
    if env := os.environ.get("LOWVRAM_BACKEND"):
        return check_backend(env, "LOWVRAM_BACKEND")
    kind = torch.device(device).type
    if kind in ("cuda", "mps"):
        return kind
    native = importlib.import_module(BACKENDS["native"])
    if native.available() is None and native.fast():
        return "native"
    return portable_cpu_backend()


def portable_cpu_backend() -> str:
    """The CPU backend where the native kernel does not run: ONNX Runtime, else torch's own int4/int8 kernels."""
    return "ort" if importlib.import_module(BACKENDS["ort"]).available() is None else "cpu"


def make_linear(w: PackedWeight, backend: str = "torch", dtype: torch.dtype = torch.float32,
                device: str | torch.device | None = None) -> nn.Module:
    """A module computing x @ dequantize(w).T + bias with the named backend (on `device` for GPU backends)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; known: {', '.join(sorted(BACKENDS))}")
    mod = importlib.import_module(BACKENDS[backend])
    why = mod.available()
    if why:
        raise RuntimeError(f"backend {backend!r} is unavailable: {why}")
    if device is not None and backend in ("cuda", "bnb"):
        return mod.make(w, dtype, device)
    return mod.make(w, dtype)
