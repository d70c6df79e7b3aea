"""Apple GPU backend: torch's MPS int4/int8 weight-only kernels with fp16 activations.

Untested on hardware (no Mac here); dispatch is exercised on CPU in tests. Falls back to
dequantize-per-call (`cuda.DequantLinear` works on any device) where the MPS ops do not apply.
"""

from __future__ import annotations

import torch
from torch import nn

from . import PackedWeight
from .cuda import DequantLinear, Int8Linear, tinygemm_group, tinygemm_pack


def available() -> str | None:
    if not torch.backends.mps.is_available():
        return "no Apple MPS device (torch.backends.mps.is_available() is False)"
    return None


class MpsInt4Linear(nn.Module):
    def __init__(self, w: PackedWeight, dtype):
        super().__init__()
        self.out_features, self.dtype = w.out_features, dtype
        # the Metal kernel reads scales and zeros in the activation dtype: made from fp32 directly (through
        # bf16 they lost ~5x more precision)
        self.packed, self.sz, self.perm, self.group = tinygemm_pack(w, "mps", dtype)
        self.bias = None if w.bias is None else w.bias.to("mps", dtype)

    def forward(self, x):
        shape = x.shape
        a = x.reshape(-1, shape[-1])
        if self.perm is not None:
            a = a[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm(a.to(self.dtype).contiguous(), self.packed, self.group, self.sz)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


def kind(w: PackedWeight) -> str:
    """Which kernel a weight gets: torch's MPS int4pack, int8 weight-only, or dequantize per call."""
    if tinygemm_group(w) is not None:
        return "int4"
    counts = torch.bincount(w.group_index())
    if w.bits == 8 and bool((counts == counts[0]).all()):
        return "int8"
    return "dequant"


def make(w: PackedWeight, dtype: torch.dtype) -> nn.Module:
    k = kind(w)
    if k == "int4":
        return MpsInt4Linear(w, dtype)
    if k == "int8":
        return Int8Linear(w, dtype, "mps")
    return DequantLinear(w, dtype, "mps")
