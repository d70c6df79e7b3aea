"""Every backend's quantized linear against the dequantized fp32 reference, and through a whole model."""

import pytest
import numpy as np
import torch

import lowvram
from lowvram.converters.quantize import quantize
from lowvram.kernels import PackedWeight, default_backend, dequantize, make_linear, pack_cols, pack_rows
from lowvram.kernels import cuda as kcuda
from lowvram.kernels import native


def random_packed(n, k, bits, group, act_order, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    G = k // group
    q = torch.randint(0, 2**bits, (k, n), dtype=torch.int32, generator=g)
    z = torch.randint(0, 2**bits, (G, n), dtype=torch.int32, generator=g)
    s = (torch.rand(G, n, generator=g) * 0.01 + 1e-3).half()
    g_idx = (torch.arange(k) // group).to(torch.int32)
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=g)]
    b = torch.randn(n, generator=g) if bias else None
    return PackedWeight(pack_rows(q, bits), pack_cols(z, bits), s, g_idx, bits, group, b)


def _need(backend):
    """Skip where a backend is not installed here (the native kernel needs a C compiler at install)."""
    import importlib

    from lowvram.kernels import BACKENDS

    why = importlib.import_module(BACKENDS[backend]).available()
    if why:
        pytest.skip(f"backend {backend!r} unavailable: {why}")


CPU_BACKENDS = [("torch", torch.float32, 1e-6), ("ort", torch.float32, 2e-2), ("ort", torch.bfloat16, 3e-2),
                ("cpu", torch.bfloat16, 3e-2), ("native", torch.float32, 2e-2), ("native", torch.bfloat16, 3e-2)]


@pytest.mark.parametrize("backend,dtype,tol", CPU_BACKENDS, ids=lambda x: str(x))
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 128), (8, 256)])
@pytest.mark.parametrize("act_order", [False, True])
def test_linear_matches_dequantized_reference(backend, dtype, tol, bits, group, act_order):
    _need(backend)
    k = 256
    if backend == "cpu" and bits == 8 and group != k:
        pytest.skip("torch int8pack is per-channel only (group = in_features); ort covers grouped int8")
    w = random_packed(96, k, bits, group, act_order, bias=True, seed=bits + group)
    for rows in (5, 40):  # decode-sized and prompt-sized inputs take different paths in some backends
        x = torch.randn(rows, k)
        ref = x @ dequantize(w).t() + w.bias
        y = make_linear(w, backend, dtype)(x.to(dtype)).float()
        err = ((y - ref).norm() / ref.norm()).item()
        assert err < tol, (rows, err)


def _xhat(x, perm):
    """x as the native kernel sees it: int8 per 128 inputs (symmetric), in kernel (act-order) order."""
    xp = x if perm is None else x[:, perm]
    b = xp.reshape(x.shape[0], -1, 128)
    # the kernel's own float32 steps, in numpy (IEEE products; torch's broadcast multiply can differ in the
    # last bit, which flips a code at a rounding boundary): codes round(x * (127/amax)), values code * amax/127
    bn = b.numpy().astype(np.float32)
    amax = np.abs(bn).max(-1, keepdims=True)
    q = np.clip(np.rint(bn * (np.float32(127) / amax)), -127, 127)
    xh = torch.from_numpy(q * (amax / np.float32(127))).reshape(x.shape)
    if perm is not None:
        out = torch.empty_like(xh)
        out[:, perm] = xh
        xh = out
    return xh


def _native_error(mod, w, x):
    """(relative error, tolerance) of the native module on x: exact against W @ x_hat, or, for prompts that
    CPUs with AMX dequantize and multiply in bf16, against the bf16 product."""
    if x.shape[0] > mod.gemm_rows and native.prompt_dequantizes():
        ref, tol = x.bfloat16().double() @ dequantize(w).bfloat16().double().t() + w.bias.double(), 1e-2
    else:
        ref, tol = _xhat(x, mod.perm).double() @ dequantize(w).double().t() + w.bias.double(), 1e-5
    return ((mod(x).double() - ref).norm() / ref.norm()).item(), tol


