"""CPU backend on torch's own int4/int8 weight-only kernels: no dependency beyond torch.

Slower than ONNX Runtime's MatMulNBits here (int4 GEMV ~16 GB/s vs ~32 GB/s) but always present.
4-bit: `_weight_int4pack_mm_for_cpu` (group 32/64/128/256, bf16 activations, float zero point:
w = (q - 8) * s + z, so our integer zero maps to z = s * (8 - zero)).
8-bit: `_weight_int8pack_mm` (per-channel scales only); a per-channel zero point is folded in as
a correction term: W x = s * ((q-128) x) - s * (zero-128) * sum(x).
"""

from __future__ import annotations

import torch
from torch import nn

from . import PackedWeight, unpack_cols, unpack_rows


def available() -> str | None:
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return f"torch {torch.__version__} lacks _weight_int4pack_mm_for_cpu (needs torch >= 2.5)"
    return None


def _unpacked(w: PackedWeight):
    q = unpack_rows(w.qweight, w.bits)  # [K, N]
    z = unpack_cols(w.qzeros, w.bits)[:, : w.out_features]  # [G, N]
    g = w.group_index()
    perm = None
    if w.has_act_order():
        perm = torch.argsort(g, stable=True)
        q, g = q[perm], g[perm]
    return q, z, g, perm


class Int4Linear(nn.Module):
    def __init__(self, w: PackedWeight, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = w.in_features, w.out_features, dtype
        q, z, g, self.perm = _unpacked(w)
        k = w.in_features
        counts = torch.bincount(g)
        group = int(counts[0])
        if not bool((counts == group).all()) or group not in (32, 64, 128, 256) or k % group:
            raise ValueError(f"torch int4pack needs equal groups of 32/64/128/256 columns, got group {group} for K={k}")
        self.group = group
        blk = g[torch.arange(k // group) * group]
        s = w.scales.float()[blk]  # [K/g, N]
        zf = s * (8 - z[blk].float())
        self.scales_zeros = torch.stack([s, zf], dim=-1).to(torch.bfloat16).contiguous()  # [K/g, N, 2]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.t().contiguous().to(torch.int32), 2)
        self.bias = None if w.bias is None else w.bias.to(torch.bfloat16)

    def forward(self, x):
        shape = x.shape
        a = x.reshape(-1, shape[-1])
        if self.perm is not None:
            a = a[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(a.to(torch.bfloat16).contiguous(), self.packed, self.group,
                                                        self.scales_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(self.dtype)


class Int8Linear(nn.Module):
    def __init__(self, w: PackedWeight, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = w.in_features, w.out_features, dtype
        q, z, g, self.perm = _unpacked(w)
        if z.shape[0] != 1:
            raise ValueError("torch int8pack supports one group per row (per-channel) only; use the ort backend")
        self.weight = (q - 128).t().contiguous().to(torch.int8)  # [N, K]
        s = w.scales.float()[0]
        self.scales = s.to(torch.bfloat16)
        corr = s * (z[0].float() - 128)
        self.corr = None if bool((corr == 0).all()) else corr.to(torch.bfloat16)
        self.bias = None if w.bias is None else w.bias.to(torch.bfloat16)

    def forward(self, x):
        shape = x.shape
        a = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        if self.perm is not None:
            a = a[:, self.perm]
        y = torch.ops.aten._weight_int8pack_mm(a.contiguous(), self.weight, self.scales)
        if self.corr is not None:
            y = y - a.float().sum(-1, keepdim=True).to(torch.bfloat16) * self.corr
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features).to(self.dtype)


def make(w: PackedWeight, dtype: torch.dtype) -> nn.Module:
    if w.bits == 4:
        return Int4Linear(w, dtype)
    if w.bits == 8:
        return Int8Linear(w, dtype)
    raise ValueError(f"cpu backend supports 4 and 8 bits, not {w.bits}")
