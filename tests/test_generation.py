"""Generation with the KV cache equals repeated full forwards, for every generation and P-tuning."""

import pytest
import torch

import lowvram
from lowvram.converters.synthetic import TINY

CASES = [(g, {}) for g in TINY] + [
    ("chatglm-6b", {"pre_seq_len": 4}),
    ("chatglm3-6b", {"pre_seq_len": 4}),
    ("chatglm3-6b", {"pre_seq_len": 3, "prefix_projection": True, "prefix_hidden_size": 32}),
]


def prompt_for(gen):
    # ChatGLM-6B: text, then [gMASK] (151) and <sop> (152), so the 2D positions and prefix-LM mask apply
    return [9, 4, 30, 151, 152] if gen == "chatglm-6b" else [9, 4, 30, 17, 2]


@pytest.mark.parametrize("gen,extra", CASES, ids=lambda x: str(x) if not isinstance(x, dict) else "-".join(map(str, x)))
def test_cached_greedy_equals_argmax_chain(gen, extra, tiny):
    model = lowvram.load(tiny(gen, **extra), dtype="float32")
    ids = prompt_for(gen)
    out = model.generate(ids, max_new_tokens=6, stop_token_ids=[])
    chain = list(ids)
    for _ in range(6):
        chain.append(int(model.logits(chain)[-1].argmax()))
    assert out == chain[len(ids):]
    assert list(model.stream_generate(torch.tensor(ids), max_new_tokens=6, stop_token_ids=[])) == out


@pytest.mark.parametrize("gen", ["glm-4-9b-chat", "chatglm-6b"])
def test_chunked_prefill_matches(gen, tiny):
    """Prompts longer than a chunk give the logits of one pass. ChatGLM-6B's context before <sop> attends both
    ways, so it goes through in one chunk: chunked, its first rows had not seen the later context."""
    model = lowvram.load(tiny(gen), dtype="float32")
    ids = list(range(3, 40)) + ([151, 152, 9, 4] if gen == "chatglm-6b" else [])
    full = model.logits(ids)
    model.prefill_chunk = 5
    assert torch.allclose(model.logits(ids), full, atol=1e-5)
    out = model.generate(ids, max_new_tokens=4, stop_token_ids=[])
    model.prefill_chunk = 512
    assert model.generate(ids, max_new_tokens=4, stop_token_ids=[]) == out


def test_chatglm6b_positions_stay_those_of_the_prompt(tiny):
    """A generated [gMASK] or <sop> changes neither the positions nor the mask of what follows (THUDM fixes
    them from the prompt): incremental decode equals one pass under the prompt's scheme."""
    model = lowvram.load(tiny("chatglm-6b"), dtype="float32")
    prompt = [9, 4, 150, 30, 152]  # [MASK] (150), then <sop>: generated positions stay at the [MASK]
    assert model.positions(prompt + [151, 7], 6, 1).tolist() == [[[2], [3]]]  # a generated [gMASK] (151) ignored
    plain, grown = [9, 4, 30], [9, 4, 30, 152, 5]  # no <sop> in the prompt: plain causal, a generated <sop> too
    caches = model.new_cache(8)
    model.forward_rows([plain], 0, 3, caches)
    model.forward_rows([grown[:4]], 3, 1, caches, prompt_len=3)
    step = model.forward_rows([grown], 4, 1, caches, prompt_len=3)[0, -1]
    one_pass = model.forward_rows([grown], 0, 5, model.new_cache(8), prompt_len=3)[0, -1]
    assert torch.allclose(step, one_pass, atol=1e-5)
    assert model.generate(plain + [152], max_new_tokens=3, stop_token_ids=[])  # and generation runs through it


def test_sampling_knobs(tiny):
    model = lowvram.load(tiny("chatglm3-6b"), dtype="float32")
    ids = [5, 6, 7]
    greedy = model.generate(ids, max_new_tokens=5, stop_token_ids=[])
    a = model.generate(ids, max_new_tokens=5, do_sample=True, temperature=1.5, seed=3, stop_token_ids=[])
    b = model.generate(ids, max_new_tokens=5, do_sample=True, temperature=1.5, seed=3, stop_token_ids=[])
    assert a == b
    assert model.generate(ids, max_new_tokens=5, do_sample=True, top_k=1, seed=4, stop_token_ids=[]) == greedy
    assert model.generate(ids, max_new_tokens=5, do_sample=True, top_p=1e-6, seed=4, stop_token_ids=[]) == greedy
    rep = model.generate(ids, max_new_tokens=5, repetition_penalty=1e6, stop_token_ids=[])
    assert len(set(rep)) == 5 and not set(rep) & set(ids)  # a huge penalty forbids every repeat
    for bad in ({"temperature": 0.0, "do_sample": True}, {"top_p": 0}, {"top_k": -1}, {"repetition_penalty": 0}):
        with pytest.raises(ValueError):
            model.generate(ids, **bad)


