"""`lowvram quantize` end to end on tiny checkpoints in the original layouts."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import lowvram
from lowvram.converters.quantize import quantize
from lowvram.kernels.torch_ref import DequantLinear

CLI = [sys.executable, "-m", "lowvram.cli"]


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("gen", ["chatglm3-6b", "glm-4-9b-chat-hf", "chatglm-6b", "glm-4-0414"])
def test_rtn_outputs_load_generate_and_stay_packed(gen, tiny, tmp_path):
    src = tiny(gen)
    ids = [5, 7, 151, 152, 9] if gen == "chatglm-6b" else [5, 7, 9, 11, 13]
    ref = lowvram.load(src, dtype="float32").logits(ids)
    for bits in (8, 4):
        out = tmp_path / f"{gen}-{bits}"
        s = quantize(src, out, bits=bits, group_size=32, progress=False)
        assert s["quantized_linears"] > 0
        cfg = json.loads((out / "config.json").read_text())
        qc = json.loads((out / "quantize_config.json").read_text())
        assert cfg["quantization_config"]["checkpoint_format"] == qc["checkpoint_format"] == "gptq"
        assert qc["bits"] == bits and qc["quant_method"] == "gptq" and "lowvram" in qc
        m = lowvram.load(out, dtype="float32")
        lin = m.net.layers[0].mlp.up
        assert isinstance(lin, DequantLinear)
        packed = lin.w.qweight.numel() * 4
        assert packed == lin.in_features * lin.out_features * bits // 8  # storage stays packed
        err = rel(m.logits(ids), ref)
        assert err < (0.05 if bits == 8 else 0.6), err
        assert len(m.generate(ids, max_new_tokens=4, stop_token_ids=[])) == 4


def test_glm_layout_keeps_original_names(tiny, tmp_path):
    out = tmp_path / "q"
    quantize(tiny("glm-4-9b-chat-hf"), out, bits=4, group_size=32, progress=False)
    from lowvram.checkpoint import Checkpoint

    names = Checkpoint(out).names()
    for part in ("q_proj", "k_proj", "v_proj"):
        assert f"model.layers.0.self_attn.{part}.qweight" in names
        assert f"model.layers.0.self_attn.{part}.bias" in names
    assert "model.embed_tokens.weight" in names and not any("embed_tokens.q" in n for n in names)


def test_gptq_beats_rtn_and_fuses_act_order_qkv(tiny, tmp_path):
    src = tiny("glm-4-9b-chat-hf", seed=5)
    model = lowvram.load(src, dtype="float32")
    ids = model.generate([3], max_new_tokens=40, do_sample=True, seed=1, stop_token_ids=[])
    ref = model.logits(ids)
    errs = {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        kw = dict(act_order=True, calib_samples=8, calib_seq_len=48) if method == "gptq" else {}
        quantize(src, out, bits=4, method=method, group_size=32, progress=False, **kw)
        errs[method] = rel(lowvram.load(out, dtype="float32").logits(ids), ref)
    assert errs["gptq"] < errs["rtn"], errs
    g = lowvram.load(tmp_path / "gptq", dtype="float32").net.layers[0].attn.qkv.w
    assert g.has_act_order()


def test_gptq_calibrates_on_pre_tokenized_jsonl(tiny, tmp_path):
    """A jsonl of input_ids needs no tokenizer (the random source here has none); the ids used are the file's."""
    import json

    from lowvram.converters.quantize import _calibration_ids
    from lowvram.config import load_config

    src = tiny("chatglm3-6b", seed=2)
    calib = tmp_path / "ids.jsonl"
    rows = [list(range(5 + i, 45 + i)) for i in range(3)] + [[1, 2]]  # the short row is skipped
    calib.write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    seqs, what = _calibration_ids(src, load_config(src), str(calib), 2, 32, 0, "cpu")
    assert seqs == [rows[0][:32], rows[1][:32]] and what == {"samples": 2, "seq_len": 32, "data": "ids.jsonl"}
    out = tmp_path / "q"
    quantize(src, out, bits=4, method="gptq", group_size=32, calib=str(calib), calib_samples=3, calib_seq_len=32,
             progress=False)
    assert lowvram.load(out).generate([5, 6, 7], max_new_tokens=3)
    calib.write_text(json.dumps({"input_ids": [10**9] * 40}) + "\n")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _calibration_ids(src, load_config(src), str(calib), 1, 32, 0, "cpu")
    # the tiny model's widths do not split into groups of 128: one clear error before any work
    with pytest.raises(ValueError, match="--group-size 128 does not divide hidden_size"):
        quantize(src, tmp_path / "g128", bits=4, method="gptq", calib=str(calib), progress=False)
    assert not (tmp_path / "g128").exists()