@pytest.mark.skipif(native.available() is not None, reason="native kernel not built (no C compiler at install)")
@pytest.mark.parametrize("path", native.ISAS)
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (4, 512), (8, 32), (8, 64), (8, 128), (8, -1)])
@pytest.mark.parametrize("act_order", [False, True])
def test_native_is_exact_for_its_quantized_activations(path, bits, group, act_order):
    """Beyond the tolerance above: every path of the C kernel (AVX512-VNNI, AVX2, portable) computes
    W @ x_hat exactly (x_hat = the int8 activations), for one activation row (decode: two weight
    rows per step), three rows and prompt-sized inputs (bf16 dequantize + torch where the CPU has AMX)."""
    if native.ISAS.index(path) > native.ISAS.index(native.isa()):
        pytest.skip(f"this CPU runs the kernel's {native.isa()} path at best, not {path}")
    k = 512 if group == 512 else 640  # 5 blocks: the loops that take blocks four at a time leave one over
    w = random_packed(88, k, bits, group if group > 0 else k, act_order, bias=True, seed=bits + group)
    w.group_size = group if group > 0 else k
    mod = native.NativeLinear(w, torch.float32)
    native.set_isa(path)
    try:
        # 32 and 37: the VNNI prompt panels (from 8 rows, 16 with groups of 32), 37 with rows left over
        for rows in (1, 3, 7, 2 * mod.gemm_rows, 37):
            err, tol = _native_error(mod, w, torch.randn(rows, k))
            assert err < tol, (rows, err)
    finally:
        native.set_isa(None)
    assert mod.weight.numel() == 88 * k * bits // 8  # packed in memory, nothing unpacked kept


@pytest.mark.skipif(native.available() is not None, reason="native kernel not built (no C compiler at install)")
@pytest.mark.parametrize("path", ["avx2", "avx512-vnni"])
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 128)])
def test_native_prompt_tiles_full_and_partial(path, bits, group):
    """The prompt loops on whole 32-row weight tiles and on a tile's leftover rows: one thread and 600 output
    rows give 38-row chunks (a full tile, then 6 rows), which the multi-threaded test above, with 16-row chunks,
    never reaches (the panels' rows past 16). Exact for the int8 activations at 8, 12 and 37 rows."""
    if native.ISAS.index(path) > native.ISAS.index(native.isa()):
        pytest.skip(f"this CPU runs the kernel's {native.isa()} path at best, not {path}")
    w = random_packed(600, 640, bits, group, False, bias=True, seed=7 * bits + group)
    mod = native.NativeLinear(w, torch.float32)
    mod.threads = 1
    native.set_isa(path)
    try:
        for rows in (8, 12, 37):
            err, tol = _native_error(mod, w, torch.randn(rows, 640))
            assert err < tol, (rows, err)
    finally:
        native.set_isa(None)


@pytest.mark.skipif(native.available() is not None, reason="native kernel not built (no C compiler at install)")
@pytest.mark.parametrize("path", native.ISAS)
@pytest.mark.parametrize("bits,group,act_order", [(4, 32, False), (4, 128, True), (8, 64, False), (8, -1, True)])
def test_native_bf16_prompt_path(monkeypatch, path, bits, group, act_order):
    """The AMX route for prompts (dequantize rows to bf16, torch's matmul) on any CPU: its dequantizer
    (AVX512-BF16 or portable) rounds each weight to the nearest bf16, and the prompt it serves matches the
    bf16 product. Only AMX CPUs take this route by default, so without the override it would go untested."""
    if native.ISAS.index(path) > native.ISAS.index(native.isa()):
        pytest.skip(f"this CPU runs the kernel's {native.isa()} path at best, not {path}")
    k = 640
    w = random_packed(200, k, bits, group if group > 0 else k, act_order, bias=True, seed=3 * bits + group)
    w.group_size = group if group > 0 else k
    mod = native.NativeLinear(w, torch.float32)
    mod.chunk_elems = 64 * k  # several chunks of rows, the last one short
    monkeypatch.setattr(native, "prompt_dequantizes", lambda: True)
    native.set_isa(path)
    try:
        ref = dequantize(w) if mod.perm is None else dequantize(w)[:, mod.perm]
        got = mod.dequantize()
        assert got.dtype == torch.bfloat16
        assert torch.equal(got.float(), ref.bfloat16().float())
        assert torch.equal(mod.dequantize(50, 90).float(), got[50:90].float())
        err, tol = _native_error(mod, w, torch.randn(2 * mod.gemm_rows + 5, k))
        assert err < tol, err
    finally:
        native.set_isa(None)


