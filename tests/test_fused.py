"""The C versions of a CPU decode step's small ops against the model's own torch code."""

import pytest
import torch
import torch.nn.functional as F

from lowvram.config import GLMConfig
from lowvram.kernels import fused, native
from lowvram.models import glm

pytestmark = pytest.mark.skipif(native.available() is not None, reason="native kernel not built (no C compiler at install)")


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _attention_cfg(heads, kv_heads, head_dim):
    """One ChatGLM3-style layer with these attention shapes (the kernels read only these and the RoPE width)."""
    return GLMConfig(layout="chatglm", generation="chatglm3-6b", vocab_size=64, hidden_size=256, num_layers=1,
                     num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, ffn_hidden_size=64, norm_eps=1e-5,
                     max_length=8192, rotary_dim=16)


def _rotated_qkv(cfg, qkv, rope):
    """The torch path of Attention.forward up to attention: q, k, v [1, T, heads, head_dim], q and k rotated."""
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = qkv.split([H * D, G * D, G * D], dim=-1)
    q, k, v = q.unflatten(-1, (H, D)), k.unflatten(-1, (G, D)), v.unflatten(-1, (G, D))
    return glm.apply_rope(cfg, q, *rope), glm.apply_rope(cfg, k, *rope), v


def _decode_logits(model, ids, prompt):
    """Prefill `prompt` ids, then each further id as one decode step: the logits of every step."""
    caches = model.new_cache(model.config.pre_seq_len + len(ids))
    model.forward(ids, 0, prompt, caches)
    return torch.stack([model.net.head(model.forward(ids, s, 1, caches)).float() for s in range(prompt, len(ids))])


@pytest.mark.parametrize("path", native.ISAS)
def test_rms_norm_and_swiglu_match_torch(path):
    if native.ISAS.index(path) > native.ISAS.index(native.isa()):
        pytest.skip(f"this CPU runs the kernel's {native.isa()} path at best, not {path}")
    torch.manual_seed(0)
    x = torch.randn(1, 1, 4096).bfloat16()
    w = (torch.rand(4096) + 0.5).bfloat16()
    ref = (w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5))).bfloat16()
    h = (torch.randn(1, 1, 2 * 3000) * 4).bfloat16()  # includes large |gate| where exp over/underflows
    a, b = h.chunk(2, dim=-1)
    hp = (torch.randn(600, 2 * 3000) * 4).bfloat16()  # a prompt's rows: split across OpenMP's threads
    ap, bp = hp.chunk(2, dim=-1)
    native.set_isa(path)
    try:
        assert _rel(fused.rms_norm(x, w, 1e-5), ref) < 4e-3  # one bf16 rounding apart
        assert _rel(fused.swiglu(h), F.silu(a) * b) < 4e-3
        assert _rel(fused.swiglu(hp), F.silu(ap) * bp) < 4e-3
    finally:
        native.set_isa(None)
    # where they do not apply, the caller's torch code runs
    assert fused.rms_norm(x.float(), w, 1e-5) is None  # float32 is the exact reference path
    assert fused.rms_norm(torch.randn(600, 4096).bfloat16(), w, 1e-5) is None  # prompt-sized: torch's threads
    assert fused.swiglu(hp.float()) is None


