"""CPU backend on ONNX Runtime's MatMulNBits: int4/int8 weights, int8 activations (accuracy_level 4).

Measured on the project's machine it streams an int4 GEMV at ~32 GB/s, the DRAM bandwidth, where
torch's int4pack reaches ~16 GB/s. Each linear is a one-node ONNX graph; torch buffers are bound
zero-copy, so a call costs a few microseconds beyond the matmul itself.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile

import numpy as np
import torch
from torch import nn

from . import PackedWeight, unpack_cols, unpack_rows

_IMPORT_ERROR = None
try:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper
except ImportError as e:  # pragma: no cover - both are core dependencies
    _IMPORT_ERROR = e


def available() -> str | None:
    if _IMPORT_ERROR is not None:
        return f"onnxruntime/onnx not importable ({_IMPORT_ERROR}); pip install onnxruntime onnx"
    return None


def _block_size(group: int, k: int) -> int:
    """MatMulNBits needs a power-of-two block >= 16; split a larger or odd group into equal blocks."""
    g = k if group <= 0 else group
    bs = math.gcd(g, 128)
    if bs < 16:
        raise ValueError(f"group size {group} with in_features {k} has no power-of-two block >= 16 for MatMulNBits")
    return bs


def _external(arr: np.ndarray, name: str, f, off: int) -> "onnx.TensorProto":
    t = onnx.TensorProto()
    t.name = name
    t.data_type = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)
    t.dims.extend(arr.shape)
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", os.path.basename(f.name)), ("offset", str(off)), ("length", str(arr.nbytes))):
        e = t.external_data.add()
        e.key, e.value = k, v
    f.write(arr.tobytes())
    return t


def _session_for(k: int, n: int, bits: int, bs: int, p: dict, accuracy_level: int) -> "ort.InferenceSession":
    """A one-node MatMulNBits session whose weights are constant initializers.

    Only constant weights get MatMulNBits' prepacked fast path (as graph inputs a GEMV is ~200x slower).
    They travel through a deleted-at-once external-data file: initializers embedded in the proto stay
    resident a second time inside ONNX Runtime, doubling the model's memory.
    """
    names = ["A", "B", "scales", "zero_points"]
    consts = ["B", "scales", "zero_points"] + (["bias"] if p["bias"] is not None else [])
    if p["bias"] is not None:
        names += ["", "bias"]  # g_idx slot left empty
    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.NamedTemporaryFile(dir=folder, prefix="lowvram-ort-", suffix=".bin") as f:
        inits, off = [], 0
        for name in consts:
            inits.append(_external(np.ascontiguousarray(p[name]), name, f, off))
            off += p[name].nbytes
        f.flush()
        node = helper.make_node("MatMulNBits", names, ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                                block_size=bs, accuracy_level=accuracy_level)
        a = helper.make_tensor_value_info("A", TensorProto.FLOAT, ["M", k])
        out = helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])
        model = helper.make_model(helper.make_graph([node], "qlinear", [a], [out], initializer=inits),
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        model.ir_version = 8
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(os.environ.get("LOWVRAM_THREADS", torch.get_num_threads()))
        so.inter_op_num_threads = 1
        # Hundreds of sessions share the cores with torch: a spinning idle pool (ORT's default, also for
        # its global pool) starves torch's own ops between the matmuls (a 30 us softmax took 900 us).
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", os.path.dirname(f.name))
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def repack(w: PackedWeight) -> dict:
    """GPTQ layout -> MatMulNBits inputs (numpy, contiguous), plus the input permutation for act-order."""
    k, n, bits = w.in_features, w.out_features, w.bits
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits backend supports 4 and 8 bits, not {bits}")
    zeros = unpack_cols(w.qzeros, bits)[:, :n]  # [G, N]
    g = w.group_index()
    perm = None
    if not w.has_act_order() and sys.byteorder == "little":
        # GPTQ packs K low bits first in little-endian int32 words: its bytes, transposed, already are
        # MatMulNBits' rows (low nibble = even column). No int32-per-weight unpack (8x the packed size).
        group = w.group_size if w.group_size > 0 else k
        bs = _block_size(group, k)
        nblk = k // bs
        b = w.qweight.t().contiguous().view(torch.uint8).reshape(n, nblk, bs * bits // 8)
        return _finish(w, b, zeros, g, bs, None)
    q = unpack_rows(w.qweight, bits)  # [K, N]
    if w.has_act_order():
        perm = torch.argsort(g, stable=True)
        q, g = q[perm], g[perm]
        counts = torch.bincount(g)
        if not bool((counts == counts[0]).all()):
            raise ValueError("groups of unequal size (act-order, or a group size that does not divide the inputs) "
                             "are not supported by MatMulNBits")
        group = int(counts[0])
    else:
        group = w.group_size if w.group_size > 0 else k
    bs = _block_size(group, k)
    nblk = k // bs
    qt = q.t().contiguous().to(torch.uint8).reshape(n, nblk, bs)  # [N, nblk, bs]
    del q
    b = qt[..., 0::2] | (qt[..., 1::2] << 4) if bits == 4 else qt
    return _finish(w, b, zeros, g, bs, perm)


def _finish(w: PackedWeight, b: torch.Tensor, zeros: torch.Tensor, g: torch.Tensor, bs: int, perm) -> dict:
    """Scales and zero points per block (in the permuted order when act-order), packed for MatMulNBits."""
    n, nblk = b.shape[0], b.shape[1]
    blk_group = g[torch.arange(nblk) * bs]  # the group of each block
    scales = w.scales.float()[blk_group].t().contiguous()  # [N, nblk]
    zp = zeros[blk_group].t().contiguous().to(torch.uint8)  # [N, nblk]
    if w.bits == 4:
        if nblk % 2:
            zp = torch.cat([zp, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
        zpp = zp[:, 0::2] | (zp[:, 1::2] << 4)
    else:
        zpp = zp
    return {
        "B": b.contiguous().numpy(), "scales": scales.reshape(-1).numpy(), "zero_points": zpp.reshape(-1).contiguous().numpy(),
        "bias": None if w.bias is None else w.bias.float().contiguous().numpy(), "perm": perm, "block_size": bs,
    }


class OrtLinear(nn.Module):
    def __init__(self, w: PackedWeight, dtype: torch.dtype, accuracy_level: int = 4):
        super().__init__()
        self.in_features, self.out_features, self.bits = w.in_features, w.out_features, w.bits
        self.dtype = dtype
        p = repack(w)
        self.block_size = p["block_size"]
        self.perm = p["perm"]
        self._nbytes = sum(p[k].nbytes for k in ("B", "scales", "zero_points"))
        self.sess = _session_for(self.in_features, self.out_features, w.bits, self.block_size, p, accuracy_level)
        self.binding = self.sess.io_binding()

    def nbytes(self) -> int:
        return self._nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        a = x.reshape(-1, shape[-1])
        if self.perm is not None:
            a = a[:, self.perm]
        a = a.to(torch.float32).contiguous()
        y = torch.empty(a.shape[0], self.out_features, dtype=torch.float32)
        b = self.binding
        b.bind_input("A", "cpu", 0, np.float32, list(a.shape), a.data_ptr())
        b.bind_output("Y", "cpu", 0, np.float32, list(y.shape), y.data_ptr())
        self.sess.run_with_iobinding(b)
        return y.view(*shape[:-1], self.out_features).to(self.dtype if self.dtype != torch.float32 else y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, block={self.block_size}"


def make(w: PackedWeight, dtype: torch.dtype) -> nn.Module:
    return OrtLinear(w, dtype)