def test_native_falls_back_for_shapes_it_does_not_take():
    if native.available() is not None:
        pytest.skip("native kernel not built")
    w = random_packed(32, 320, 4, 64, False, False)  # 320 inputs: not a multiple of 128
    assert native.supports(w) and type(native.make(w, torch.bfloat16)).__module__.endswith("ort")


def test_native_falls_back_past_a_missing_onnxruntime(monkeypatch):
    """Where onnxruntime cannot be imported (no wheel for the platform, a broken install), shapes the kernel does
    not take go to torch's own kernels, which compute the same product, instead of failing inside ort.make."""
    if native.available() is not None:
        pytest.skip("native kernel not built")
    from lowvram.kernels import ort

    monkeypatch.setattr(ort, "_IMPORT_ERROR", ImportError("No module named 'onnxruntime'"))
    w = random_packed(32, 320, 4, 64, False, False)
    mod = native.make(w, torch.bfloat16)
    assert type(mod).__module__.endswith(".cpu")
    x = torch.randn(3, 320)
    ref = x @ dequantize(w).t()
    assert ((mod(x.bfloat16()).float() - ref).norm() / ref.norm()) < 3e-2


def test_native_rejects_an_input_of_the_wrong_width():
    if native.available() is not None:
        pytest.skip(f"native kernel not built: {native.available()}")
    mod = native.NativeLinear(random_packed(32, 256, 4, 128, False, False), torch.bfloat16)
    assert mod(torch.randn(3, 256)).shape == (3, 32)
    with pytest.raises(ValueError, match="input has 128 features, this linear takes 256"):
        mod(torch.randn(3, 128))


def test_default_backend_and_errors(monkeypatch):
    assert default_backend("cpu", torch.float32) == "torch"
    assert default_backend("cpu", torch.bfloat16) == ("native" if native.available() is None and native.fast()
                                                       else "ort")
    assert default_backend("cuda", torch.float16) == "cuda"
    monkeypatch.setenv("LOWVRAM_BACKEND", "cpu")
    assert default_backend("cpu", torch.bfloat16) == "cpu"
    assert default_backend("cpu", torch.float32) == "torch"  # the variable never leaves the exact path
    monkeypatch.setenv("LOWVRAM_BACKEND", "Native")
    assert default_backend("cpu", torch.bfloat16) == "native"
    monkeypatch.setenv("LOWVRAM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LOWVRAM_BACKEND 'bogus' not known; use one of"):
        default_backend("cpu", torch.bfloat16)
    monkeypatch.setenv("LOWVRAM_BACKEND", "cpu")
    w = random_packed(16, 64, 4, 32, False, False)
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        make_linear(w, "nope")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: no CUDA device"):
            make_linear(w, "cuda", torch.float16)
    if not torch.backends.mps.is_available():
        with pytest.raises(RuntimeError, match="no Apple MPS device"):
            make_linear(w, "mps", torch.float16)


