"""Reference backend: keeps the GPTQ packing in memory and dequantizes on every call.

Slow but exact and device-agnostic; `dtype=float32` runs through here so a quantized model
computes precisely what the same weights stored in fp32 would.
"""

from __future__ import annotations

import torch
from torch import nn

from . import PackedWeight, dequantize


def available() -> str | None:
    return None


class DequantLinear(nn.Module):
    def __init__(self, w: PackedWeight, dtype: torch.dtype):
        super().__init__()
        self.w = w
        self.dtype = dtype
        self.in_features = w.in_features
        self.out_features = w.out_features
        self.bias = None if w.bias is None else w.bias.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x.to(self.dtype), dequantize(self.w, self.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.w.bits}, group={self.w.group_size}"


def make(w: PackedWeight, dtype: torch.dtype) -> nn.Module:
    return DequantLinear(w, dtype)
