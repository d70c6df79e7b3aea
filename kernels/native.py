"""CPU backend on lowvram's own C kernel (kernels/native/lvq.c), built at install when a compiler is there.

Why a kernel of our own: decode streams every weight once per token, so it is bound by memory
bandwidth, and ONNX Runtime's MatMulNBits reached only 18-20 GB/s of this machine's 32.7 GB/s from
DRAM. The C kernel keeps the weights in one flat packed buffer per linear (exactly the int4/int8
bytes plus fp16 scales and uint8 zeros, nothing resident twice) and computes with AVX512-VNNI or
AVX2 on int8-quantized activations. Prompts (many rows at once) dequantize the weight to bf16 in
row chunks for torch's matrix multiply where the CPU has AMX; elsewhere the int8 kernel is faster
(bf16 GEMMs are emulated on AVX2, 5-6x slower than fp32 on a Zen 3; on a Zen 5's AVX512-BF16 they
took twice as long as the int8 kernel), so prompts run it eight rows at a time.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading

import torch
from torch import nn

from . import PackedWeight, make_linear, portable_cpu_backend, unpack_cols

_lib = None
_why = None


def _load():
    global _lib, _why
    if _lib is not None or _why is not None:
        return _lib
    try:
        from . import _lvq  # the compiled extension; its functions are reached through ctypes
    except ImportError as e:
        _why = (f"the native kernel was not built ({e}); reinstall with a C compiler: pip install -e . "
                "(or pip install lowvram) with gcc/clang present")
        return None
    lib = ctypes.CDLL(_lvq.__file__)
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.lvq_gemm.argtypes = [p, i32, i64, i64, p, p, p, i64, i32, i32, p, p, i32, i32]
    lib.lvq_dequant_bf16.argtypes = [p, p, p, i64, i32, i32, i64, i64, p, i32]
    lib.lvq_repack.argtypes = [p, i64, i64, i32, p, p, i32]
    for f in (lib.lvq_gemm, lib.lvq_dequant_bf16, lib.lvq_repack, lib.lvq_isa, lib.lvq_fast_bf16):
        f.restype = ctypes.c_int
    lib.lvq_set_isa.argtypes = [i32]
    f32 = ctypes.c_float
    lib.lvq_rmsnorm.argtypes = [p, i32, p, i32, i64, i64, f32, p]
    lib.lvq_swiglu.argtypes = [p, i32, i64, i64, p, i32]
    lib.lvq_attend_one.argtypes = [p, i32, p, p, i64, i64, i64, i64, p, p, i64, i64, p, i32]
    lib.lvq_attend_rows.argtypes = [p, p, p, i64, i64, i64, i64, p, p, i64, i64, i64, p, i32]
    lib.lvq_attend_one_i8.argtypes = [p, i32, p, p, i64, i64, i64, i64, p, p, p, p, i64, i64, p, i32]
    lib.lvq_decode_blocks.argtypes = [p, p, p, i64, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i32]
    for f in (lib.lvq_rmsnorm, lib.lvq_swiglu, lib.lvq_attend_one, lib.lvq_attend_one_i8, lib.lvq_attend_rows,
              lib.lvq_decode_blocks):
        f.restype = ctypes.c_int
    lib.lvq_hugepages.argtypes = [p, i64]
    lib.lvq_hugepages.restype = None
    _lib = lib
    return lib


def available() -> str | None:
    _load()
    return _why


ISAS = ("generic", "avx2", "avx512-vnni")  # the kernel's paths, slowest first


def isa() -> str | None:
    """The path the kernel runs on this CPU (the best it has), or None when the kernel is not built."""
    lib = _load()
    return ISAS[lib.lvq_isa()] if lib else None


def fast() -> bool:
    """True where a vectorized path runs (x86-64 with AVX2+FMA+F16C or AVX512-VNNI); elsewhere ONNX
    Runtime is faster."""
    return isa() not in (None, "generic")


def set_isa(name: str | None) -> None:
    """Cap the path at `name` (None: the best the CPU has), so tests compare every path the CPU runs."""
    _load().lvq_set_isa(ISAS.index(name or ISAS[-1]))


def prompt_dequantizes() -> bool:
    """Whether prompts dequantize to bf16 for torch's matmul (fast where the CPU has AMX) instead of
    running the int8 kernel (faster everywhere else, AVX512-BF16 without AMX included)."""
    lib = _load()
    return bool(lib and lib.lvq_fast_bf16())


def threads() -> int:
    return int(os.environ.get("LOWVRAM_THREADS", torch.get_num_threads()))


def supports(w: PackedWeight) -> str | None:
    """Why the kernel cannot take this weight, or None."""
    return supports_shape(w.bits, w.in_features, w.group_size)


def supports_shape(bits: int, k: int, group: int) -> str | None:
    """The same from a linear's bits, in_features and group size (<= 0: one group per row)."""
    g = group if group > 0 else k
    if bits not in (4, 8):
        return f"{bits}-bit weights (needs 4 or 8)"
    if k % 128:
        return f"in_features {k} is not a multiple of 128"
    if not (g in (32, 64) or g % 128 == 0) or k % g:
        return f"group size {g} (needs 32, 64 or a multiple of 128 dividing {k})"
    return None