@pytest.mark.parametrize("calib_model", ["source", "int8", "auto-short-of-memory"])
def test_self_generated_calibration(calib_model, tiny, tmp_path, monkeypatch):
    """Without --calib the text is sampled in batches, by the source model or (when it would not fit in
    free memory, or when asked) by an INT8 RTN copy written inside the output's temporary directory and
    removed after sampling; the output's metadata and model card say which."""
    from lowvram.config import load_config
    from lowvram.converters import quantize as q

    src = tiny("glm-4-9b-chat", seed=3)
    cfg = load_config(src)
    if calib_model.startswith("auto"):  # a machine with 1 MiB free: the source cannot be the sampler
        monkeypatch.setattr("lowvram.placement.detect_budgets", lambda: {"cpu": 1 << 20})
    monkeypatch.setattr(q, "SAMPLING_KV_BYTES", 2 * cfg.num_layers * 2 * cfg.kv_size * 2 * 24)  # 2 rows a batch
    mode = calib_model.split("-")[0]
    work = tmp_path / "work"
    work.mkdir()
    seqs, what = q._calibration_ids(src, cfg, None, 5, 24, 4, "cpu", mode, work, False)
    sampler = "source" if calib_model == "source" else "int8"
    assert what == {"samples": 5, "seq_len": 24, "data": "self-generated", "sampler": sampler, "batch": 2}
    assert list(work.iterdir()) == []  # the int8 copy is gone
    # the same sequences from the sampler model built by hand, in the same batches of 2 with seeds 4 + row
    if sampler == "int8":
        quantize(src, tmp_path / "i8", bits=8, group_size=-1, quantize_head=True, progress=False)
        model = lowvram.load(tmp_path / "i8", tokenizer=False)
    else:
        model = lowvram.load(src, tokenizer=False)
    firsts = [int(torch.randint(0, cfg.vocab_size, (1,), generator=torch.Generator().manual_seed(4 + s))) for s in range(5)]
    want = []
    for b in range(0, 5, 2):
        rows = [[f] for f in firsts[b : b + 2]]
        new = model.generate_batch(rows, max_new_tokens=23, do_sample=True, top_k=50, seed=4 + b, stop_token_ids=[])
        want += [r + n for r, n in zip(rows, new)]
    assert seqs == want and all(len(x) == 24 for x in seqs) and len({tuple(x) for x in seqs}) == 5

    out = tmp_path / "gptq"
    summary = quantize(src, out, bits=4, method="gptq", group_size=32, calib_samples=3, calib_seq_len=16,
                       progress=False, calib_model=mode)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["lowvram"]["calibration"]["sampler"] == summary["calibration"]["sampler"] == sampler
    assert ("INT8 round-to-nearest copy" in (out / "README.md").read_text()) == (sampler == "int8")
    assert not (out / "int8-sampler").exists() and lowvram.load(out).generate([5, 6, 7], max_new_tokens=3)


