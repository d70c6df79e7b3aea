"""Readers of quantized checkpoints: GPTQ (v1 and v2 zeros, act-order) and THUDM INT4/INT8.

Whatever the file says, a quantized linear becomes one `kernels.PackedWeight` (GPTQ layout,
true zero points) and then a backend module. Bits and group size are read from each module's
tensor shapes, so a checkpoint may mix them (an int8 output layer beside int4 blocks).
"""

from __future__ import annotations

import math
import warnings

import torch

from .kernels import (PackedWeight, default_backend, dequantize, fp16_scale, make_linear, pack_cols, pack_rows,
                      unpack_cols, unpack_rows)

_KEYS = ("qweight", "qzeros", "scales")


def zero_offset(cfg) -> int:
    """+1 for GPTQ v1 files (they store zero-1), 0 for v2."""
    fmt = (cfg.quantization or {}).get("checkpoint_format")
    return 0 if fmt == "gptq_v2" else 1


def from_gptq(t: dict, offset: int, in_features: int, group_size: int | None = None) -> PackedWeight:
    """group_size (the config's): needed only when the groups do not split the inputs evenly (13696 inputs in
    groups of 256: 54 groups, the last short) and the file has no g_idx saying which input is in which."""
    if set(t) <= {"bias"}:
        raise ValueError("has a bias but no weight (neither qweight nor a float weight)")
    missing = [k for k in _KEYS if k not in t]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (GPTQ needs qweight, qzeros, scales)")
    if (wide := {t[k].dtype for k in ("qweight", "qzeros")} - {torch.int32}):
        raise ValueError(f"packed in {', '.join(map(str, wide))} words; lowvram reads GPTQ packed in int32 words")
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    bits = 32 * qweight.shape[0] // in_features
    if bits not in (2, 4, 8) or 32 * qweight.shape[0] != bits * in_features:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not pack {in_features} inputs at 2, 4 or 8 bits "
                         "(3-bit GPTQ, a bitstream across words, is not supported)")
    groups, n = scales.shape
    if qweight.shape[1] != n:
        raise ValueError(f"qweight has {qweight.shape[1]} columns but scales {n}")
    g_idx = t.get("g_idx")
    gs = group_size if group_size and group_size > 0 and -(-in_features // group_size) == groups else None
    if gs is None and in_features % groups:
        raise ValueError(f"{groups} groups of scales for {in_features} inputs, which the config's group_size "
                         f"{group_size} does not give")
    group = gs or in_features // groups
    if in_features % group and g_idx is None:  # the last group is short: say where each input belongs
        g_idx = torch.arange(in_features, dtype=torch.int32) // group
    if offset:
        z = unpack_cols(qzeros, bits)[:, :n] + offset
        if int(z.max()) >= 2**bits:
            raise ValueError(f"GPTQ v1 zero point {2**bits} overflows {bits} bits (a v1 writer bug); re-quantize")
        qzeros = pack_cols(z, bits)
    return PackedWeight(qweight, qzeros, scales, None if g_idx is None else g_idx.to(torch.int32), bits, group,
                        t.get("bias"))


def thudm_values(w: torch.Tensor, bits: int) -> torch.Tensor:
    """THUDM's stored ints as signed values: int8 as is, or two int4 per byte, high nibble first."""
    w = w.to(torch.int8)
    if bits != 4:
        return w
    return torch.stack([w >> 4, (w << 4) >> 4], dim=-1).flatten(-2)


def from_thudm(t: dict, bits: int, in_features: int) -> PackedWeight:
    """THUDM `quantization_bit`: int8 [out, in] or two signed int4 per byte (high nibble first), scale per row."""
    w, s = t["weight"], t.get("weight_scale")
    if s is None:
        raise ValueError("int weight without weight_scale (THUDM INT4/INT8 layout)")
    vals = thudm_values(w, bits)
    if vals.shape[1] != in_features:
        raise ValueError(f"weight {tuple(w.shape)} holds {vals.shape[1]} inputs at {bits} bits, expected {in_features}")
    mid = 2 ** (bits - 1)
    q = (vals.to(torch.int32) + mid).t().contiguous()  # [K, N]
    n = q.shape[1]
    return PackedWeight(pack_rows(q, bits), pack_cols(torch.full((1, n), mid, dtype=torch.int32), bits),
                        s.reshape(1, n), None, bits, in_features, t.get("bias"))


class QuantizedEmbedding(torch.nn.Module):
    """THUDM's quantized word embeddings (chatglm-6b-int4-qe): THUDM-layout int rows, one fp16 scale per
    row. Rows are dequantized after the lookup, so the table stays at bits/16 of its fp16 size."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.int8), persistent=False)
        self.register_buffer("scale", scale.half(), persistent=False)
        self.bits, self.dtype = bits, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = thudm_values(self.weight[ids], self.bits)
        return (w.float() * self.scale[ids].float().unsqueeze(-1)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1] * 8 // self.bits}, int{self.bits}, THUDM layout"


def fuse(ws: list[PackedWeight]) -> PackedWeight:
    """Concatenate along the outputs (glm's q/k/v projections -> our qkv). Parts quantized differently (GPTQModel's
    per-module `dynamic` settings, e.g. v_proj at 8 bits) are first brought to common settings without changing a
    single weight: the most bits (a code and its zero point fit as they are) and groups of the sizes' gcd (each
    group's scale and zero repeated)."""
    if len(ws) == 1:
        return ws[0]
    ws = _alike(ws)
    a = ws[0]
    zeros = torch.cat([unpack_cols(w.qzeros, w.bits)[:, : w.out_features] for w in ws], dim=1)
    biases = [w.bias for w in ws]
    return PackedWeight(torch.cat([w.qweight for w in ws], 1), pack_cols(zeros, a.bits),
                        torch.cat([w.scales for w in ws], 1), a.g_idx, a.bits, a.group_size,
                        None if any(b is None for b in biases) else torch.cat(biases))


def _alike(ws: list[PackedWeight]) -> list[PackedWeight]:
    """The parts as they are when their bits and groups agree, else re-expressed at common ones (see fuse)."""
    k, bits = ws[0].in_features, max(w.bits for w in ws)
    same_groups = all(torch.equal(w.group_index(), ws[0].group_index()) for w in ws[1:])
    if same_groups and all(w.bits == bits for w in ws):
        return ws
    if not same_groups and any(w.has_act_order() for w in ws):
        raise ValueError("q/k/v projections are quantized with different act-order groups (g_idx); lowvram fuses "
                         "them into one linear and needs one grouping: quantize them with the same settings")
    group = ws[0].group_size if same_groups else math.gcd(*(w.group_size for w in ws))
    out = []
    for w in ws:
        q = pack_rows(unpack_rows(w.qweight, w.bits), bits) if w.bits != bits else w.qweight
        z = unpack_cols(w.qzeros, w.bits)[:, : w.out_features]
        g_idx, scales = w.g_idx, w.scales
        if not same_groups:  # group m of `group` inputs lies inside the part's group m * group // its size
            src = torch.arange(-(-k // group)) * group // w.group_size
            scales, z = scales[src], z[src]
            g_idx = None if k % group == 0 else torch.arange(k, dtype=torch.int32) // group
        out.append(PackedWeight(q, pack_cols(z, bits), scales, g_idx, bits, group, w.bias))
    return out


def _file_name(cfg, mod_name: str, slot: int, nslots: int) -> str:
    """The module's name in the checkpoint (errors name what users can grep their files for)."""
    from .checkpoint import original_name

    try:
        return original_name(cfg.layout, mod_name + ".weight", slot if nslots > 1 else None).removesuffix(".weight")
    except KeyError:
        return mod_name


def build_linear(cfg, mod_name: str, parts: dict, linear, device, dtype, backend):
    """The backend module replacing `linear` (a meta nn.Linear, or one with a float bias already set)."""
    in_features = linear.in_features
    q = cfg.quantization or {}
    packed = []
    for slot in sorted(parts):
        t = parts[slot]
        try:
            if "float" in t:  # left unquantized (GPTQModel's `dynamic` can exclude one of q/k/v)
                packed.append(t)
            elif "qweight" in t or set(t) <= {"bias"}:
                packed.append(from_gptq(t, zero_offset(cfg), in_features, q.get("group_size")))
            elif "weight" in t:
                bits = int(q.get("thudm_bits") or (4 if t["weight"].shape[1] * 2 == in_features else 8))
                packed.append(from_thudm(t, bits, in_features))
            else:
                raise ValueError(f"unrecognised quantized tensors {sorted(t)}")
        except ValueError as e:
            raise ValueError(f"{_file_name(cfg, mod_name, slot, len(parts))}: {e}") from None
    if any(isinstance(p, dict) for p in packed):
        return _partly_float(mod_name, packed, linear, device, dtype)
    w = fuse(packed)
    if w.out_features != linear.out_features:
        raise ValueError(f"{w.out_features} outputs, expected {linear.out_features}")
    if w.bias is None and linear.bias is not None and not linear.bias.is_meta:
        w.bias = linear.bias.detach()
    if w.bias is not None:
        w.bias = w.bias.float()
    chosen = backend or default_backend(device, dtype)
    if chosen != "torch":
        try:
            return make_linear(w, chosen, dtype, device)
        except ValueError as e:  # a shape the fast kernel cannot take (e.g. groups of unequal size)
            if backend is not None:
                raise
            warnings.warn(f"{mod_name}: {e}; it runs on torch's dequantizing path instead (slower)", stacklevel=2)
    if torch.device(device).type != "cpu":
        w = PackedWeight(*(x.to(device) if isinstance(x, torch.Tensor) else x for x in
                           (w.qweight, w.qzeros, w.scales, w.g_idx, w.bits, w.group_size, w.bias)))
    return make_linear(w, "torch", dtype, device)


def _partly_float(mod_name: str, parts: list, linear, device, dtype: torch.dtype) -> torch.nn.Linear:
    """q/k/v of which some parts are stored unquantized: one float linear of the quantized parts' exact weights
    beside the float ones (float32 stays the exact reference); it takes the compute dtype's memory for all three."""
    ws = [p["float"].float() if isinstance(p, dict) else dequantize(p) for p in parts]
    biases = [p.get("bias") if isinstance(p, dict) else p.bias for p in parts]
    w = torch.cat(ws)
    if w.shape != (linear.out_features, linear.in_features):
        raise ValueError(f"{tuple(w.shape)} from its parts, expected {(linear.out_features, linear.in_features)}")
    if dtype != torch.float32:
        warnings.warn(f"{mod_name}: q/k/v partly unquantized in the file; they run as one {dtype} linear", stacklevel=3)
    out = torch.nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    out.weight = torch.nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
    if linear.bias is not None:  # the parts' biases, or all three already fused into the linear's
        if all(x is not None for x in biases):
            b = torch.cat([x.float() for x in biases])
        elif not linear.bias.is_meta:
            b = linear.bias.detach()
        else:
            raise ValueError("a part has no bias while the others have one")
        out.bias = torch.nn.Parameter(b.to(device=device, dtype=dtype), requires_grad=False)
    return out


def int8_head(cfg, device, dtype: torch.dtype, backend: str | None, in_features: int) -> bool:
    """Whether the float output layer of a quantized checkpoint runs as int8 per channel: on the CPU's native
    kernel (not the float32 reference path; LOWVRAM_QUANTIZE_HEAD=0 keeps it float). A bf16 head is the largest
    matrix a decode step reads (ChatGLM3-6B 0.53 GB, GLM-4-9B 1.24 GB) and torch's bf16 GEMV read it at ~20 GB/s:
    ~20 ms of a ~95 ms 4-bit ChatGLM3-6B step, and it is what `lowvram quantize` writes unless --quantize-head."""
    import os

    from .kernels import native

    return (bool(cfg.quantization) and os.environ.get("LOWVRAM_QUANTIZE_HEAD", "1") != "0"
            and torch.device(device).type == "cpu"
            and dtype != torch.float32 and (backend or default_backend(device, dtype)) == "native"
            and native.supports_shape(8, in_features, in_features) is None)


def int8_rows(w: torch.Tensor, rows: int = 256) -> PackedWeight:
    """W [N, K] as symmetric int8 with one fp16 scale per row (GPTQ form: zero point 128), a slice of rows at a
    time: no float32 copy of a vocabulary-sized matrix, and each slice's passes stay in cache (65024 x 4096:
    2.35 s in slices of 4096 rows, 0.54 s in 512)."""
    n, k = w.shape
    scales = torch.empty(n, dtype=torch.float16)
    qweight = torch.empty(k // 4, n, dtype=torch.int32)  # filled in place: slices and a cat of them were 2x the codes
    for n0 in range(0, n, rows):
        wf = w[n0 : n0 + rows].float()
        s = fp16_scale(wf.abs().amax(1) / 127)  # rounded first: the codes are computed against it
        s[s == 0] = 1.0  # an all-zero row: codes 128, which dequantize to zero
        scales[n0 : n0 + rows] = s
        q = (torch.clamp(torch.round(wf / s.float()[:, None]), -127, 127) + 128).to(torch.uint8)  # [rows, K]
        # GPTQ's int32 words hold four consecutive inputs of one output, low byte first: a byte transpose
        # (pack_rows' int64 shifts took seconds on a vocabulary-sized head)
        words = q.t().reshape(k // 4, 4, -1).permute(0, 2, 1).contiguous().view(torch.int32)
        qweight[:, n0 : n0 + rows] = words.view(k // 4, -1)
    zeros = pack_cols(torch.full((1, n), 128, dtype=torch.int32), 8)
    return PackedWeight(qweight, zeros, scales[None], None, 8, k)