def test_stops_and_context(tiny):
    model = lowvram.load(tiny("chatglm3-6b", seq_length=16), dtype="float32")
    ids = [5, 6, 7]
    first = model.generate(ids, max_new_tokens=1, stop_token_ids=[])[0]
    assert model.generate(ids, max_new_tokens=5, stop_token_ids=[first]) == []
    assert len(model.generate(ids, max_new_tokens=100, stop_token_ids=[])) == 16 - 3  # ends at the context
    with pytest.raises(lowvram.ContextError, match="17 tokens.*context window is 16"):
        model.logits(list(range(17)))
    with pytest.raises(ValueError, match="1-D"):
        model.logits(torch.tensor([[1, 2]]))


@pytest.mark.parametrize("gen,extra", CASES, ids=lambda x: str(x) if not isinstance(x, dict) else "-".join(map(str, x)))
def test_batch_rows_equal_single_generation(gen, extra, tiny):
    """generate_batch runs all rows through one forward per step: each row equals generate() on its own,
    greedy and sampled (row r with seed + r), through P-tuning prefixes and ChatGLM-6B's 2D positions."""
    model = lowvram.load(tiny(gen, **extra), dtype="float32")
    base = prompt_for(gen)
    prompts = [base, [11] + base[1:], [13, 8] + base[2:]]
    greedy = model.generate_batch(prompts, max_new_tokens=5, stop_token_ids=[])
    assert greedy == [model.generate(p, max_new_tokens=5, stop_token_ids=[]) for p in prompts]
    kw = dict(do_sample=True, top_k=20, temperature=4.0, repetition_penalty=1.1, stop_token_ids=[])  # hot: rows differ
    sampled = model.generate_batch(prompts, max_new_tokens=5, seed=7, **kw)
    assert sampled == [model.generate(p, max_new_tokens=5, seed=7 + r, **kw) for r, p in enumerate(prompts)]
    assert len({tuple(s) for s in sampled}) > 1  # the rows are not one row repeated


@pytest.mark.parametrize("variant", ["int8-kv", "split"])
def test_batch_rows_with_int8_cache_and_split_placement(variant, tiny):
    src = tiny("chatglm3-6b")
    model = lowvram.load(src, dtype="float32", placement="cpu:0=0-0,cpu:1=1-1" if variant == "split" else None)
    model.kv_int8 = variant == "int8-kv"
    prompts = [[9, 4, 30, 17], [5, 6, 7, 8]]
    kw = dict(do_sample=True, top_k=20, temperature=4.0, seed=11, stop_token_ids=[])
    assert model.generate_batch(prompts, max_new_tokens=5, **kw) == [
        model.generate(p, max_new_tokens=5, **dict(kw, seed=11 + r)) for r, p in enumerate(prompts)]


def test_batch_stops_per_row_and_checks_its_input(tiny):
    model = lowvram.load(tiny("glm-4-9b-chat"), dtype="float32")
    prompts = [[9, 4, 30], [5, 6, 7]]
    kw = dict(do_sample=True, top_k=20, temperature=4.0, seed=3, max_new_tokens=8)
    free = model.generate_batch(prompts, stop_token_ids=[], **kw)
    k = next(i for i in range(1, 8) if free[0][i] not in free[0][:i])  # row 0 stops at its k-th new token
    stop = free[0][k]
    got = model.generate_batch(prompts, stop_token_ids=[stop], **kw)
    assert got[0] == free[0][:k]
    assert got[1] == (free[1][: free[1].index(stop)] if stop in free[1] else free[1])  # row 1 runs on
    assert model.generate_batch([], max_new_tokens=3) == []
    with pytest.raises(ValueError, match="equal length"):
        model.generate_batch([[1, 2], [1, 2, 3]], max_new_tokens=2)


def test_batch_rows_need_one_mask(tiny):
    model = lowvram.load(tiny("chatglm-6b"), dtype="float32")
    with pytest.raises(ValueError, match="same attention mask"):  # <sop> at different indices: different prefix-LM masks
        model.generate_batch([[9, 4, 151, 152, 30], [9, 4, 30, 151, 152]], max_new_tokens=2)