_TYPES = {torch.float32: 0, torch.bfloat16: 1}  # activation/output dtypes the kernel reads and writes


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


_local = threading.local()


def _workspace(numel: int) -> torch.Tensor:
    """A per-thread bf16 buffer reused by every prompt chunk: a fresh 32 MiB tensor per chunk spent
    more time in page faults than in dequantizing."""
    ws = getattr(_local, "ws", None)
    if ws is None or ws.numel() < numel:
        ws = _local.ws = torch.empty(numel, dtype=torch.bfloat16)
        _load().lvq_hugepages(_ptr(ws), ws.numel() * 2)
    return ws


def _new_weight(rows: int, row_bytes: int) -> torch.Tensor:
    """The buffer a linear's packed rows are repacked into: from the allocator set by `weights_in` (the repack
    cache's file), else fresh memory on 2 MiB pages."""
    alloc = getattr(_local, "alloc", None)
    if alloc is not None:
        return alloc((rows, row_bytes), torch.uint8)
    w = torch.empty(rows, row_bytes, dtype=torch.uint8)
    _load().lvq_hugepages(_ptr(w), w.numel())
    return w


@contextlib.contextmanager
def weights_in(alloc):
    """Linears built in this thread inside the block repack their weights into buffers from alloc(shape, dtype)."""
    _local.alloc = alloc
    try:
        yield
    finally:
        _local.alloc = None