def test_cuda_dispatch_and_packing_on_cpu():
    """What runs on the GPU, checked where it can be without one: the choice of kernel and tinygemm's input."""
    w = random_packed(64, 1024, 4, 128, True, False)
    assert kcuda.use_tinygemm(w, (8, 0)) and not kcuda.use_tinygemm(w, (7, 5))
    assert not kcuda.use_tinygemm(random_packed(64, 1024, 8, 128, False, False), (9, 0))
    # the dequantize path that old cards use is device-agnostic: run it on CPU
    x = torch.randn(3, 1024)
    y = kcuda.DequantLinear(w, torch.float32, "cpu")(x)
    assert torch.allclose(y, x @ dequantize(w).t(), atol=1e-4)


@pytest.mark.parametrize("bits,act_order", [(4, True), (8, False)])
def test_dequantize_path_in_slices_of_outputs(bits, act_order, monkeypatch):
    """Old cards dequantize per call, a slice of outputs at a time (its temporaries would otherwise be ~24 bytes
    per weight): the same result as the whole matrix, bias and act-order included."""
    w = random_packed(96, 256, bits, 64, act_order, bias=True, seed=bits)
    x = torch.randn(5, 256)
    whole = kcuda.DequantLinear(w, torch.float32, "cpu")(x)
    assert torch.allclose(whole, x @ dequantize(w).t() + w.bias, atol=1e-4)
    monkeypatch.setattr(kcuda, "DEQUANT_CHUNK", 256 * 40)  # slices of 40 outputs (rounded to 32/bits), 3 of them
    assert torch.allclose(kcuda.DequantLinear(w, torch.float32, "cpu")(x), whole, atol=1e-5)


def test_cuda_default_dtype_follows_the_cards_generation(monkeypatch):
    """bf16 where the GPU has it in hardware (Ampere and newer), fp16 on Turing/Pascal laptops, where
    torch.cuda.is_bf16_supported() also says yes (emulated); asked of the model's GPU, not the current one."""
    from lowvram.loading import resolve_dtype

    asked = []
    caps = {0: (8, 6), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or caps[d.index or 0])
    assert resolve_dtype(None, "cuda:0") == torch.bfloat16
    assert resolve_dtype(None, "cuda:1") == torch.float16
    assert [d.index for d in asked] == [0, 1]
    assert resolve_dtype("bfloat16", "cuda:1") == torch.bfloat16  # asked for: given


