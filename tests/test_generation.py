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


def test_chunked_prefill_matches(tiny):
    model = lowvram.load(tiny("glm-4-9b-chat"), dtype="float32")
    ids = list(range(3, 40))
    full = model.logits(ids)
    model.prefill_chunk = 5
    assert torch.allclose(model.logits(ids), full, atol=1e-5)
    model.prefill_chunk = 512


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