def test_existing_output_needs_force_and_bad_source_fails_first(tiny, tmp_path):
    src = tiny("chatglm3-6b", shards=2)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = subprocess.run(CLI + ["quantize", str(src), "-o", str(out)], capture_output=True, text=True)
    assert r.returncode != 0 and "exists" in r.stderr and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    shard = next(src.glob("model-00001-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])
    r = subprocess.run(CLI + ["quantize", str(src), "-o", str(tmp_path / "x")], capture_output=True, text=True)
    assert r.returncode != 0 and shard.name in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_a_signal_leaves_nothing_and_rerun_works(sig, tiny, tmp_path):
    """Ctrl-C and SIGTERM unwind and remove the temporary output; after SIGKILL (or the OOM killer) the next run
    removes it, since its writer is gone."""
    src = tiny("chatglm3-6b", num_layers=6, hidden_size=256, ffn_hidden_size=768, kv_channels=64, shards=6)
    out = tmp_path / "q"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # SIGINT at its default in the child even when this test run was started in the background (which
    # leaves SIGINT ignored, and Python then raises no KeyboardInterrupt)
    p = subprocess.Popen(CLI + ["quantize", str(src), "-o", str(out), "--method", "gptq", "--calib-samples", "64",
                                "--calib-seq-len", "64"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".q.tmp-*")):
        time.sleep(0.05)
    assert list(tmp_path.glob(".q.tmp-*")), "quantize never started writing"
    p.send_signal(sig)
    try:
        _, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode != 0, err
    assert not out.exists() and bool(list(tmp_path.glob(".q.tmp-*"))) == (sig == signal.SIGKILL)
    r = subprocess.run(CLI + ["quantize", str(src), "-o", str(out), "--bits", "8"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob(".q.tmp-*"))
    assert "wrote" in r.stdout and lowvram.load(out, dtype="float32").generate([1, 2], max_new_tokens=2, stop_token_ids=[])


def test_unknown_name_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    r = subprocess.run(CLI + ["quantize", "no-such-model-xyz"], capture_output=True, text=True)
    assert r.returncode != 0 and "known model name" in r.stderr


def test_model_names_resolve_to_the_local_caches(tmp_path, monkeypatch):
    from lowvram.converters.hub import resolve

    hf, ms = tmp_path / "hf", tmp_path / "ms"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(ms))
    snap = hf / "models--zai-org--chatglm3-6b" / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    assert resolve("chatglm3-6b") == snap
    mdir = ms / "ZhipuAI" / "glm-4-9b-chat"
    mdir.mkdir(parents=True)
    (mdir / "config.json").write_text("{}")
    assert resolve("glm-4-9b-chat") == mdir


def _example():
    from conftest import need_example

    ex = need_example()
    ref_model = lowvram.load(ex, dtype="float32")
    ids = ref_model.tokenizer.encode((ex.parent / "corpus" / "heldout.txt").read_text()[:600])
    return ex, ids, ref_model.logits(ids)


def test_int8_per_channel_within_one_percent_on_the_trained_example(tmp_path):
    ex, ids, ref = _example()
    errs = {}
    for sym in (True, False):
        for mse in (False, True):
            out = tmp_path / f"int8-{sym}-{mse}"
            quantize(ex, out, bits=8, group_size=-1, sym=sym, progress=False, mse=mse)
            errs[sym, mse] = rel(lowvram.load(out, dtype="float32").logits(ids), ref)
    # Measured (torch 2.13, CPU), relative L2 over all logits of these 195 tokens: 1.029% symmetric,
    # 0.935% asymmetric (the default, no clipping search at 8 bits); with the MSE clipping search forced
    # on, 1.033% and 0.938%. Symmetric misses issue 4's 1% by 0.03 points and no per-row scale choice
    # can close that: the rows are near-Gaussian (kurtosis 2.9, max/std ~3 over 256 columns) and at
    # 8 bits the MSE-optimal clip for a Gaussian (~4 sigma) lies beyond the row's largest weight, so
    # the search keeps the full range (median weight error 0.701% -> 0.695%) and the logits move by
    # noise. The error is spread evenly over the 16 linears (each type alone: 0.4-0.55%, adding in
    # quadrature), i.e. it is the int8 step itself (error = step^2/12). Calibrated GPTQ int8
    # per-channel reaches 0.84% / 0.78%.
    assert errs[False, False] < 0.0095 and errs[True, False] < 0.0105, errs
    assert abs(errs[True, True] - errs[True, False]) < 0.0005 and abs(errs[False, True] - errs[False, False]) < 0.0005


def test_mse_clip_search_is_the_int4_default_and_lowers_the_error(tmp_path):
    ex, ids, ref = _example()
    errs = {}
    for mse in (None, False):
        out = tmp_path / f"int4-{mse}"
        s = quantize(ex, out, bits=4, group_size=128, progress=False, mse=mse)
        qc = json.loads((out / "quantize_config.json").read_text())
        assert s["mse"] == (mse is None) and qc["lowvram"]["clip_search"] == ("mse" if mse is None else "none")
        assert ("lowest squared" in (out / "README.md").read_text()) == (mse is None)
        errs[mse] = rel(lowvram.load(out, dtype="float32").logits(ids), ref)
    # measured 14.27% with the search (the default) vs 16.07% without (held-out perplexity: BENCHMARKS.md)
    assert errs[None] < 0.145 and errs[False] > 0.158, errs


@pytest.mark.parametrize("gen,sym_bound,asym_bound", [
    ("chatglm-6b", 0.0016, 0.0014),
    ("chatglm2-6b", 0.0137, 0.0111),
    ("chatglm3-6b", 0.0137, 0.0111),
    ("glm-4-9b-chat", 0.0137, 0.0111),
    ("glm-4-9b-chat-hf", 0.0137, 0.0111),
    ("glm-4-0414", 0.0176, 0.0152),
])
def test_int8_per_channel_on_random_tiny_models(gen, sym_bound, asym_bound, tiny, tmp_path):
    """Per-channel INT8 RTN on the random tiny checkpoints (converters/synthetic.py, seed 0).

    Measured (sym / asym): chatglm-6b 0.151% / 0.128%, chatglm2-6b, chatglm3-6b, glm-4-9b-chat and
    glm-4-9b-chat-hf 1.35% / 1.09-1.10%, glm-4-0414 1.74% / 1.51%; seeds 1 and 2 land within
    0.4 points of these. The quantizer is not worse on them (median weight error 0.61% / 0.54%, below
    the trained example's 0.70% / 0.65%, since 64-wide rows have a smaller max/std): the random
    networks are more sensitive. Gaussian noise of 0.6% of each block linear's norm, instead of
    rounding, moves their logits by 1.45% (glm-4-0414: 1.92%) against 0.87% on the trained example
    and 0.15% on random chatglm-6b. Likely causes: glm-4-0414's extra post-sublayer norms add every
    sublayer output at unit scale; chatglm-6b's DeepNorm residual (sqrt(56)·LN(x) + f(LN(x))) keeps
    the unquantized normalised stream dominant. The bounds are the measured figures plus 1-6%
    (the clipping search, off at 8 bits, would not change them beyond noise either).
    """
    src = tiny(gen)
    ids = [5, 7, 151, 152, 9] if gen == "chatglm-6b" else [5, 7, 9, 11, 13]
    ref = lowvram.load(src, dtype="float32").logits(ids)
    for sym, bound in ((True, sym_bound), (False, asym_bound)):
        out = tmp_path / f"q-{sym}"
        quantize(src, out, bits=8, group_size=-1, sym=sym, progress=False)
        err = rel(lowvram.load(out, dtype="float32").logits(ids), ref)
        assert err < bound, (sym, err)


@pytest.mark.parametrize("fname", ["glm_model.data", "glm_ptuning_v2_model.data", "glm2_model.data", "glm3_model.data",
                                   "glm3_ptuning_v2_model.data", "glm4_model.data"])
def test_int8_per_channel_on_the_reference_tiny_models(fname, tmp_path):
    """The tiny models the original code's test vectors come from (chatglm.cpp tests/data, 32-wide, one block):
    INT8 per-channel RTN keeps their logits within issue 4's 1%, symmetric and asymmetric. Measured 0.10-0.58%
    (ChatGLM2/3/4's output layer is not in those files: a seeded random one, kept in fp16 by the quantizer)."""
    from conftest import need_reference
    from lowvram.converters.synthetic import write_checkpoint
    from test_reference import CASES

    torch.manual_seed(0)
    config, sd, steps = CASES[fname](need_reference("chatglm_cpp") / fname)
    src = write_checkpoint(tmp_path / "src", config, sd)
    ids = [i for x, _ in steps for i in x]  # the prefill and both decode tokens, as one sequence
    ref = lowvram.load(src, dtype="float32").logits(ids)
    for sym in (True, False):
        out = tmp_path / f"q-{sym}"
        quantize(src, out, bits=8, group_size=-1, sym=sym, progress=False)
        err = rel(lowvram.load(out, dtype="float32").logits(ids), ref)
        assert 1e-4 < err < 0.01, (sym, err)  # above zero: the blocks really went through int8


def test_cli_mse_flags(tiny, tmp_path):
    src = tiny("chatglm3-6b")
    for flags, want in (([], "mse"), (["--no-mse"], "none"), (["--bits", "8"], "none"), (["--bits", "8", "--mse"], "mse")):
        out = tmp_path / "-".join(["q", *flags])
        r = subprocess.run(CLI + ["quantize", str(src), "-o", str(out), "--group-size", "32", *flags],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "quantize_config.json").read_text())["lowvram"]["clip_search"] == want, flags


@pytest.mark.parametrize("act_order,group", [(False, 32), (True, 32), (False, -1)])
def test_gptq_matrix_level(act_order, group):
    """One matrix: the dequantized weight GPTQ returns is what its packed tensors say; it lowers the output
    error on its calibration inputs below RTN's; consuming the Hessian changes nothing but memory;
    a dead input (always zero) gets a zero weight column."""
    from lowvram.converters.gptq import Hessian, gptq, rtn
    from lowvram.kernels import dequantize
    from lowvram.quantized import from_gptq

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=g)
    x = torch.randn(256, 128, generator=g) @ torch.randn(128, 128, generator=g) * 0.2  # correlated inputs
    x[:, 5] = 0
    h = Hessian(128)
    h.add(x)
    keep = h.H.clone()
    tensors, deq = gptq(w, h.H, 4, group, act_order=act_order)
    assert torch.equal(h.H, keep)  # not consumed: the caller's Hessian is untouched
    assert torch.equal(deq, dequantize(from_gptq(tensors, 1, 128)))
    assert torch.count_nonzero(deq[:, 5]) == 0
    t2, d2 = gptq(w, h.H.clone(), 4, group, act_order=act_order, consume_h=True)
    assert torch.equal(d2, deq) and all(torch.equal(t2[k], tensors[k]) for k in tensors)
    _, d_rtn = rtn(w, 4, group)
    err = lambda d: ((x @ (d - w).t()).norm() / (x @ w.t()).norm()).item()  # noqa: E731
    assert err(deq) < 0.8 * err(d_rtn), (err(deq), err(d_rtn))
    with pytest.raises(ValueError, match="not positive definite"):
        gptq(w, -torch.eye(128), 4, group)