@pytest.mark.parametrize("backend", ["native", "ort", "cpu"])
def test_model_through_fast_backends(backend, tiny, tmp_path):
    _need(backend)
    src = tiny("chatglm3-6b", hidden_size=128, kv_channels=32, ffn_hidden_size=256)
    out = tmp_path / "q"
    quantize(src, out, bits=4, group_size=32, progress=False)
    ids = list(range(3, 20))
    ref = lowvram.load(out, dtype="float32").logits(ids)
    fast = lowvram.load(out, backend=backend)  # bf16 activations (int8 inside ORT)
    assert type(fast.net.layers[0].mlp.up).__module__.endswith(backend)
    err = ((fast.logits(ids) - ref).norm() / ref.norm()).item()
    assert err < 0.05, err


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 128), (8, -1)])
@pytest.mark.parametrize("act_order", [False, True])
def test_bnb_linear_computes_with_its_requantization_of_the_weights(bits, group, act_order):
    """bitsandbytes re-quantizes (NF4 / LLM.int8): its output is x @ W_bnb.T + b, W_bnb within NF4's or int8's
    error of the checkpoint's W, stored packed."""
    _need("bnb")
    k = 256
    w = random_packed(96, k, bits, group if group > 0 else k, act_order, bias=True, seed=bits + k)
    m = make_linear(w, "bnb", torch.bfloat16, "cpu")
    ref = dequantize(w)
    wb = m.weight_float()
    w_err = ((wb - ref).norm() / ref.norm()).item()
    # uniform codes are NF4's worst case (~9% measured); int8 per row rounds to 1/127 of the row's max
    assert 1e-4 < w_err < (0.12 if bits == 4 else 0.01), w_err
    assert m.nbytes() < w.out_features * k * (0.6 if bits == 4 else 1.1)
    for rows in (1, 9):
        x = torch.randn(rows, k)
        y = m(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16
        own = x @ wb.t() + w.bias
        err = ((y.float() - own).norm() / own.norm()).item()
        assert err < 1e-2, (rows, err)  # bf16 (NF4) or int8 (LLM.int8) activations


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (bitsandbytes' CUDA kernels need one)")
@pytest.mark.parametrize("bits", [4, 8])
def test_bnb_linear_on_cuda(bits):
    """The same on the GPU, fp16 activations: the weights quantized there, the output x @ W_bnb.T + b."""
    _need("bnb")
    w = random_packed(256, 512, bits, 128, False, bias=True, seed=bits)
    m = make_linear(w, "bnb", torch.float16, "cuda")
    assert m.inner.weight.device.type == "cuda"
    wb = m.weight_float().cpu()
    ref = dequantize(w)
    assert ((wb - ref).norm() / ref.norm()).item() < (0.12 if bits == 4 else 0.01)
    x = torch.randn(5, 512)
    y = m(x.half().cuda()).float().cpu()
    own = x @ wb.t() + w.bias
    assert ((y - own).norm() / own.norm()).item() < 1e-2


def test_bnb_cpu_4bit_rejects_widths_its_kernel_cannot_take():
    _need("bnb")
    with pytest.raises(ValueError, match="multiple of 64, not 96"):
        make_linear(random_packed(64, 96, 4, 32, False, False), "bnb", torch.bfloat16, "cpu")


def test_bnb_unavailable_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as where it is not installed
    w = random_packed(16, 128, 4, 32, False, False)
    with pytest.raises(RuntimeError, match=r"backend 'bnb' is unavailable: bitsandbytes is not installed.*pip install"):
        make_linear(w, "bnb", torch.bfloat16)


@pytest.mark.parametrize("bits,tol", [(4, 0.25), (8, 0.03)])
def test_model_through_bnb(bits, tol, tiny, tmp_path):
    """A whole model on bitsandbytes' CPU kernels: every block linear is bitsandbytes', logits near the exact
    path's (4-bit: within NF4's re-quantization error, which the random tiny weights make large)."""
    _need("bnb")
    src = tiny("chatglm3-6b", hidden_size=128, kv_channels=32, ffn_hidden_size=256)
    out = tmp_path / "q"
    quantize(src, out, bits=bits, group_size=32 if bits == 4 else -1, progress=False)
    ids = list(range(3, 20))
    ref = lowvram.load(out, dtype="float32").logits(ids)
    m = lowvram.load(out, backend="bnb")
    assert all(type(getattr(layer, name)).__name__ == "BnbLinear" for blk in m.net.layers
               for layer, name in ((blk.attn, "qkv"), (blk.attn, "out"), (blk.mlp, "up"), (blk.mlp, "down")))
    err = ((m.logits(ids) - ref).norm() / ref.norm()).item()
    assert err < tol, err
    assert len(m.generate(ids, max_new_tokens=4)) == 4


NO_CUDA = "no CUDA device (CUDA kernels run only where a GPU is present)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group,k", [(4, 32, 1024), (4, 64, 1024), (4, 128, 2048), (4, 128, 320), (8, 32, 256),
                                          (8, 128, 512), (8, 512, 512), (4, 128, 13696), (4, 1024, 1024)])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("rows", [7, 40])  # a decode-sized batch, and a prompt (int8 per-channel: another path)
def test_cuda_linear_matches_dequantized_reference(dtype, bits, group, k, act_order, rows):
    """(4, 128, 13696): GLM's down projection; (4, 1024, 1024): one scale per row, as THUDM's int4."""
    w = random_packed(192, k, bits, group, act_order, bias=True, seed=bits + group)
    x = torch.randn(rows, k)
    ref = x @ dequantize(w).t() + w.bias
    mod = make_linear(w, "cuda", dtype, "cuda")
    y = mod(x.to("cuda", dtype)).float().cpu()
    err = ((y - ref).norm() / ref.norm()).item()
    assert err < 2e-2, (type(mod).__name__, err)


@pytest.mark.parametrize("chunk", [None, 256 * 40])
def test_cuda_int8_module_on_cpu(chunk, monkeypatch):
    """The CUDA int8 weight-only module is device-agnostic: grouped, act-order and per-channel on CPU; grouped
    weights dequantize a slice of outputs at a time (here also in slices of 40)."""
    if chunk:
        monkeypatch.setattr(kcuda, "DEQUANT_CHUNK", chunk)
    for group, act_order in [(32, False), (64, True), (256, False)]:
        w = random_packed(96, 256, 8, group, act_order, bias=True, seed=group)
        x = torch.randn(4, 256)
        ref = x @ dequantize(w).t() + w.bias
        y = kcuda.Int8Linear(w, torch.float32, "cpu")(x)
        assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4)
    w = random_packed(96, 256, 8, 256, False, bias=False)
    w.qzeros = pack_cols(torch.full((1, 96), 128, dtype=torch.int32), 8)  # symmetric per-channel
    mod = kcuda.Int8Linear(w, torch.bfloat16, "cpu")
    assert mod.per_channel
    x = torch.randn(4, 256)
    ref = x @ dequantize(w).t()
    assert ((mod(x.bfloat16()).float() - ref).norm() / ref.norm()) < 1e-2
    mod.prompt_rows = 2  # as on CUDA (16 there): more rows than that dequantize slices instead of int8pack_mm
    assert ((mod(x.bfloat16()).float() - ref).norm() / ref.norm()) < 1e-2
    assert torch.equal(mod(x[:2].bfloat16()), torch.ops.aten._weight_int8pack_mm(x[:2].bfloat16(), mod.q, mod.s.view(-1)))