def test_threads_sharing_a_model_get_their_own_tokens(tmp_path):
    """An app or a server calls one loaded model from several threads: caches and kernel scratch are per
    call, so each thread gets exactly the tokens it would get alone (quantized, the CPU's default kernels)."""
    import threading
    from conftest import need_example
    from lowvram.converters.quantize import quantize

    ex = need_example()
    quantize(ex, tmp_path / "int4", bits=4, progress=False)
    model = lowvram.load(tmp_path / "int4")
    prompts = [model.tokenizer.encode_prompt(t) for t in ("Return the number of", "Serialize obj to", "Open a file")]
    alone = [model.generate(p, max_new_tokens=16, stop_token_ids=[]) for p in prompts]
    got, errors = {}, []

    def run(i):
        try:
            got[i] = [model.generate(prompts[i], max_new_tokens=16, stop_token_ids=[]) for _ in range(3)]
        except Exception as e:  # noqa: BLE001 - reported by the assert below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(got[i] == [alone[i]] * 3 for i in range(len(prompts)))


def test_prompt_last_position_reaches_the_head_without_copying_its_weight(tiny):
    """A prompt's last position is a [1, 1, K] slice of [1, n, K]; for that stride torch's CPU matmul copied the whole
    transposed float weight before multiplying (0.53 GB and ~2 s per prompt with ChatGLM3-6B's bf16 head). The head
    takes its input as 2-D rows now."""
    from torch.profiler import ProfilerActivity, profile

    m = lowvram.load(tiny("chatglm3-6b", padded_vocab_size=8192), tokenizer=False)  # a float (bf16) output layer
    w = m.net.output.weight
    h = torch.randn(1, 7, w.shape[1]).to(w.dtype)[:, -1:]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y = m.net.head(h)
    biggest = max((e.cpu_memory_usage for e in prof.events()), default=0)
    assert biggest < w.numel() * w.element_size() // 4, biggest
    ref = h.reshape(1, -1).float() @ w.float().t()
    assert y.shape == (1, 1, w.shape[0]) and torch.allclose(y.float().view(1, -1), ref, rtol=2e-2, atol=2e-2)


def test_top_p_nucleus_equals_the_full_sort():
    """top_p_mask takes the nucleus from topk (growing it while short of top_p) instead of sorting the vocabulary:
    the same tokens as the definition, computed here in float64 over a full sort, wherever the crossing token is not
    within float32 rounding of top_p; and nuclei beyond the first 256 candidates (flat distributions)."""
    from lowvram.generate import top_p_mask

    def reference(logits, top_p):
        probs = torch.softmax(logits.double(), -1)
        sp, order = torch.sort(probs, descending=True)
        before = sp.cumsum(-1) - sp  # probability above each token: it is kept while that is <= top_p
        n = int((before <= top_p).sum())
        margin = min(top_p - before[n - 1].item(), before[n].item() - top_p if n < len(before) else 1.0)
        return set(order[:n].tolist()), margin  # margin: how far the kept and the first dropped token are from it

    g = torch.Generator().manual_seed(0)
    checked = 0
    for vocab, scale in ((160, 1.0), (65024, 3.0), (65024, 0.3), (151552, 3.0), (151552, 10.0)):
        for top_p in (0.3, 0.8, 0.95):
            logits = torch.randn(vocab, generator=g) * scale
            want, margin = reference(logits, top_p)
            if margin < 1e-6:  # float32 sums over thousands of tokens cannot place that boundary token either way
                continue
            got = set(torch.nonzero(~torch.isinf(top_p_mask(logits, top_p))).flatten().tolist())
            assert got == want, (vocab, scale, top_p, len(got), len(want))
            checked += 1
    assert checked >= 10  # most cases have a clear boundary; some nuclei are thousands of tokens (the growth path)
    peaked = torch.tensor([4.0, 3.0, 2.0, 1.0] + [-20.0] * 1000)
    assert set(torch.nonzero(~torch.isinf(top_p_mask(peaked, 0.7))).flatten().tolist()) == {0, 1}


@pytest.mark.parametrize("name,over", [("chatglm3-6b", {}), ("glm-4-9b-chat", {}),
                                       ("chatglm2-6b", {"pre_seq_len": 4, "prefix_projection": False})])
