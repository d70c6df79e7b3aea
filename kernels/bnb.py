"""bitsandbytes as a backend: NF4 for 4-bit weights, LLM.int8 for 8-bit ones, on CUDA or the CPU.

For users who already run bitsandbytes, and for cards where tinygemm does not run; optional
(`pip install "lowvram[cuda]"`). bitsandbytes keeps its own formats, not GPTQ's affine groups: a
4-bit weight is re-quantized to NF4 (blocks of 64, an absmax each, double-quantized), an 8-bit one to
LLM.int8's per-row absmax int8 (activation columns above `threshold` computed in fp16). So this backend
does not reproduce the checkpoint's weights exactly: NF4's own error adds to the checkpoint's (tests
measure both). Every other backend computes with the checkpoint's weights as they are.

CUDA untested on hardware here (no GPU lent); the CPU path runs in tests where bitsandbytes is installed.
"""

from __future__ import annotations

import torch
from torch import nn

from . import PackedWeight, dequantize

THRESHOLD = 6.0  # LLM.int8's outlier threshold, bitsandbytes' and transformers' default
_COLS = 4096  # output rows dequantized at a time: the float copy of a whole 27392 x 4096 weight was 0.45 GB


def available() -> str | None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return f"bitsandbytes is not installed ({e}); pip install 'lowvram[cuda]' or 'bitsandbytes>=0.45'"
    return None


def _float_weight(w: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
    """W [N, K] in `dtype` on the CPU, where bitsandbytes wants a float weight before the move that quantizes it
    (Int8Params quantizes only when moved from the CPU); dequantized a slice of output rows at a time (qzeros
    hold 32/bits rows per word, so slices start at multiples of 32)."""
    n, per, cpu = w.out_features, 32 // w.bits, "cpu"
    out = torch.empty(n, w.in_features, dtype=dtype)
    for n0 in range(0, n, _COLS):
        n1 = min(n0 + _COLS, n)
        z0, z1 = n0 // per, -(-n1 // per)
        part = PackedWeight(w.qweight[:, n0:n1].to(cpu), w.qzeros[:, z0:z1].to(cpu), w.scales[:, n0:n1].to(cpu),
                            None if w.g_idx is None else w.g_idx.to(cpu), w.bits, w.group_size)
        out[n0:n1] = dequantize(part, torch.float32).to(dtype)
    return out


class BnbLinear(nn.Module):
    """A bitsandbytes Linear4bit (NF4) or Linear8bitLt, with activations cast to what it computes in."""

    def __init__(self, w: PackedWeight, dtype: torch.dtype, device):
        super().__init__()
        import bitsandbytes as bnb

        device = torch.device(device)
        self.in_features, self.out_features, self.bits, self.dtype = w.in_features, w.out_features, w.bits, dtype
        bias = w.bias is not None
        if w.bits == 4:
            if device.type == "cpu" and w.in_features % 64:  # its CPU kernel repacks NF4 blocks per row
                raise ValueError(f"bitsandbytes' CPU 4-bit kernel needs in_features a multiple of 64, not "
                                 f"{w.in_features}")
            self.compute = dtype
            inner = bnb.nn.Linear4bit(w.in_features, w.out_features, bias=bias, compute_dtype=dtype,
                                      quant_type="nf4", device="meta")
            wf = _float_weight(w, torch.bfloat16 if dtype == torch.bfloat16 else torch.float16)
            inner.weight = bnb.nn.Params4bit(wf, requires_grad=False, quant_type="nf4", blocksize=64)
        elif w.bits == 8:
            self.compute = torch.float16  # LLM.int8 multiplies fp16 activations
            inner = bnb.nn.Linear8bitLt(w.in_features, w.out_features, bias=bias, has_fp16_weights=False,
                                        threshold=THRESHOLD, device="meta")
            inner.weight = bnb.nn.Int8Params(_float_weight(w, torch.float16), requires_grad=False,
                                             has_fp16_weights=False)
        else:
            raise ValueError(f"bitsandbytes runs 4-bit (NF4) and 8-bit weights, not {w.bits}-bit")
        if bias:
            inner.bias = nn.Parameter(w.bias.to(torch.device("cpu"), self.compute), requires_grad=False)
        self.inner = inner.to(device)  # bitsandbytes quantizes the float weight when it is moved

    def nbytes(self) -> int:
        """Resident bytes: the codes, and the NF4 absmaxes or int8 row scales."""
        w, total = self.inner.weight, 0
        total += w.numel() * w.element_size()
        qs = getattr(w, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
            if qs.state2 is not None:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.state2.code.numel() * 4
        scb = self._scb()
        if scb is not None:
            total += scb.numel() * scb.element_size()
        if self.inner.bias is not None:
            total += self.inner.bias.numel() * self.inner.bias.element_size()
        return total

    def weight_float(self) -> torch.Tensor:
        """The weight bitsandbytes computes with, as float32 [N, K] (its re-quantization of the checkpoint's)."""
        import bitsandbytes.functional as F

        w = self.inner.weight
        if self.bits == 4:
            return F.dequantize_4bit(w.data, w.quant_state).float()
        return w.data.float() * (self._scb().float() / 127).unsqueeze(1)

    def _scb(self):
        """LLM.int8's row scales: on the weight until the first call moves them into the layer's state."""
        scb = getattr(self.inner.weight, "SCB", None)
        return scb if scb is not None else getattr(getattr(self.inner, "state", None), "SCB", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.compute)).to(self.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {'nf4' if self.bits == 4 else 'llm.int8'}"


def make(w: PackedWeight, dtype: torch.dtype, device=None) -> nn.Module:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return BnbLinear(w, dtype, device)