def test_mps_dispatch_on_cpu():
    from lowvram.kernels import mps

    assert mps.kind(random_packed(64, 256, 4, 64, True, False)) == "int4"
    assert mps.kind(random_packed(64, 256, 8, 32, True, False)) == "int8"
    odd = random_packed(64, 96, 4, 32, False, False)
    odd.group_size = 48  # not a size the MPS int4 kernel takes
    assert mps.kind(odd) == "dequant"


def _tinygemm_weight(u8, sz, group):
    """What tinygemm (and torch's MPS int4 kernel) computes from its operands, written from the format:
    W[n, k] = (nibble - 8) * scale[k // group, n] + zero[k // group, n], the even column in the high nibble."""
    n = u8.shape[0]
    q = torch.stack([(u8 >> 4).int(), (u8 & 15).int()], -1).view(n, -1)
    s, z = sz[..., 0].float(), sz[..., 1].float()  # [K/group, N]
    return (q - 8).float() * s.repeat_interleave(group, 0).t() + z.repeat_interleave(group, 0).t()


@pytest.mark.parametrize("k,group,act_order", [(256, 64, True), (256, 32, False), (13696, 128, False),
                                               (512, 512, False), (384, 128, True)])
def test_tinygemm_operands_reproduce_the_weight(k, group, act_order):
    """tinygemm's operands as the CUDA and MPS backends build them give back the checkpoint's weight: act-order,
    GLM's 13696-wide down projection (107 groups of 128), a per-row scale (THUDM int4, group -1) spread over
    groups of 128."""
    w = random_packed(64, k, 4, group, act_order, False, seed=k)
    g = kcuda.tinygemm_group(w)
    assert g == (128 if group == k else group)
    u8, sz, perm = kcuda.tinygemm_operands(w, g, torch.float32)
    ref = dequantize(w)
    if perm is not None:
        ref = ref[:, perm]
    assert sz.shape == (k // g, 64, 2)
    assert torch.allclose(_tinygemm_weight(u8, sz, g), ref, atol=1e-5)
    # MPS builds scales and zeros in fp16 straight from fp32; through bf16 they were ~8x less precise
    err16 = (_tinygemm_weight(*kcuda.tinygemm_operands(w, g, torch.float16)[:2], g) - ref).abs().max()
    errbf = (_tinygemm_weight(*kcuda.tinygemm_operands(w, g, torch.bfloat16)[:2], g) - ref).abs().max()
    assert err16 < errbf / 2, (err16, errbf)


def test_tinygemm_refuses_what_it_cannot_run():
    """Shapes torch's int4pack kernels do not take go to the int8 or dequantize paths instead of failing there."""
    assert kcuda.tinygemm_group(random_packed(64, 13696, 4, 256, False, False, seed=1)) is None  # 53.5 groups
    assert kcuda.tinygemm_group(random_packed(64, 192, 4, 64, False, False)) is None  # K not whole 128-tiles
    assert kcuda.tinygemm_group(random_packed(64, 256, 8, 64, False, False)) is None  # 8 bits
    w = random_packed(64, 256, 4, 64, True, False)
    w.g_idx = torch.cat([torch.zeros(96), torch.ones(32), torch.full((128,), 2), torch.full((0,), 3)]).int()
    assert kcuda.tinygemm_group(w) is None  # act-order groups of unequal size
    from lowvram.kernels import mps

    assert mps.kind(w) == "dequant"


def _greedy_tensor_slot(m, ids, steps):
    """Greedy decode through the tensor-slot path a CUDA graph captures (fixed shapes, masked cache)."""
    caches = m.new_cache(len(ids) + steps)
    h = m.forward(ids, 0, len(ids), caches)[-1:]
    out = []
    for _ in range(steps):
        nxt = int(m.net.head(h).argmax())
        out.append(nxt)
        ids = ids + [nxt]
        n = len(ids) - 1
        h = m.net.hidden(torch.tensor([[nxt]]), m.positions(ids, n, 1), caches, torch.tensor([n]))[0]
    return out


@pytest.mark.parametrize("name", ["chatglm3-6b", "glm-4-9b-chat", "chatglm-6b"])
def test_tensor_slot_decode_equals_eager(name, tiny):
    """The graph-capturable decode path gives the same greedy tokens as the normal one (run on CPU)."""
    m = lowvram.load(tiny(name), dtype="float32", tokenizer=False)
    ids = [5, 6, 7, 8, 9, 10, 11] if name != "chatglm-6b" else [5, 6, 7, m.config.gmask_token_id, m.config.sop_token_id]
    assert _greedy_tensor_slot(m, list(ids), 6) == m.generate(list(ids), max_new_tokens=6, stop_token_ids=[])


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
def test_cuda_model_and_graph(tiny, tmp_path):
    """A 4-bit model on the GPU (tinygemm) matches the fp32 reference; graph replay equals eager decode."""
    from lowvram.bench import graphed_step

    src = tiny("chatglm3-6b", hidden_size=1024, kv_channels=64, ffn_hidden_size=2048)
    out = tmp_path / "q"
    quantize(src, out, bits=4, group_size=128, progress=False)
    ids = list(range(3, 20))
    ref = lowvram.load(out, dtype="float32").logits(ids)
    m = lowvram.load(out, device="cuda")
    assert type(m.net.layers[0].mlp.up).__name__ == "TinyGemmLinear"
    err = ((m.logits(ids) - ref).norm() / ref.norm()).item()
    assert err < 0.05, err
    caches = m.new_cache(len(ids) + 8)
    h = m.forward(ids, 0, len(ids), caches)[-1:]
    eager = m.generate(list(ids), max_new_tokens=6, stop_token_ids=[])
    step = graphed_step(m, caches, len(ids))
    seq, got = list(ids), []
    nxt = int(m.net.head(h).argmax())
    for _ in range(6):
        got.append(nxt)
        seq.append(nxt)
        nxt = step(seq)
    assert got == eager


@pytest.mark.parametrize("name,over", [("chatglm3-6b", {}), ("glm-4-9b-chat", {}), ("chatglm-6b", {}),
                                       ("chatglm3-6b", {"pre_seq_len": 4})], ids=["chatglm3", "glm4", "chatglm", "ptuning"])
def test_int8_kv_cache(name, over, tiny):
    """The int8 KV cache (one scale per head and slot) stays close to the float cache, prefill and decode."""
    m = lowvram.load(tiny(name, **over), dtype="float32", tokenizer=False)
    ids = list(range(5, 40)) if name != "chatglm-6b" else list(range(5, 40)) + [m.config.gmask_token_id, m.config.sop_token_id]
    ref = m.logits(ids)
    m.kv_int8 = True
    caches = m.new_cache(len(ids) + 4)
    assert caches[0].q[0].dtype == torch.int8
    got = m.logits(ids)
    assert ((got - ref).norm() / ref.norm()) < 0.02
    h = m.forward(ids, 0, len(ids) - 1, caches)  # cached prefill, then one decode step through the int8 cache
    last = m.net.head(m.forward(ids, len(ids) - 1, 1, caches)).float()
    assert ((last[0] - ref[-1]).norm() / ref[-1].norm()) < 0.02
    assert h.shape[0] == len(ids) - 1


def test_int8_rows_is_symmetric_per_row_rtn():
    from lowvram.quantized import int8_rows

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 256, generator=g) * torch.rand(300, 1, generator=g)  # rows of different ranges; 300: slices
    # of 128 rows below
    w[7] = 0  # a padded vocabulary row
    w[20:40] *= torch.logspace(-2, -7, 20)[:, None]  # rows whose steps fall among fp16's subnormals (< 2**-14)
    p = int8_rows(w.bfloat16(), rows=128)
    assert torch.equal(dequantize(p)[7], torch.zeros(256))
    assert p.bits == 8 and p.group_size == 256 and p.scales.shape == (1, 300)
    d = dequantize(p)
    step = p.scales.float().view(-1, 1)
    # round to nearest on each row's grid, tiny rows too (their maxima had clamped at code 127, a step away); the
    # slack is fp32's rounding of the division and of the comparison, not a tolerance of the quantizer
    assert ((d - w.bfloat16().float()).abs() <= step * (0.5 + 1e-4)).all()
    q = (d / step).round().abs().amax(1)
    normal = (step.view(-1) >= 2**-14) & (torch.arange(300) != 7)  # fp16's subnormal steps are too coarse to
    # reach 127 on rows of ~1e-9
    assert (q[normal] == 127).all()  # max -> 127