def test_prompt_cache_prefills_only_what_is_new(tiny, name, over):
    """A prompt that extends the last one (a chat's next turn) takes the cached keys and values of the shared
    prefix and gives the same tokens as a fresh run (float32: the exact path); the cache grows when the new
    call needs more slots, and a prompt that diverges early reuses only up to there."""
    m = lowvram.load(tiny(name, **over), dtype="float32", tokenizer=False)
    pc = lowvram.PromptCache()
    p1 = [5, 9, 13, 17, 21, 25, 29]
    a = m.generate(p1, max_new_tokens=6, stop_token_ids=[], prompt_cache=pc)
    assert pc.reused == 0 and pc.ids == p1 + a[:-1]  # the last answer token was never fed back
    p2 = p1 + a + [40, 41, 42]
    b = m.generate(p2, max_new_tokens=5, stop_token_ids=[], prompt_cache=pc)
    assert pc.reused == len(p1) + len(a) - 1
    assert b == m.generate(p2, max_new_tokens=5, stop_token_ids=[])
    p3 = p1[:3] + [60, 61]  # diverges after three tokens; fits the cache it has
    kept = pc.caches
    c = m.generate(p3, max_new_tokens=4, stop_token_ids=[], prompt_cache=pc)
    assert pc.reused == 3 and pc.caches is kept
    assert c == m.generate(p3, max_new_tokens=4, stop_token_ids=[])
    pc.clear()
    assert m.generate(p3, max_new_tokens=4, stop_token_ids=[], prompt_cache=pc) == c and pc.reused == 0
    other = lowvram.load(tiny(name, seed=1, **over), dtype="float32", tokenizer=False)  # another model's keys
    assert other.generate(p3, max_new_tokens=4, stop_token_ids=[], prompt_cache=pc) == \
        other.generate(p3, max_new_tokens=4, stop_token_ids=[]) and pc.reused == 0


def test_prompt_cache_is_ignored_where_positions_hinge_on_the_prompt(tiny):
    """ChatGLM-6B's positions depend on where [gMASK] sits, so its keys cannot be reused for a longer prompt."""
    m = lowvram.load(tiny("chatglm-6b"), dtype="float32", tokenizer=False)
    pc = lowvram.PromptCache()
    cfg = m.config
    p1 = [5, 9, 13, cfg.gmask_token_id, cfg.sop_token_id]
    a = m.generate(p1, max_new_tokens=3, stop_token_ids=[], prompt_cache=pc)
    p2 = p1 + a + [7, cfg.gmask_token_id, cfg.sop_token_id]
    assert m.generate(p2, max_new_tokens=3, stop_token_ids=[], prompt_cache=pc) == \
        m.generate(p2, max_new_tokens=3, stop_token_ids=[])
    assert pc.reused == 0 and pc.caches is None


def test_prompt_cache_after_an_early_stop(tiny):
    """A caller that stops reading (a cancelled chat answer) leaves the cache holding exactly what was computed."""
    m = lowvram.load(tiny("chatglm3-6b"), dtype="float32", tokenizer=False)
    pc = lowvram.PromptCache()
    p = [5, 9, 13, 17]
    it = m.stream_generate(p, max_new_tokens=10, stop_token_ids=[], prompt_cache=pc)
    t1, t2 = next(it), next(it)
    it.close()
    assert pc.ids == p + [t1]  # t2 was handed out but never run through the model
    p2 = p + [t1, t2, 33]
    assert m.generate(p2, max_new_tokens=3, stop_token_ids=[], prompt_cache=pc) == \
        m.generate(p2, max_new_tokens=3, stop_token_ids=[]) and pc.reused == len(p) + 1


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_int8_cache_decodes_without_a_rescaled_copy(dtype, tol):
    """A decode step over the INT8 KV cache attends with the codes and scales apart (scores times each slot's scale)
    and gives what attending over the cache read back in the compute dtype gives (the prompt path's way)."""
    from lowvram.models.glm import Int8KV, decode_attention

    g = torch.Generator().manual_seed(0)
    B, H, G, S, D = 2, 8, 2, 37, 32
    cache = Int8KV((B, G, S + 1, D), dtype, "cpu")
    cache.write(0, *(torch.randn(B, G, S, D, generator=g).to(dtype) for _ in range(2)))
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    ref = decode_attention(q, *Int8KV.read(cache, S))
    got = cache.attend_one(q, S)
    assert got.dtype == dtype and got.shape == ref.shape
    assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < tol


def test_one_query_sdpa_equals_decode_attention():
    """On CUDA a decode step attends through SDPA (no mask, not causal: one query sees every cached slot), on the
    CPU through decode_attention; the two agree (checked here on the CPU, with grouped kv heads)."""
    import torch.nn.functional as F

    from lowvram.models.glm import decode_attention

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 8, 1, 32, generator=g), torch.randn(2, 2, 19, 32, generator=g), torch.randn(2, 2, 19, 32, generator=g)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=True)
    assert torch.allclose(sdpa, decode_attention(q, k, v), atol=1e-5)
