"""The GPTQ layout against an independent dequantizer written from the format description."""

import pytest
import torch

from lowvram.converters.gptq import rtn
from lowvram.kernels import PackedWeight, dequantize, pack_cols, pack_rows, unpack_cols, unpack_rows
from lowvram.quantized import from_gptq
from test_thudm import resident_block_bytes


def reference_dequant(qweight, qzeros, scales, g_idx, bits, v1):
    """Straight from GLM_FACTS §6, one element at a time: nothing shared with the runtime."""
    per = 32 // bits
    mask = (1 << bits) - 1
    K, N = qweight.shape[0] * per, qweight.shape[1]
    W = torch.zeros(N, K)
    qw, qz = qweight.tolist(), qzeros.tolist()
    for k in range(K):
        g = int(g_idx[k])
        for n in range(N):
            q = (qw[k // per][n] >> (bits * (k % per))) & mask
            z = (qz[g][n // per] >> (bits * (n % per))) & mask
            z = z + 1 if v1 else z
            W[n, k] = float(scales[g, n]) * (q - z)
    return W


def random_gptq(bits, K, N, group, act_order, gen):
    per = 32 // bits
    G = -(-K // group)  # a last, short group when `group` does not divide K (as AutoGPTQ writes it)
    q = torch.randint(0, 2**bits, (K, N), generator=gen)
    z = torch.randint(1, 2**bits - 1, (G, N), generator=gen)
    qweight = torch.zeros(K // per, N, dtype=torch.int64)
    for j in range(per):
        qweight |= q[j::per] << (bits * j)
    qzeros = torch.zeros(G, N // per, dtype=torch.int64)
    for j in range(per):
        qzeros |= z[:, j::per] << (bits * j)
    to32 = lambda t: torch.where(t >= 2**31, t - 2**32, t).to(torch.int32)  # noqa: E731
    g_idx = torch.arange(K) // group
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=gen)]
    scales = (torch.rand(G, N, generator=gen) * 0.1 + 0.01).half()
    return to32(qweight), to32(qzeros), scales, g_idx.to(torch.int32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v1", [True, False])
def test_gptq_reader_matches_reference(bits, act_order, v1):
    gen = torch.Generator().manual_seed(bits * 10 + act_order)
    qweight, qzeros, scales, g_idx = random_gptq(bits, 64, 16, 16, act_order, gen)
    ref = reference_dequant(qweight, qzeros, scales, g_idx, bits, v1)
    pw = from_gptq({"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}, 1 if v1 else 0, 64)
    assert pw.bits == bits and pw.group_size == 16 and pw.has_act_order() == act_order
    assert torch.allclose(dequantize(pw), ref, atol=1e-6)


@pytest.mark.parametrize("bits,group", [(4, 32), (4, -1), (8, 64)])
def test_rtn_writer_round_trips(bits, group):
    w = torch.randn(24, 128)
    tensors, deq = rtn(w, bits, group)
    ref = reference_dequant(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits, True)
    assert torch.allclose(ref, deq, atol=1e-5)
    step = (w.abs().amax() / (2 ** (bits - 1) - 1)).item()
    assert (deq - w).abs().max() <= step  # round-to-nearest: error within one step


@pytest.mark.parametrize("bits", [4, 8])
def test_rtn_keeps_small_groups_on_their_grid(bits):
    """Groups of small weights have steps below 2**-14, where fp16 is subnormal: rounded to the nearest fp16 the
    step shrank by up to a few percent and the group's largest weight clamped at the last code, up to a whole
    step off. Symmetric RTN stays within half a step of every weight, whatever the group's range, plus what
    rounding a normal step to fp16 (2**-11 of it) moves the last code: GPTQ's symmetric grid ends half a step
    short of the positive maximum."""
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(32, 256, generator=gen) * torch.logspace(0, -7, 32)[:, None]
    tensors, deq = rtn(w, bits, 32)
    s = tensors["scales"].float().repeat_interleave(32, 0).t()  # [N, K], each weight's step
    assert (tensors["scales"] > 0).all()
    assert ((deq - w).abs() <= s * (0.5 + 2 ** (bits - 1) * 2**-11 + 1e-4)).all()
    ref = reference_dequant(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits, True)
    assert torch.allclose(ref, deq, atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 32, False), (4, -1, True), (8, -1, True), (8, -1, False)])
def test_mse_clip_search_never_worse_and_same_format(bits, group, sym):
    """The clipping search only picks other scales/zeros: the GPTQ tensors still round-trip through the
    reference reader, and every group's squared error is at most the plain min-max fit's."""
    gen = torch.Generator().manual_seed(bits + group)
    w = torch.randn(40, 256, generator=gen)
    w[3, 7] = 9.0  # an outlier row: the case clipping is for
    plain, deq0 = rtn(w, bits, group, sym)
    tensors, deq = rtn(w, bits, group, sym, mse=True, rows=16)  # several chunks
    ref = reference_dequant(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"], bits, True)
    assert torch.allclose(ref, deq, atol=1e-5)
    g = w.shape[1] if group <= 0 else group
    err = lambda d: ((d - w) ** 2).reshape(40, -1, g).sum(-1)  # noqa: E731
    assert (err(deq) <= err(deq0) * (1 + 1e-5) + 1e-9).all()
    if bits == 4:
        assert err(deq).sum() < 0.97 * err(deq0).sum()
    if sym:
        assert (unpack_zeros(tensors, bits) == 2 ** (bits - 1) - 1).all()  # v1: stored zero-1, symmetric zero


def unpack_zeros(tensors, bits):
    return unpack_cols(tensors["qzeros"], bits)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_column_packing_is_the_row_packing_transposed(bits):
    """pack_cols/unpack_cols work word by word along the columns in int32; they must equal the row packing of
    the transpose, including top values shifted into the sign bit."""
    g = torch.Generator().manual_seed(bits)
    for r, c in ((1, 32), (7, 96), (128, 2048)):
        z = torch.randint(0, 2**bits, (r, c), generator=g, dtype=torch.int32)
        z[0, -1] = 2**bits - 1  # the last value of a word: its top bits are the sign bit
        p = pack_cols(z, bits)
        assert p.dtype == torch.int32 and p.shape == (r, c * bits // 32)
        assert torch.equal(p, pack_rows(z.t().contiguous(), bits).t())
        assert torch.equal(unpack_cols(p, bits), z)


def test_groups_that_do_not_divide_the_inputs():
    """96 inputs in groups of 64: two groups of scales, the last short. Without g_idx only the config's group_size
    says where each input belongs (13696-input projections in groups of 256 are this case)."""
    gen = torch.Generator().manual_seed(3)
    qweight, qzeros, scales, g_idx = random_gptq(4, 96, 16, 64, False, gen)
    ref = reference_dequant(qweight, qzeros, scales, g_idx, 4, True)
    t = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
    pw = from_gptq(t, 1, 96, group_size=64)
    assert pw.group_size == 64 and torch.allclose(dequantize(pw), ref, atol=1e-6)
    assert torch.allclose(dequantize(from_gptq(dict(t, g_idx=g_idx), 1, 96, group_size=64)), ref, atol=1e-6)
    q2, z2, s2, _ = random_gptq(4, 136, 16, 64, False, gen)  # 3 groups: no even split of 136 to fall back on
    with pytest.raises(ValueError, match="3 groups of scales for 136 inputs, which the config's group_size None"):
        from_gptq({"qweight": q2, "qzeros": z2, "scales": s2}, 1, 136)


def test_words_other_than_int32_and_three_bits_are_refused():
    gen = torch.Generator().manual_seed(4)
    qweight, qzeros, scales, _ = random_gptq(4, 64, 16, 32, False, gen)
    with pytest.raises(ValueError, match="packed in torch.int16 words; lowvram reads GPTQ packed in int32 words"):
        from_gptq({"qweight": qweight.view(torch.int16), "qzeros": qzeros, "scales": scales}, 1, 128)
    with pytest.raises(ValueError, match="3-bit GPTQ, a bitstream across words, is not supported"):
        from_gptq({"qweight": qweight[:6], "qzeros": qzeros, "scales": scales}, 1, 64)


def _part(bits, k, n, group, seed, act_order=False):
    gen = torch.Generator().manual_seed(seed)
    qweight, qzeros, scales, g_idx = random_gptq(bits, k, n, group, act_order, gen)
    return from_gptq({"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}, 1, k, group)


@pytest.mark.parametrize("parts", [[(4, 32), (4, 64), (8, 32)], [(8, 128), (4, 128), (4, 128)], [(4, -1), (4, 32), (4, 32)],
                                   [(4, 48), (8, 96), (4, 48)]])
def test_fusing_q_k_v_quantized_differently_changes_no_weight(parts):
    """GPTQModel's `dynamic` settings can quantize q, k and v with their own bits and groups; lowvram runs them as
    one linear: brought to the most bits and the groups' gcd, every weight and bias stays what it was."""
    from lowvram.quantized import fuse

    k = 192
    ws = [_part(b, k, 32 * (i + 1), k if g <= 0 else g, seed=i) for i, (b, g) in enumerate(parts)]
    for i, w in enumerate(ws):
        w.bias = torch.randn(w.out_features, generator=torch.Generator().manual_seed(10 + i))
    fused = fuse(ws)
    assert fused.bits == max(b for b, _ in parts)
    assert torch.equal(dequantize(fused), torch.cat([dequantize(w) for w in ws]))
    assert torch.equal(fused.bias, torch.cat([w.bias for w in ws]))


def test_fusing_differently_grouped_act_order_parts_is_refused():
    from lowvram.quantized import fuse

    ws = [_part(4, 128, 32, 32, seed=1, act_order=True), _part(4, 128, 32, 64, seed=2, act_order=True)]
    with pytest.raises(ValueError, match="different act-order groups"):
        fuse(ws)
    same = [_part(4, 128, 32, 32, seed=3, act_order=True)]
    same.append(PackedWeight(pack_rows(unpack_rows(same[0].qweight, 4), 8), pack_cols(unpack_cols(same[0].qzeros, 4), 8),
                             same[0].scales, same[0].g_idx, 8, 32))  # one act-order grouping, other bits: fine
    assert torch.equal(dequantize(fuse(same)), torch.cat([dequantize(w) for w in same]))


def _wider_v_and_down(tiny, tmp_path):
    """A GLM-4-0414 GPTQ checkpoint with v_proj and down_proj at 8 bits in groups of 64, the rest 4-bit in groups of
    32, as GPTQModel writes a `dynamic` override; and the 4-bit-only checkpoint it was made from."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    from lowvram.converters.gptq import rtn
    from lowvram.converters.quantize import quantize

    src = tiny("glm-4-0414", hidden_size=128, head_dim=32, intermediate_size=256)
    uniform = Path(quantize(src, tmp_path / "q4", bits=4, group_size=32, progress=False)["out"])
    out = tmp_path / "mixed"
    shutil.copytree(uniform, out)
    fp = load_file(src / "model.safetensors")
    (shard,) = sorted(out.glob("*.safetensors"))
    st = load_file(shard)
    for name in [n for n in fp if n.endswith(("v_proj.weight", "down_proj.weight"))]:
        tensors, _ = rtn(fp[name], 8, 64)
        st.update({f"{name.removesuffix('.weight')}.{key}": t for key, t in tensors.items()})
    save_file(st, shard, metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["dynamic"] = {r"+:.*(v|down)_proj.*": {"bits": 8, "group_size": 64}}
    (out / "config.json").write_text(json.dumps(cfg))
    return out, st, uniform


def test_a_checkpoint_with_v_proj_at_8_bits_loads_and_equals_its_parts(tiny, tmp_path):
    """q/k/v at different bits and groups: the fused qkv of the float32 path is exactly the three parts' weights,
    down_proj keeps its own settings, and the fast path computes the same logits to int8-activation rounding."""
    import lowvram

    out, st, _ = _wider_v_and_down(tiny, tmp_path)
    exact = lowvram.load(out, dtype="float32")
    qkv = exact.net.layers[0].attn.qkv
    base = "model.layers.0.self_attn."
    parts = [from_gptq({key: st[f"{base}{p}.{key}"] for key in ("qweight", "qzeros", "scales", "g_idx")}, 1, 128, g)
             for p, g in (("q_proj", 32), ("k_proj", 32), ("v_proj", 64))]
    assert qkv.w.bits == 8 and qkv.w.group_size == 32
    assert torch.equal(dequantize(qkv.w), torch.cat([dequantize(p) for p in parts]))
    down = exact.net.layers[0].mlp.down.w  # a module of its own at its own settings
    assert (down.bits, down.group_size) == (8, 64)
    ids = list(range(3, 30))
    ref = exact.logits(ids)
    fast = lowvram.load(out).logits(ids)
    assert ((fast - ref).norm() / ref.norm()).item() < 5e-2


def test_the_memory_model_counts_the_widened_q_k_v(tiny, tmp_path):
    """The RSS model counts quantized linears at their file bytes; q/k parts widened to v_proj's 8 bits take more
    in memory than in the file, and the prediction grows by what the loaded modules grow by (to within the g_idx
    and scales the two layouts hold differently)."""
    import lowvram
    from lowvram.memory import predict_rss

    out, _, uniform = _wider_v_and_down(tiny, tmp_path)
    grown = predict_rss(out, dtype="float32").weights - predict_rss(uniform, dtype="float32").weights
    held = [resident_block_bytes(lowvram.load(p, dtype="float32")) for p in (out, uniform)]
    actual = held[0] - held[1]
    assert abs(grown - actual) <= 0.1 * actual, (grown, actual)


def test_a_checkpoint_with_k_proj_left_float_loads_as_its_parts(tiny, tmp_path):
    """GPTQModel's `dynamic` can leave one of q/k/v unquantized (`-:` rule): the three then run as one float linear
    holding the quantized parts' exact weights beside the stored float one, so the float32 path is still exact."""
    import json
    import shutil
    import warnings

    from safetensors.torch import load_file, save_file

    import lowvram

    _, st, uniform = _wider_v_and_down(tiny, tmp_path)
    out = tmp_path / "k-float"
    shutil.copytree(uniform, out)
    (shard,) = sorted(out.glob("*.safetensors"))
    st = load_file(shard)
    gen = torch.Generator().manual_seed(0)
    kfloat = {}
    for name in [n for n in st if n.endswith("k_proj.qweight")]:
        base = name.removesuffix(".qweight")
        for key in ("qweight", "qzeros", "scales", "g_idx"):
            del st[f"{base}.{key}"]
        kfloat[base] = st[f"{base}.weight"] = torch.randn(64, 128, generator=gen).half()
    save_file(st, shard, metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["dynamic"] = {r"-:.*k_proj.*": {}}
    (out / "config.json").write_text(json.dumps(cfg))

    exact = lowvram.load(out, dtype="float32")
    qkv = exact.net.layers[0].attn.qkv
    base = "model.layers.0.self_attn."
    q, v = (from_gptq({key: st[f"{base}{p}.{key}"] for key in ("qweight", "qzeros", "scales", "g_idx")}, 1, 128, 32)
            for p in ("q_proj", "v_proj"))
    assert type(qkv) is torch.nn.Linear
    assert torch.equal(qkv.weight, torch.cat([dequantize(q), kfloat[base + "k_proj"].float(), dequantize(v)]))
    assert torch.equal(qkv.bias, torch.cat([st[f"{base}{p}_proj.bias"].float() for p in "qkv"]))
    ids = list(range(3, 30))
    ref = exact.logits(ids)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fast = lowvram.load(out)
    assert any("partly unquantized" in str(w.message) for w in seen)
    logits = fast.logits(ids)
    assert ((logits - ref).norm() / ref.norm()).item() < 5e-2
    assert torch.equal(lowvram.load(out).logits(ids), logits)  # again (from the repack cache where it is on)
    from lowvram.memory import predict_rss

    grown = predict_rss(out, dtype="float32").weights - predict_rss(uniform, dtype="float32").weights
    actual = resident_block_bytes(exact) - resident_block_bytes(lowvram.load(uniform, dtype="float32"))
    assert abs(grown - actual) <= 0.1 * actual, (grown, actual)  # the RSS model counts the float qkv as such
