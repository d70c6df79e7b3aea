"""Every backend's quantized linear against the dequantized fp32 reference, and through a whole model."""

import json
import subprocess
import sys

import pytest
import torch

import lowvram
from lowvram.converters.quantize import quantize
from lowvram.kernels import PackedWeight, default_backend, dequantize, make_linear, pack_cols, pack_rows
from lowvram.kernels import cuda as kcuda


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


CPU_BACKENDS = [("torch", torch.float32, 1e-6), ("ort", torch.float32, 2e-2), ("ort", torch.bfloat16, 3e-2),
                ("cpu", torch.bfloat16, 3e-2)]


@pytest.mark.parametrize("backend,dtype,tol", CPU_BACKENDS, ids=lambda x: str(x))
@pytest.mark.parametrize("bits,group", [(4, 32), (4, 64), (4, 128), (8, 32), (8, 128), (8, 256)])
@pytest.mark.parametrize("act_order", [False, True])
def test_linear_matches_dequantized_reference(backend, dtype, tol, bits, group, act_order):
    k = 256
    if backend == "cpu" and bits == 8 and group != k:
        pytest.skip("torch int8pack is per-channel only (group = in_features); ort covers grouped int8")
    w = random_packed(96, k, bits, group, act_order, bias=True, seed=bits + group)
    x = torch.randn(5, k)
    ref = x @ dequantize(w).t() + w.bias
    y = make_linear(w, backend, dtype)(x.to(dtype)).float()
    err = ((y - ref).norm() / ref.norm()).item()
    assert err < tol, err


def test_default_backend_and_errors(monkeypatch):
    assert default_backend("cpu", torch.float32) == "torch"
    assert default_backend("cpu", torch.bfloat16) == "ort"
    assert default_backend("cuda", torch.float16) == "cuda"
    monkeypatch.setenv("LOWVRAM_BACKEND", "cpu")
    assert default_backend("cpu", torch.bfloat16) == "cpu"
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


@pytest.mark.parametrize("backend", ["ort", "cpu"])
def test_model_through_fast_backends(backend, tiny, tmp_path):
    src = tiny("chatglm3-6b", hidden_size=128, kv_channels=32, ffn_hidden_size=256)
    out = tmp_path / "q"
    quantize(src, out, bits=4, group_size=32, progress=False)
    ids = list(range(3, 20))
    ref = lowvram.load(out, dtype="float32").logits(ids)
    fast = lowvram.load(out, backend=backend)  # bf16 activations (int8 inside ORT)
    assert type(fast.net.layers[0].mlp.up).__module__.endswith(backend)
    err = ((fast.logits(ids) - ref).norm() / ref.norm()).item()
    assert err < 0.05, err


def test_bench_console_script(tiny, tmp_path):
    out = tmp_path / "q"
    quantize(tiny("glm-4-9b-chat"), out, bits=4, group_size=32, progress=False)
    r = subprocess.run([sys.executable, "-m", "lowvram.cli", "bench", str(out), "--prompt-len", "8",
                        "--decode-steps", "3", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["prefill_tok_s"] > 0 and d["decode_ms_median"] > 0 and d["decode_steps"] == 3
    assert d["peak_rss_bytes"] >= d["peak_rss_after_load_bytes"] > 0