@pytest.mark.parametrize("path", native.ISAS)
@pytest.mark.parametrize("slot", [0, 37, 700, 5000])
# groups of 4 query heads per kv head, groups with heads left over, ChatGLM3's heads (whose 700- and 5000-slot
# caches are long enough to split into chunks across threads), one query head per kv head
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 32), (14, 2, 40), (3, 1, 32), (32, 2, 128), (4, 4, 48)])
def test_attend_one_matches_rope_cache_write_and_attention(path, slot, heads, kv_heads, head_dim):
    if native.ISAS.index(path) > native.ISAS.index(native.isa()):
        pytest.skip(f"this CPU runs the kernel's {native.isa()} path at best, not {path}")
    cfg = _attention_cfg(heads, kv_heads, head_dim)
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    torch.manual_seed(slot)
    qkv = torch.randn(1, 1, (H + 2 * G) * D).bfloat16()
    cache = [torch.randn(1, G, slot + 100, D).bfloat16() for _ in range(2)]
    rope = glm.rope_tables(cfg, torch.tensor([[slot]]))
    q, k, v = _rotated_qkv(cfg, qkv, rope)
    kc, vc = (c.clone() for c in cache)
    kc[:, :, slot] = k[:, 0]
    vc[:, :, slot] = v[:, 0]
    ref = glm.decode_attention(q.transpose(1, 2), kc[:, :, : slot + 1], vc[:, :, : slot + 1]).transpose(1, 2)
    native.set_isa(path)
    try:
        o = fused.attend_one(cfg, qkv.clone(), rope, tuple(cache), slot)
    finally:
        native.set_isa(None)
    assert o.shape == (1, 1, H * D)
    assert _rel(o, ref.reshape(1, 1, H * D)) < 4e-3  # bf16 rounding of the output
    assert torch.equal(cache[0][:, :, slot], kc[:, :, slot]) and torch.equal(cache[1][:, :, slot], vc[:, :, slot])
    assert torch.equal(cache[0][:, :, slot + 1 :], kc[:, :, slot + 1 :])  # nothing else written
    v1 = GLMConfig(**{**cfg.__dict__, "rope": "2d", "layout": "chatglm-v1"})
    assert fused.attend_one(v1, qkv, rope, tuple(cache), slot) is None  # ChatGLM-6B's 2D RoPE: torch code


@pytest.mark.parametrize("path", native.ISAS)
@pytest.mark.parametrize("slot", [0, 37, 700, 5000])
# heads per kv head: 16 (ChatGLM2/3, GLM-4: AVX-512's sixteen-head loop), 7 and 3 (the four-head and one-head
# loops) and 1; head sizes off AVX-512's 16 (40: the AVX2 loops there) and off its 64-wide value tile (48); 5000
# slots: several chunks merged, on threads
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 2, 128), (14, 2, 40), (3, 1, 32), (21, 3, 64), (4, 4, 48)])
def test_attend_one_over_an_int8_cache_matches_torch(path, slot, heads, kv_heads, head_dim):
    """lvq_attend_one_i8: the token's k and v quantized into the INT8 cache exactly as Int8KV.write does, and its
    attention equal to Int8KV.attend_one (torch, fp32) to the output's bf16 rounding."""
    if native.ISAS.index(path) > native.ISAS.index(native.isa()):
        pytest.skip(f"this CPU runs the kernel's {native.isa()} path at best, not {path}")
    cfg = _attention_cfg(heads, kv_heads, head_dim)
    H, G, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    torch.manual_seed(slot + heads)
    qkv = (torch.randn(1, 1, (H + 2 * G) * D) * 3).bfloat16()
    shape = (1, G, slot + 9, D)
    cache = glm.Int8KV(shape, torch.bfloat16, "cpu")
    cache.write(0, torch.randn(1, G, slot, D) * 2, torch.randn(1, G, slot, D))
    ref = glm.Int8KV(shape, torch.bfloat16, "cpu")
    for a, b in zip(ref.q + ref.s, cache.q + cache.s):
        a.copy_(b)
    rope = glm.rope_tables(cfg, torch.tensor([[slot]]))
    q, k, v = _rotated_qkv(cfg, qkv, rope)
    ref.write(slot, k.transpose(1, 2), v.transpose(1, 2))
    expect = ref.attend_one(q.transpose(1, 2).float(), slot + 1).transpose(1, 2).reshape(1, 1, H * D)
    native.set_isa(path)
    try:
        o = fused.attend_one(cfg, qkv.clone(), rope, cache, slot)
    finally:
        native.set_isa(None)
    if path == "generic":
        assert o is None  # plain C loops lose to torch's matmuls here: the torch code runs
        return
    assert o.shape == (1, 1, H * D)
    assert _rel(o, expect) < 4e-3  # bf16 rounding of the output
    for a, b in zip(cache.q + cache.s, ref.q + ref.s):
        assert torch.equal(a, b)  # the new slot's codes and scales as torch writes them; nothing else touched