@pytest.mark.parametrize("k", [600, 601])
def test_gptq_inverse_cholesky_factor(k):
    """GPTQ's upper Cholesky factor of H^-1, from one Cholesky of the flipped H and a blocked triangular
    inverse, in H's own storage: equal to the float64 factor computed the textbook way (Cholesky,
    inverse, Cholesky) to fp32 accuracy, at an even and an odd size that both recurse past the leaf size."""
    from lowvram.converters.gptq import _inverse_cholesky_

    g = torch.Generator().manual_seed(k)
    x = torch.randn(k, k // 2 + 40, generator=g, dtype=torch.float64)
    h = x @ x.t() / x.shape[1]
    h.diagonal().add_(0.01 * h.diagonal().mean())
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    h32 = h.float()
    u = _inverse_cholesky_(h32)
    assert u.data_ptr() == h32.data_ptr()
    assert torch.count_nonzero(u.tril(-1)) == 0
    assert ((u.double() - ref).norm() / ref.norm()).item() < 1e-4
    assert _inverse_cholesky_(-torch.eye(k)) is None


def test_gptq_of_a_p_tuning_checkpoint_fails_first(tiny, tmp_path):
    src = tiny("chatglm3-6b", pre_seq_len=4)
    with pytest.raises(ValueError, match="P-tuning v2 checkpoints is not supported; use --method rtn"):
        quantize(src, tmp_path / "q", bits=4, method="gptq", group_size=32, progress=False)
    assert not (tmp_path / "q").exists()
    with pytest.raises(ValueError, match="--calib-model must be auto, source or int8"):
        quantize(src, tmp_path / "q", calib_model="fp8")


def test_the_sampler_choice_follows_free_memory(tiny):
    """auto samples with the source when its predicted peak fits in 90% of the free memory, else INT8:
    on the CPU from the checkpoint's own tensors, on a GPU from the memory model (no GPU needed to check)."""
    from lowvram.config import load_config, parse_config
    from lowvram.converters.quantize import _source_fits
    from lowvram.known import known_config
    from lowvram.memory import predict_rss

    src = tiny("glm-4-9b-chat")
    cfg = load_config(src)
    need = predict_rss(src, prompt_len=32 * 128, new_tokens=0, cfg=cfg).peak
    assert _source_fits(src, cfg, 32, 128, "cpu", {"cpu": int(need / 0.89)})
    assert not _source_fits(src, cfg, 32, 128, "cpu", {"cpu": int(need / 0.91)})
    c3 = parse_config(known_config("chatglm3-6b"))  # 12.5 GB of bf16 weights
    assert not _source_fits(None, c3, 32, 128, "cuda", {"cuda:0": 8 << 30, "cpu": 64 << 30})
    assert _source_fits(None, c3, 32, 128, "cuda", {"cuda:0": 16 << 30})
    assert not _source_fits(None, c3, 32, 128, "mps", {"mps": 12 << 30})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPTQ on the GPU runs only where one is present")
def test_gptq_on_cuda(tiny, tmp_path):
    """GPTQ with --device cuda: the same algorithm as on the CPU (float rounding apart), so its output is about
    as close to fp32 as the CPU's and closer than RTN; the default calibration samples on the GPU too."""
    src = tiny("glm-4-9b-chat-hf", seed=5)
    model = lowvram.load(src, dtype="float32")
    ids = model.generate([3], max_new_tokens=40, do_sample=True, seed=1, stop_token_ids=[])
    ref = model.logits(ids)
    calib = tmp_path / "ids.jsonl"
    calib.write_text("".join(json.dumps({"input_ids": list(range(5 + i, 53 + i))}) + "\n" for i in range(8)))
    errs = {}
    for method, device in (("rtn", "cpu"), ("gptq", "cpu"), ("gptq", "cuda")):
        out = tmp_path / f"{method}-{device}"
        quantize(src, out, bits=4, method=method, group_size=32, calib=str(calib), calib_samples=8, calib_seq_len=48,
                 device=device, progress=False)
        errs[method, device] = rel(lowvram.load(out, dtype="float32").logits(ids), ref)
    assert errs["gptq", "cuda"] < errs["rtn", "cpu"], errs
    assert abs(errs["gptq", "cuda"] - errs["gptq", "cpu"]) < 0.2 * errs["gptq", "cpu"], errs
    s = quantize(src, tmp_path / "self", bits=4, method="gptq", group_size=32, calib_samples=4, calib_seq_len=16,
                 device="cuda", progress=False)
    assert s["calibration"]["sampler"] == "source"


def test_output_layer_in_groups(tiny, tmp_path):
    """--quantize-head --head-bits 4 --head-group-size N: the output layer at 4 bits with one scale per N inputs
    (per-row 4-bit loses too much), in the standard fields (GPTQ's per-module `dynamic`), run by the native kernel
    on the fast path and equal to its dequantized weights on the exact one."""
    from lowvram.kernels import dequantize, native
    from lowvram.quantized import from_gptq

    src = tiny("chatglm3-6b", hidden_size=128, kv_channels=32, ffn_hidden_size=256, padded_vocab_size=512)
    out = tmp_path / "q"
    quantize(src, out, bits=4, group_size=32, quantize_head=True, head_bits=4, head_group_size=64, progress=False)
    qc = json.loads((out / "quantize_config.json").read_text())
    assert qc["dynamic"] == {r"+:transformer\.output_layer": {"bits": 4, "group_size": 64}}
    assert "output layer to 4 bits (groups of 64)" in (out / "README.md").read_text()
    from safetensors import safe_open

    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        head = {k: f.get_tensor(f"transformer.output_layer.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
    assert head["scales"].shape == (128 // 64, 512) and head["qweight"].shape == (128 * 4 // 32, 512)
    exact = lowvram.load(out, dtype="float32", tokenizer=False)
    w = dequantize(from_gptq(head, 1, 128))
    assert torch.equal(exact.net.output(torch.eye(128)).t(), w)  # the exact path: x @ W.T with W dequantized
    if native.available() is None and native.fast():
        fast = lowvram.load(out, tokenizer=False)
        assert isinstance(fast.net.output, native.NativeLinear) and (fast.net.output.bits, fast.net.output.group) == (4, 64)
        ids = list(range(3, 20))
        ref = exact.logits(ids)
        assert ((fast.logits(ids) - ref).norm() / ref.norm()) < 0.05
    with pytest.raises(ValueError, match="--head-group-size 48 does not divide hidden_size 128"):
        quantize(src, tmp_path / "bad", bits=4, quantize_head=True, head_bits=4, head_group_size=48, progress=False)
    assert not (tmp_path / "bad").exists()


def test_bad_output_and_options_fail_before_any_work(tiny, tmp_path):
    """-o that is (or holds) the source is refused even with --force, options RTN would ignore are refused,
    and every failure is one line that leaves no directory behind."""
    src = tiny("chatglm3-6b")
    before = sorted(p.name for p in src.iterdir())
    (tmp_path / "afile").write_text("x")
    cases = [(["-o", str(src), "--force"], "that is the source checkpoint"),
             (["-o", str(src.parent), "--force"], "it contains the source checkpoint"),
             (["-o", str(tmp_path / "afile"), "--force"], "a file, not a checkpoint directory"),
             (["-o", str(tmp_path / "afile" / "out")], "is a file, not a directory"),
             (["--group-size", "0"], "--group-size must be -1"),
             (["--act-order"], "--act-order applies to --method gptq only"),
             (["--calib", "x.txt", "--device", "mps"], "--calib, --device apply to --method gptq only"),
             (["--head-bits", "4"], "apply with --quantize-head only"),
             (["--method", "gptq", "--calib-samples", "0"], "--calib-samples and --calib-seq-len must be >= 1")]
    for args, msg in cases:
        if "-o" not in args:
            args = args + ["-o", str(tmp_path / "new" / "out")]
        if "--group-size" not in args:
            args = args + ["--group-size", "32"]  # the tiny model's widths are 64 and 96
        r = subprocess.run(CLI + ["quantize", str(src), *args], capture_output=True, text=True)
        assert r.returncode == 1 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert sorted(p.name for p in src.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p != src) == ["afile"], "nothing made, not even -o's parents"


def test_broken_sources_and_calibration_files_are_named(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    src = tiny("chatglm3-6b")
    f = next(src.glob("*.safetensors"))
    sd = load_file(f)
    name = "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"
    for label, change, msg in (("missing", lambda d: d.pop(name), f"missing 1: {name}"),
                               ("shape", lambda d: d.__setitem__(name, d[name][:-2]), f"wrong shape 1: {name}"),
                               ("nan", lambda d: d[name].__setitem__((3, 3), float("nan")),
                                f"tensor {name} has NaN or infinite values")):
        d = dict(sd)
        d[name] = d[name].clone()
        change(d)
        save_file(d, f)
        with pytest.raises(ValueError, match=msg):
            quantize(src, tmp_path / label, group_size=32, progress=False)
        assert not (tmp_path / label).exists()
    save_file(sd, f)
    calib = {"rows.jsonl": '{"text": "a b c"}\n[1, 2]\n', "json.jsonl": '{"text": "a"}\n{bad\n',
             "ids.jsonl": '{"input_ids": [1, 2.5]}\n', "mixed.jsonl": '{"text": "a"}\n{"input_ids": [1]}\n'}
    msgs = {"rows.jsonl": r"rows\.jsonl:2: expected \{\"text\"", "json.jsonl": r"json\.jsonl:2: not JSON",
            "ids.jsonl": r"ids\.jsonl:1: expected", "mixed.jsonl": "rows mix 'text' and 'input_ids'"}
    for fname, text in calib.items():
        (tmp_path / fname).write_text(text)
        with pytest.raises(ValueError, match=msgs[fname]):
            quantize(src, tmp_path / "c", method="gptq", calib=str(tmp_path / fname), group_size=32, progress=False)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 100)
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8 text"):
        quantize(src, tmp_path / "c", method="gptq", calib=str(tmp_path / "latin1.txt"), group_size=32, progress=False)
    with pytest.raises(ValueError, match="not a file"):
        quantize(src, tmp_path / "c", method="gptq", calib=str(tmp_path), group_size=32, progress=False)
    assert not (tmp_path / "c").exists()


def test_outputs_are_readable_by_others_and_name_their_source(tiny, tmp_path, monkeypatch):
    src = tiny("chatglm3-6b")
    monkeypatch.chdir(src)
    old = os.umask(0o022)
    try:
        r = subprocess.run(CLI + ["quantize", ".", "--group-size", "32"], capture_output=True, text=True)
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    out = src / f"{src.name}-int4-rtn"
    assert out.is_dir()
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in out.glob("*.safetensors"))
    assert json.loads((out / "quantize_config.json").read_text())["lowvram"]["source"] == src.name
    assert f"lowvram chat {src.name}-int4-rtn" in (out / "README.md").read_text()


def test_gptq_calibration_in_chunks_matches_one_pass(tiny, tmp_path, monkeypatch):
    """The block runs over the calibration samples a few at a time (bounded memory); the Hessians, and so the
    result, are those of one pass up to float summation order."""
    import lowvram.converters.quantize as q

    src = tiny("chatglm3-6b")
    kw = dict(method="gptq", group_size=32, calib_samples=6, calib_seq_len=32, progress=False)
    quantize(src, tmp_path / "one", **kw)
    monkeypatch.setattr(q, "CALIB_CHUNK_TOKENS", 64)  # two samples per chunk
    quantize(src, tmp_path / "chunked", **kw)
    a = lowvram.load(tmp_path / "one", dtype="float32").net.layers[1].mlp.down.w
    b = lowvram.load(tmp_path / "chunked", dtype="float32").net.layers[1].mlp.down.w
    from lowvram.kernels import dequantize

    wa, wb = dequantize(a), dequantize(b)
    assert (wa == wb).float().mean() > 0.99 and rel(wb, wa) < 1e-2


def test_chatglm6b_calibration_rows_keep_their_own_masks(tiny, monkeypatch):
    """GPTQ runs calibration rows together; ChatGLM-6B's bidirectional span ends at each row's own <sop>, so
    rows that differ get their own masks (all rows took the first row's), and each chunk of rows its slice."""
    from lowvram.converters.quantize import _calibration_mask, in_chunks

    m = lowvram.load(tiny("chatglm-6b"), dtype="float32", tokenizer=False)
    g, sop = m.config.gmask_token_id, m.config.sop_token_id
    rows = [[5, 6, g, sop, 7, 8], [5, g, sop, 6, 7, 8], [5, 6, 7, 8, 9, 10]]
    mask = _calibration_mask(m, rows, 6)
    assert mask.shape == (3, 1, 6, 6)
    for r, row in enumerate(rows):
        own = m._mask(row, 0, 6)
        assert torch.equal(mask[r, 0], own if own is not None else torch.ones(6, 6, dtype=torch.bool).tril())
    assert torch.equal(_calibration_mask(m, rows[:1] * 2, 6), m._mask(rows[0], 0, 6))  # rows that agree: one mask
    assert _calibration_mask(lowvram.load(tiny("chatglm3-6b"), dtype="float32", tokenizer=False), rows, 6) is None
    seen = []
    block = lambda x, rope, cache, start, mk: seen.append(mk) or x  # noqa: E731
    monkeypatch.setattr("lowvram.converters.quantize.CALIB_CHUNK_TOKENS", 12)  # two rows a chunk
    in_chunks(block, torch.zeros(3, 6, 4), (torch.zeros(3, 6),), mask, None)
    assert [s.shape[0] for s in seen] == [2, 1] and torch.equal(torch.cat(seen), mask)
