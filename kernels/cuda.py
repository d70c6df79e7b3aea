"""CUDA backend: tinygemm int4 (`_weight_int4pack_mm`, Ampere and newer), int8 weight-only, and a
dequantize-then-matmul path for older cards (Pascal/Turing laptops) and odd group sizes.

Untested on hardware in this repository's CI (no GPU); the dispatch and repacking run on CPU in tests.
"""

from __future__ import annotations

import torch
from torch import nn

from . import PackedWeight, dequantize, unpack_cols, unpack_rows


def available() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


TINYGEMM_GROUPS = (32, 64, 128, 256)


def tinygemm_group(w: PackedWeight) -> int | None:
    """The group size torch's int4pack kernels (tinygemm on CUDA, its MPS twin) run this 4-bit weight with,
    or None where they cannot. They take K in whole 128-column tiles (8 inner k-tiles of 16), N in rows of
    8, and groups of 32..256 columns of equal size; a per-row scale (group -1, THUDM's int4) is the same
    scale repeated over groups of 128, which is exact."""
    k, n = w.in_features, w.out_features
    if w.bits != 4 or k % 128 or n % 8:
        return None
    counts = torch.bincount(w.group_index())
    if not bool((counts == counts[0]).all()):  # act-order files whose groups differ in size
        return None
    g = int(counts[0])
    if g == k:
        return 128
    return g if g in TINYGEMM_GROUPS and k % g == 0 else None


def use_tinygemm(w: PackedWeight, capability: tuple[int, int]) -> bool:
    return capability >= (8, 0) and tinygemm_group(w) is not None