@pytest.mark.parametrize("path", native.ISAS)
@pytest.mark.parametrize("start,rows", [(0, 2), (0, 45), (37, 5), (300, 64)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(8, 2, 32), (14, 2, 40), (12, 2, 64), (32, 2, 128)])
def test_attend_rows_matches_rope_cache_write_and_causal_attention(path, start, rows, heads, kv_heads, head_dim):
    """A prompt chunk's attention in C: RoPE, cache writes at slots start.., and each row over slots up to its
    own (earlier slots: a prefix or an earlier chunk), against the torch code with an explicit mask."""
    if native.ISAS.index(path) > native.ISAS.index(native.isa()):
        pytest.skip(f"this CPU runs the kernel's {native.isa()} path at best, not {path}")
    cfg = _attention_cfg(heads, kv_heads, head_dim)
    H, G, D, T = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rows
    torch.manual_seed(start + rows)
    qkv = (torch.randn(1, T, (H + 2 * G) * D) * 2).bfloat16()
    cache = [torch.randn(1, G, 400, D).bfloat16() for _ in range(2)]
    rope = glm.rope_tables(cfg, torch.arange(start, start + T)[None])
    q, k, v = _rotated_qkv(cfg, qkv, rope)
    kc, vc = (c.clone() for c in cache)
    kc[:, :, start : start + T] = k.transpose(1, 2)
    vc[:, :, start : start + T] = v.transpose(1, 2)
    mask = torch.arange(start + T) <= torch.arange(start, start + T)[:, None]
    ref = F.scaled_dot_product_attention(q.transpose(1, 2).float(), kc[:, :, : start + T].float(),
                                         vc[:, :, : start + T].float(), attn_mask=mask, enable_gqa=True)
    native.set_isa(path)
    try:
        o = fused.attend_rows(cfg, qkv.clone(), rope, tuple(cache), start)
    finally:
        native.set_isa(None)
    if path == "generic":
        assert o is None  # its loops need AVX2: SDPA runs
        return
    assert o.shape == (1, T, H * D)
    assert _rel(o, ref.transpose(1, 2).reshape(1, T, H * D)) < 4e-3  # bf16 rounding of the output
    assert torch.equal(cache[0][:, :, start : start + T], kc[:, :, start : start + T])
    assert torch.equal(cache[1][:, :, start : start + T], vc[:, :, start : start + T])
    assert torch.equal(cache[0][:, :, start + T :], kc[:, :, start + T :])  # nothing else written
    assert torch.equal(cache[0][:, :, :start], kc[:, :, :start])


@pytest.mark.parametrize("start,rows", [(0, 45), (37, 5), (300, 64)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(14, 2, 40), (32, 2, 128)])
def test_attend_rows_over_an_int8_cache(start, rows, heads, kv_heads, head_dim):
    """A prompt chunk over the INT8 KV cache in C: the rows' keys and values written as Int8KV.write rounds them,
    nothing else touched, and attention over the cache's earlier slots and the chunk's own rows before rounding
    (the torch code rounds those first: int8's rounding apart)."""
    if not native.fast():
        pytest.skip(f"the prompt attention in C needs AVX2; this CPU runs the kernel's {native.isa()} path")
    cfg = _attention_cfg(heads, kv_heads, head_dim)
    H, G, D, T = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, rows
    torch.manual_seed(start + rows)
    qkv = (torch.randn(1, T, (H + 2 * G) * D) * 2).bfloat16()
    cache, ref = (glm.Int8KV((1, G, 400, D), torch.bfloat16, "cpu") for _ in range(2))
    cache.write(0, torch.randn(1, G, start, D), torch.randn(1, G, start, D))
    for a, b in zip(ref.q + ref.s, cache.q + cache.s):
        a.copy_(b)
    rope = glm.rope_tables(cfg, torch.arange(start, start + T)[None])
    q, k, v = _rotated_qkv(cfg, qkv, rope)
    ref.write(start, k.transpose(1, 2), v.transpose(1, 2))
    mask = torch.arange(start + T) <= torch.arange(start, start + T)[:, None]

    def sdpa(keys, values):
        o = F.scaled_dot_product_attention(q.transpose(1, 2).float(), keys.float(), values.float(), attn_mask=mask,
                                           enable_gqa=True)
        return o.transpose(1, 2).reshape(1, T, H * D)

    # the earlier slots as the cache holds them, the chunk's rows before rounding
    expect = sdpa(*(torch.cat([c[:, :, :start], x.transpose(1, 2)], 2) for c, x in zip(ref.read(start), (k, v))))
    o = fused.attend_rows(cfg, qkv.clone(), rope, cache, start)
    assert o.shape == (1, T, H * D)
    assert _rel(o, expect) < 4e-3  # bf16 rounding of the output
    assert _rel(o, sdpa(*ref.read(start + T))) < 2e-2  # the torch code, every row rounded
    for a, b in zip(cache.q + cache.s, ref.q + ref.s):
        assert torch.equal(a, b)  # the rows' codes and scales as torch writes them; nothing else touched