@pytest.mark.parametrize("env", [None, "0"])
def test_float_head_of_a_quantized_checkpoint_runs_int8_on_the_native_kernel(tiny, tmp_path, monkeypatch, env):
    """`lowvram quantize` leaves the output layer float unless asked: on the CPU's fast path it becomes int8 per row
    at load (the largest matrix a decode step reads), LOWVRAM_QUANTIZE_HEAD=0 keeps it; float32 stays exact. Where
    the kernel runs only its portable path (ARM), the default backend is another and the head stays float."""
    _need("native")
    src = tiny("chatglm3-6b", hidden_size=128, kv_channels=32, ffn_hidden_size=256, padded_vocab_size=512)
    out = tmp_path / "q"
    quantize(src, out, bits=4, group_size=32, progress=False)
    if env is not None:
        monkeypatch.setenv("LOWVRAM_QUANTIZE_HEAD", env)
    ids = list(range(3, 20))
    exact = lowvram.load(out, dtype="float32")
    assert type(exact.net.output) is torch.nn.Linear
    fast = lowvram.load(out)
    head = fast.net.output
    if env == "0" or not native.fast():  # off, or a CPU whose default backend is not the native kernel
        assert type(head) is torch.nn.Linear
    else:
        assert isinstance(head, native.NativeLinear) and head.bits == 8
    ref = exact.logits(ids)
    err = ((fast.logits(ids) - ref).norm() / ref.norm()).item()
    assert err < 0.05, err