class NativeLinear(nn.Module):
    # Above this many rows a prompt chunk dequantizes to bf16 and multiplies on AMX: measured on a 4096 x 27392
    # int4 matrix, 2 threads, the row-by-row kernel takes 15 ms at 16 rows and 22 ms at 24, the AMX path 20-22 ms.
    gemm_rows = 16
    chunk_elems = 8 << 20  # weights dequantized at a time: 16 MiB of bf16, reused (rows = this / in_features)

    def __init__(self, w: PackedWeight, dtype: torch.dtype):
        super().__init__()
        why = supports(w)
        if why:
            raise ValueError(f"native kernel cannot run {why}")
        lib = _load()
        self.in_features, self.out_features, self.dtype, self.bits = w.in_features, w.out_features, dtype, w.bits
        k, n = w.in_features, w.out_features
        self.group = w.group_size if w.group_size > 0 else k
        g = w.group_index()
        self.perm = None
        if w.has_act_order():
            self.perm = torch.argsort(g, stable=True)
            g = g[self.perm]
            if not torch.equal(g, torch.arange(k) // self.group):
                raise ValueError("native kernel needs equal groups after sorting by g_idx")
        qweight = w.qweight.contiguous()
        self.weight = _new_weight(n, k * w.bits // 8)
        perm32 = None if self.perm is None else self.perm.to(torch.int32).contiguous()
        rc = lib.lvq_repack(_ptr(qweight), k, n, w.bits, _ptr(perm32), _ptr(self.weight), threads())
        assert rc == 0, rc
        # One scale and zero per (row, group); groups in kernel order.
        first = torch.arange(0, k, self.group)
        src_g = g[first]
        self.scales = w.scales.to(torch.float16)[src_g].t().contiguous()  # [N, G]
        zeros = unpack_cols(w.qzeros, w.bits)[:, :n][src_g].t().contiguous()
        if int(zeros.max()) > 255 or int(zeros.min()) < 0:  # a v1 file's zero 0 is stored as -1 -> true zero 256
            raise ValueError("native kernel keeps zero points in a byte; this checkpoint has one outside 0..255")
        self.zeros = zeros.to(torch.uint8)
        self.bias = None if w.bias is None else w.bias.float().contiguous()
        self._ready()

    def _ready(self):
        self.threads = threads()
        self._args = (self.in_features, _ptr(self.weight), _ptr(self.scales), _ptr(self.zeros), self.out_features,
                      self.bits, self.group, _ptr(self.bias))

    def packed(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The tensors and sizes this module is made of, for a cache of repacked weights (`from_packed`)."""
        ts = {"weight": self.weight, "scales": self.scales, "zeros": self.zeros}
        ts.update({k: t for k, t in (("bias", self.bias), ("perm", self.perm)) if t is not None})
        return ts, {"in": self.in_features, "out": self.out_features, "bits": self.bits, "group": self.group}

    @classmethod
    def from_packed(cls, ts: dict[str, torch.Tensor], meta: dict, dtype: torch.dtype) -> NativeLinear:
        """A module over tensors already in the kernel's layout (e.g. mapped from the repack cache)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.bits, self.group = meta["in"], meta["out"], meta["bits"], meta["group"]
        self.dtype = dtype
        n, groups = self.out_features, self.in_features // self.group
        want = {"weight": (n, self.in_features * self.bits // 8), "scales": (n, groups), "zeros": (n, groups)}
        for k, shape in want.items():
            if tuple(ts[k].shape) != shape:
                raise ValueError(f"{k} {tuple(ts[k].shape)}, expected {shape}")
        self.weight, self.scales, self.zeros = ts["weight"], ts["scales"], ts["zeros"]
        self.bias, self.perm = ts.get("bias"), ts.get("perm")
        self._ready()
        return self

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.scales, self.zeros, self.bias)
                   if t is not None)

    def dequantize(self, n0: int = 0, n1: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows n0..n1 of W as bf16, inputs in kernel order (act-order permuted)."""
        n1 = self.out_features if n1 is None else n1
        if out is None:
            out = torch.empty(n1 - n0, self.in_features, dtype=torch.bfloat16)
        rc = _lib.lvq_dequant_bf16(_ptr(self.weight), _ptr(self.scales), _ptr(self.zeros), self.in_features,
                                   self.bits, self.group, n0, n1, _ptr(out), self.threads)
        assert rc == 0, rc
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if shape[-1] != self.in_features:  # the C kernel would read past the row, not fail
            raise ValueError(f"input has {shape[-1]} features, this linear takes {self.in_features}")
        a = x.reshape(-1, shape[-1])
        if self.perm is not None:
            a = a[:, self.perm]
        m = a.shape[0]
        if m > self.gemm_rows and prompt_dequantizes():
            a = a.to(torch.bfloat16)
            rows = max(64, self.chunk_elems // self.in_features // 64 * 64)
            ws = _workspace(rows * self.in_features)
            y = torch.empty(m, self.out_features, dtype=torch.bfloat16)
            for n0 in range(0, self.out_features, rows):
                n1 = min(n0 + rows, self.out_features)
                wt = self.dequantize(n0, n1, ws[: (n1 - n0) * self.in_features].view(n1 - n0, self.in_features))
                if n1 - n0 == self.out_features:
                    torch.mm(a, wt.t(), out=y)
                else:
                    y[:, n0:n1] = a @ wt.t()
            if self.bias is not None:
                y = y + self.bias
        else:
            xt = _TYPES.get(a.dtype)
            if xt is None:
                a, xt = a.float(), 0
            a = a.contiguous()
            yt = _TYPES.get(self.dtype, 0)
            y = torch.empty(m, self.out_features, dtype=self.dtype if self.dtype in _TYPES else torch.float32)
            rc = _lib.lvq_gemm(a.data_ptr(), xt, m, *self._args, y.data_ptr(), yt, self.threads)
            assert rc == 0, rc
        return y.view(*shape[:-1], self.out_features).to(self.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group}, "
                f"act_order={self.perm is not None}")


def make(w: PackedWeight, dtype: torch.dtype) -> nn.Module:
    """The native module, or ONNX Runtime's for a shape the kernel does not take (in_features not a
    multiple of 128, odd group sizes), so one model may mix both; torch's kernels where ONNX Runtime is missing."""
    if supports(w) is None:
        try:
            return NativeLinear(w, dtype)
        except ValueError:
            pass
    return make_linear(w, portable_cpu_backend(), dtype)