@pytest.mark.parametrize("generation,kw", [("chatglm3-6b", {}), ("glm-4-9b-chat", {}), ("glm-4-0414", {}),
                                           ("chatglm3-6b", {"pre_seq_len": 4})])
def test_prompt_attention_in_c_equals_sdpa(generation, kw, tiny, monkeypatch):
    """Prompts through lvq_attend_rows against SDPA, whole and in chunks (later chunks attend over the earlier
    ones in the cache; the torch code then needs an explicit mask, built in the layer), and with a P-tuning
    prefix ahead of the prompt: the logits of every position agree to bf16 rounding."""
    import lowvram

    if not native.fast():
        pytest.skip("lvq_attend_rows needs AVX2; this CPU runs the portable path")
    src = tiny(generation, **kw, **({} if generation.startswith("glm-4-0") else dict(hidden_size=128, ffn_hidden_size=256)))
    model = lowvram.load(src, dtype="bfloat16")
    ids = list(range(3, 70))
    ran = []
    real = fused.attend_rows
    monkeypatch.setattr(fused, "attend_rows", lambda *a, **k: (o := real(*a, **k), ran.append(o is not None))[0])

    def logits(chunk):
        model.prefill_chunk = chunk
        with torch.inference_mode():
            caches = model.new_cache(model.config.pre_seq_len + len(ids))
            return model.net.head(model.forward(ids, 0, len(ids), caches)).float()

    fast, fast_chunked = logits(512), logits(16)
    assert ran and all(ran)  # every layer of every chunk in C
    monkeypatch.setattr(fused, "attend_rows", lambda *a, **k: None)
    ref, ref_chunked = logits(512), logits(16)
    assert _rel(fast, ref) < 2e-2 and _rel(fast_chunked, ref) < 2e-2 and _rel(ref_chunked, ref) < 2e-2


@pytest.mark.parametrize("generation", ["chatglm3-6b", "glm-4-9b-chat", "glm-4-0414", "chatglm-6b"])
def test_decode_with_fused_ops_equals_torch_ops(generation, tiny, monkeypatch):
    """A whole bf16 model, token by token over the same sequence: each step's logits with the C ops as with
    the model's torch code, to bf16 rounding (ChatGLM-6B's LayerNorm and 2D RoPE stay in torch: checks the
    fallbacks mix with the fused ops)."""
    import lowvram

    src = tiny(generation, **({} if generation.startswith("glm-4-0") else dict(hidden_size=128, ffn_hidden_size=256)))
    model = lowvram.load(src, dtype="bfloat16")
    ids = list(range(3, 60))

    def steps():
        return _decode_logits(model, ids, 20)

    calls = []
    for name in ("rms_norm", "swiglu", "attend_one"):
        real = getattr(fused, name)
        monkeypatch.setattr(fused, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1])
    with torch.inference_mode():
        fast = steps()
        if generation != "chatglm-6b":
            assert {"rms_norm", "swiglu", "attend_one"} <= set(calls)
        for name in ("rms_norm", "swiglu", "attend_one"):
            monkeypatch.setattr(fused, name, lambda *a, **k: None)
        ref = steps()
    assert _rel(fast, ref) < 2e-2, _rel(fast, ref)