def tinygemm_operands(w: PackedWeight, group: int, sz_dtype: torch.dtype):
    """(uint8 [N, K/2] with the even column in the high nibble, scales_and_zeros [K/group, N, 2], input
    permutation or None): the kernel computes (q - 8) * scale + zero, so zero = scale * (8 - z) gives GPTQ's
    scale * (q - z). Built on the CPU; scales and zeros go straight from fp32 to the activation dtype."""
    q = unpack_rows(w.qweight, 4)
    z = unpack_cols(w.qzeros, 4)[:, : w.out_features]
    g = w.group_index()
    perm = torch.argsort(g, stable=True) if w.has_act_order() else None
    if perm is not None:
        q, g = q[perm], g[perm]
    blk = g[torch.arange(w.in_features // group) * group]  # the checkpoint's group of each kernel group
    s = w.scales.float()[blk]
    sz = torch.stack([s, s * (8 - z[blk].float())], dim=-1).to(sz_dtype).contiguous()
    qt = q.t().contiguous()  # [N, K]
    u8 = (qt[:, 0::2] << 4 | qt[:, 1::2]).to(torch.uint8)
    return u8, sz, perm


def tinygemm_pack(w: PackedWeight, device, sz_dtype: torch.dtype = torch.bfloat16):
    """(packed int4 weight, scales_and_zeros, input permutation or None, group) on `device`."""
    group = tinygemm_group(w)
    u8, sz, perm = tinygemm_operands(w, group, sz_dtype)
    packed = torch.ops.aten._convert_weight_to_int4pack(u8.to(device), 8)
    return packed, sz.to(device), None if perm is None else perm.to(device), group


class TinyGemmLinear(nn.Module):
    def __init__(self, w: PackedWeight, dtype, device):
        super().__init__()
        self.out_features, self.dtype = w.out_features, dtype
        self.packed, self.sz, self.perm, self.group = tinygemm_pack(w, device)  # tinygemm: bf16 only
        self.bias = None if w.bias is None else w.bias.to(device, dtype)

    def forward(self, x):
        shape = x.shape
        a = x.reshape(-1, shape[-1])
        if self.perm is not None:
            a = a[:, self.perm]
        y = torch.ops.aten._weight_int4pack_mm(a.to(torch.bfloat16).contiguous(), self.packed, self.group, self.sz)
        y = y.to(self.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)


DEQUANT_CHUNK = 1 << 24  # weights dequantized at a time: ~0.4 GB of temporaries, not ~2.7 GB for 27392 x 4096


def linear_in_slices(x, n_out: int, step: int, weight, bias):
    """x @ W.T + bias with W built `step` outputs at a time by weight(n0, n1): a dequantized slice's temporaries
    instead of the whole matrix's."""
    ys = [nn.functional.linear(x, weight(n0, min(n0 + step, n_out)), None if bias is None else bias[n0 : n0 + step])
          for n0 in range(0, n_out, step)]
    return ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)


class DequantLinear(nn.Module):
    """Keeps the GPTQ packing on the GPU and dequantizes per call: correct everywhere, memory stays 4/8-bit.
    Dequantizes a slice of outputs at a time: the whole matrix's int32/fp32 temporaries would take ~24 bytes per
    weight, gigabytes on a card that holds the model in a few."""

    def __init__(self, w: PackedWeight, dtype, device):
        super().__init__()
        self.dtype = dtype
        self.w = PackedWeight(w.qweight.to(device), w.qzeros.to(device), w.scales.to(device),
                              None if w.g_idx is None else w.g_idx.to(device), w.bits, w.group_size,
                              None if w.bias is None else w.bias.to(device, dtype))

    def forward(self, x):
        w, per = self.w, 32 // self.w.bits
        step = max(per, DEQUANT_CHUNK // w.in_features // per * per)  # slices start where packed zeros' words do
        return linear_in_slices(x.to(self.dtype), w.out_features, step,
                                lambda n0, n1: dequantize(w.cols(n0, n1), self.dtype), w.bias)


class Int8Linear(nn.Module):
    """int8 weight-only: int8 [N, K] in memory (half of fp16); per-channel symmetric weights run torch's
    `_weight_int8pack_mm`, grouped/asymmetric ones dequantize per call from the int8 copy."""

    def __init__(self, w: PackedWeight, dtype, device):
        super().__init__()
        self.out_features, self.dtype = w.out_features, dtype
        q = unpack_rows(w.qweight, 8)
        z = unpack_cols(w.qzeros, 8)[:, : w.out_features]
        g = w.group_index()
        self.perm = None
        if w.has_act_order():
            self.perm = torch.argsort(g, stable=True)
            q, g = q[self.perm], g[self.perm]
            self.perm = self.perm.to(device)
        k, n = q.shape
        ng = int(g.max()) + 1
        self.group = k // ng
        blk = g[torch.arange(ng) * self.group]
        s, zc = w.scales.float()[blk], (z[blk] - 128).float()  # [G, N]
        self.q = (q - 128).t().contiguous().to(torch.int8).to(device)  # [N, K]
        self.s = s.t().contiguous().to(device, dtype).unsqueeze(-1)  # [N, G, 1]
        self.zs = (zc * s).t().contiguous().to(device, dtype).unsqueeze(-1)
        self.per_channel = ng == 1 and not bool(zc.any())
        self.bias = None if w.bias is None else w.bias.to(device, dtype)
        # CUDA's _weight_int8pack_mm is one thread per output in fp32 (PyTorch's int8mm.cu): fine for a decode
        # row, not for a prompt's hundreds, which dequantize slices and multiply on the tensor cores instead
        self.prompt_rows = 16 if torch.device(device).type == "cuda" else None

    def forward(self, x):
        shape = x.shape
        a = x.reshape(-1, shape[-1]).to(self.dtype)
        if self.perm is not None:
            a = a[:, self.perm]
        if self.per_channel and (self.prompt_rows is None or a.shape[0] <= self.prompt_rows):
            y = torch.ops.aten._weight_int8pack_mm(a.contiguous(), self.q, self.s.view(-1)).to(self.dtype)
            if self.bias is not None:
                y = y + self.bias
        else:  # a slice of outputs at a time, as DequantLinear
            n, k = self.q.shape

            def weight(n0, n1):
                return (self.q[n0:n1].view(n1 - n0, -1, self.group).to(self.dtype) * self.s[n0:n1]
                        - self.zs[n0:n1]).view(n1 - n0, k)

            y = linear_in_slices(a, n, max(1, DEQUANT_CHUNK // k), weight, self.bias)
        return y.view(*shape[:-1], self.out_features)


def make(w: PackedWeight, dtype: torch.dtype, device: str | torch.device = "cuda") -> nn.Module:
    cap = torch.cuda.get_device_capability(device)
    if use_tinygemm(w, cap):
        return TinyGemmLinear(w, dtype, device)
    counts = torch.bincount(w.group_index())
    if w.bits == 8 and bool((counts == counts[0]).all()):
        return Int8Linear(w, dtype, device)
    return DequantLinear(w, dtype, device)


class GraphedStep:
    """One decode step captured as a CUDA graph and replayed: a token of a 6B model launches ~1000 small
    kernels, and their Python/launch overhead, not the weight stream, dominates without a graph.

    `fn(*inputs)` must keep its shapes fixed (the model's tensor-slot decode path does); each call
    copies new values into the captured input buffers and replays.
    """

    def __init__(self, fn, *inputs, warmup: int = 2):
        self.inputs = inputs
        self.device = inputs[0].device  # streams and the capture belong to the model's GPU, not the current one
        with torch.cuda.device(self.device):
            self._capture(fn, inputs, warmup)

    def _capture(self, fn, inputs, warmup):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # allocations made while warming up must not land in the graph's pool
            for _ in range(warmup):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*inputs)

    def __call__(self, *values):
        with torch.cuda.device(self.device):
            for buf, v in zip(self.inputs, values):
                buf.copy_(v, non_blocking=True)
            self.graph.replay()
        return self.out