@pytest.mark.parametrize("generation,bits", [("chatglm3-6b", 4), ("glm-4-9b-chat", 8), ("glm-4-0414", 4)])
def test_decode_block_equals_the_blocks_separate_calls(generation, bits, tiny, tmp_path, monkeypatch):
    """A quantized bf16 model decoded with one C call for all blocks, and with one C call per block, gives the
    same logits, bit for bit, as the blocks' separate calls (norms, native linears, attention, SwiGLU, torch's
    bf16 residual adds)."""
    import lowvram
    from lowvram.converters.quantize import quantize

    kw = (dict(hidden_size=128, head_dim=32, intermediate_size=256) if generation == "glm-4-0414"
          else dict(hidden_size=128, kv_channels=32, ffn_hidden_size=256))  # widths the native kernel takes
    src = tiny(generation, **kw)
    out = quantize(src, tmp_path / "q", bits=bits, group_size=128, progress=False)["out"]
    model = lowvram.load(out, dtype="bfloat16", backend="native")
    ids = list(range(3, 40))

    def steps():
        return _decode_logits(model, ids, 12)

    calls = {"decode_blocks": [], "decode_block": []}
    for name in calls:
        def counted(*a, _real=getattr(fused, name), _log=calls[name], **k):
            r = _real(*a, **k)
            _log.append(r is not None)
            return r
        monkeypatch.setattr(fused, name, counted)
    with torch.inference_mode():
        whole = steps()
        assert sum(calls["decode_blocks"]) == len(ids) - 12  # every decode step in one call
        monkeypatch.setattr(fused, "decode_blocks", lambda *a, **k: None)
        per_block = steps()
        assert sum(calls["decode_block"]) == (len(ids) - 12) * model.config.num_layers  # every step, every block
        monkeypatch.setattr(fused, "decode_block", lambda *a, **k: None)
        ref = steps()
    assert torch.equal(per_block, ref), _rel(per_block, ref)
    assert torch.equal(whole, ref), _rel(whole, ref)


@pytest.mark.parametrize("generation", ["chatglm3-6b", "glm-4-0414"])
def test_decode_over_an_int8_cache_in_c_equals_torch(generation, tiny, tmp_path, monkeypatch):
    """With the INT8 KV cache (the long-context option), a quantized bf16 model decodes every block of a step in
    one C call, bit for bit as the blocks' separate C calls, and to bf16 rounding as the torch code."""
    import lowvram
    from lowvram.converters.quantize import quantize

    if not native.fast():
        pytest.skip(f"INT8 cache attention in C needs AVX2; this CPU runs the kernel's {native.isa()} path, and "
                    "torch's attention (test_attend_one_over_an_int8_cache_matches_torch covers that fallback)")
    kw = (dict(hidden_size=128, head_dim=32, intermediate_size=256) if generation == "glm-4-0414"
          else dict(hidden_size=128, kv_channels=32, ffn_hidden_size=256))
    src = tiny(generation, **kw)
    model = lowvram.load(quantize(src, tmp_path / "q", bits=4, group_size=128, progress=False)["out"],
                         dtype="bfloat16", backend="native")
    model.kv_int8 = True
    ids = list(range(3, 40))
    calls = []
    real = fused.decode_blocks
    monkeypatch.setattr(fused, "decode_blocks", lambda *a, **k: (r := real(*a, **k), calls.append(r is not None))[0])
    with torch.inference_mode():
        whole = _decode_logits(model, ids, 12)
        assert sum(calls) == len(ids) - 12  # every decode step in one call, over the INT8 caches
        monkeypatch.setattr(fused, "decode_blocks", lambda *a, **k: None)
        separate = _decode_logits(model, ids, 12)
        monkeypatch.setattr(fused, "decode_block", lambda *a, **k: None)
        monkeypatch.setattr(fused, "attend_one", lambda *a, **k: None)
        ref = _decode_logits(model, ids, 12)  # Int8KV.write and Int8KV.attend_one in torch
    assert torch.equal(whole, separate)
    assert _rel(whole, ref) < 2e-2, _rel(whole, ref)
