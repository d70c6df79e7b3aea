"""The chat API (Model.chat / stream_chat / chat_completion) on tiny random models with real-format tokenizers.

Outputs are gibberish; the tests check structure, stop behaviour and that streamed deltas add up
to the final answer.
"""

import json
import shutil
import threading

import pytest

import lowvram
from lowvram.model import ContextError
from tok_files import GLM4_N, train_glm1_model, write_glm4_tokenizer

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    from lowvram.converters.synthetic import write_random

    d = write_random(tmp_path_factory.mktemp("m") / "glm4", "glm-4-9b-chat", padded_vocab_size=GLM4_N + 14,
                     seq_length=512)
    write_glm4_tokenizer(d)
    return lowvram.load(d)


def run(stream):
    deltas = list(stream)
    assert all(isinstance(d, str) and d for d in deltas)
    return deltas


def test_chat_returns_response_and_history(glm4):
    assert glm4.tokenizer.chat_format == "glm4" and glm4.config.generation == "glm-4-9b-chat"
    response, history = glm4.chat("你好", max_new_tokens=12)
    assert isinstance(response, str)
    assert history == [{"role": "user", "content": "你好"}, {"role": "assistant", "content": response}]
    # the next turn builds on that history; the prompt holds both user turns
    response2, history2 = glm4.chat("hello", history=history, max_new_tokens=5)
    assert history2[:2] == history and history2[2] == {"role": "user", "content": "hello"}
    assert history2[3]["content"] == response2
    # THUDM's (query, response) pairs come back as pairs
    r3, h3 = glm4.chat("hello", history=[("你好", response)], max_new_tokens=5)
    assert h3 == [("你好", response), ("hello", r3)]
    assert r3 == response2  # same conversation, greedy: same answer


def test_stream_deltas_add_up(glm4):
    s = glm4.stream_chat("hello world", max_new_tokens=24)
    deltas = run(s)
    assert "".join(deltas) == s.text == s.message["content"] == s.response
    assert s.finish_reason in ("stop", "length")
    assert s.usage["prompt_tokens"] == len(glm4.tokenizer.apply_chat_template([{"role": "user", "content": "hello world"}]))
    if s.finish_reason == "length":
        assert s.usage["completion_tokens"] == 24
    # the same answer without streaming
    assert glm4.chat("hello world", max_new_tokens=24)[0] == s.text
    # and the text is what parse_response makes of the generated ids
    from lowvram.chat import parse_response

    assert parse_response(glm4.tokenizer, s._answer.ids)["content"] == s.text


def test_stops_on_the_tokenizer_stop_ids(glm4, monkeypatch):
    tok = glm4.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "你好"}])
    raw = glm4.generate(prompt, max_new_tokens=16, stop_token_ids=[])
    k = next(i for i in range(1, len(raw)) if raw[i] not in raw[:i])  # first-time token at position k >= 1
    monkeypatch.setattr(tok, "stop_ids", tok.stop_ids + [raw[k]])
    s = glm4.stream_chat("你好", max_new_tokens=16)
    run(s)
    assert s._answer.ids == raw[:k] and s.finish_reason == "stop" and s.usage["completion_tokens"] == k
    # an explicit stop list wins over the tokenizer's
    s = glm4.stream_chat("你好", max_new_tokens=16, stop_token_ids=[])
    run(s)
    assert s._answer.ids == raw and s.finish_reason == "length"


def test_cancel_should_stop_and_close(glm4):
    calls = []
    s = glm4.stream_chat("你好", max_new_tokens=20, stop_token_ids=[], should_stop=lambda: len(calls.append(0) or calls) > 3)
    run(s)
    assert s.finish_reason == "cancelled" and s.usage["completion_tokens"] == 3

    ev = threading.Event()
    ev.set()
    s = glm4.stream_chat("你好", max_new_tokens=20, should_stop=ev)
    assert run(s) == [] and s.finish_reason == "cancelled" and s.usage["completion_tokens"] == 0
    assert s.message == {"role": "assistant", "content": ""}

    # cancel() from another thread, then close() mid-stream (what a Ctrl-C handler does)
    s = glm4.stream_chat("你好", max_new_tokens=20, stop_token_ids=[])
    t = threading.Thread(target=s.cancel)
    t.start()
    t.join()
    run(s)
    assert s.finish_reason == "cancelled" and s.usage["completion_tokens"] == 0
    # a Ctrl-C while streaming, then close(): the session keeps what was generated so far
    n = [0]

    def interrupt():
        n[0] += 1
        if n[0] > 5:
            raise KeyboardInterrupt
        return False

    s = glm4.stream_chat("你好", max_new_tokens=30, stop_token_ids=[], should_stop=interrupt)
    first = []
    with pytest.raises(KeyboardInterrupt):
        for d in s:
            first.append(d)
    s.close()
    rest = run(s)
    assert s.finish_reason == "cancelled" and s.usage["completion_tokens"] == 5
    assert "".join(first + rest) == s.text
    assert s.history[-1] == s.message  # what was said so far stays in the session


def test_chat_completion_shape(glm4):
    msg = glm4.chat_completion([{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}],
                               max_new_tokens=8)
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert set(msg) <= {"role", "content", "tool_calls", "error"}
    from lowvram.chat import ChatStream

    with_tools = ChatStream(glm4, [{"role": "user", "content": "你好"}], tools=TOOLS, max_new_tokens=4).run()
    without = ChatStream(glm4, [{"role": "user", "content": "你好"}], max_new_tokens=4).run()
    assert with_tools.usage["prompt_tokens"] > without.usage["prompt_tokens"] + 50
    if with_tools.message.get("tool_calls"):  # random weights: anything may come out, but always in shape
        assert json.loads(with_tools.message["tool_calls"][0]["function"]["arguments"]) is not None


def test_observation_turn_and_errors(glm4):
    history = [{"role": "user", "content": "北京天气"},
               {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                                     "function": {"name": "get_weather", "arguments": "{}"}}]}]
    r, h = glm4.chat("晴", history=history, role="observation", max_new_tokens=4)
    assert h[2] == {"role": "observation", "content": "晴"} and h[3]["role"] == "assistant"
    with pytest.raises(ContextError, match="context window"):
        glm4.chat("hello " * 600, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"messages\[0\]: unknown role 'robot'"):
        glm4.chat_completion([{"role": "robot", "content": "x"}])


def test_chatglm6b_chat(tmp_path):
    """The ChatGLM-6B path: [gMASK] <sop> at the end, 2D positions, full-width punctuation, <eop> stop."""
    import sentencepiece as spm
    from lowvram.converters.synthetic import write_random

    sp_file = train_glm1_model(tmp_path / "ice_text.model")
    sp = spm.SentencePieceProcessor(model_file=str(sp_file))
    ids = {t: sp.piece_to_id(t) for t in ("[MASK]", "[gMASK]", "<sop>", "<eop>")}
    d = write_random(tmp_path / "glm1", "chatglm-6b", vocab_size=sp.vocab_size() + 12, mask_token_id=ids["[MASK]"],
                     gmask_token_id=ids["[gMASK]"], bos_token_id=ids["<sop>"], eos_token_id=ids["<eop>"])
    shutil.copy(sp_file, d / "ice_text.model")
    model = lowvram.load(d)
    assert model.tokenizer.chat_format == "chatglm" and model.tokenizer.stop_ids == [ids["<eop>"]]
    s = model.stream_chat("你好", max_new_tokens=20)
    deltas = run(s)
    assert s.prompt_ids[-2:] == [ids["[gMASK]"], ids["<sop>"]]
    assert "".join(deltas) == s.text == s.response
    r, h = model.chat("晚上睡不着怎么办", history=[("你好", s.text)], max_new_tokens=6)
    assert h[-1] == ("晚上睡不着怎么办", r)
    with pytest.raises(ValueError, match="has no system role"):
        model.chat_completion([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])


def test_chatglm3_chat_with_the_real_tokenizer(tiny):
    from conftest import need_reference

    src = need_reference("tokenizers/chatglm3/tokenizer.model")
    path = tiny("chatglm3-6b", padded_vocab_size=65024, seq_length=64)
    shutil.copy(src, path / "tokenizer.model")
    (path / "config.json").write_text(json.dumps(dict(json.loads((path / "config.json").read_text()),
                                                      _name_or_path="THUDM/chatglm3-6b")))
    model = lowvram.load(path)
    s = model.stream_chat([{"role": "system", "content": "You are ChatGLM3."}, {"role": "user", "content": "你好"}],
                          max_new_tokens=10)
    deltas = run(s)
    assert s.prompt_ids[:3] == [64790, 64792, 64794] and s.prompt_ids[-1] == 64796
    assert "".join(deltas) == s.text
    assert not set(s._answer.ids) & {2, 64795, 64797}  # stop ids are never part of the answer


def test_thudm_habits(glm4):
    with pytest.raises(TypeError, match="model.chat takes no tokenizer argument"):
        glm4.chat(glm4.tokenizer, "你好")
    prompt = len(glm4.tokenizer.apply_chat_template([{"role": "user", "content": "你好"}]))
    s = glm4.stream_chat("你好", max_length=prompt + 3, stop_token_ids=[])
    run(s)
    assert s.usage["completion_tokens"] == 3 and s.finish_reason == "length"


def test_an_interrupt_inside_a_step_ends_cancelled(glm4, monkeypatch):
    """A KeyboardInterrupt raised in the model (not in should_stop) kills the token generator; iterating on
    without close() must not report a normal end."""
    head, n = glm4.net.head, [0]

    def interrupting(h):
        n[0] += 1
        if n[0] == 4:
            raise KeyboardInterrupt
        return head(h)

    monkeypatch.setattr(glm4.net, "head", interrupting)
    s = glm4.stream_chat("你好", max_new_tokens=30, stop_token_ids=[])
    with pytest.raises(KeyboardInterrupt):
        for _ in s:
            pass
    run(s)
    assert s.finish_reason == "cancelled" and s.usage["completion_tokens"] == 3


def test_bad_arguments_name_themselves(glm4):
    with pytest.raises(ContextError, match=r"conversation is \d+ tokens, longer than max_length=5"):
        glm4.chat("hello there, how are you today", max_length=5)
    for bad in (-1, None, 2.5):
        with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0"):
            glm4.chat("hi", max_new_tokens=bad) if bad is not None else glm4.generate([1, 2], max_new_tokens=bad)
    with pytest.raises(TypeError, match="history must be a list of message dicts"):
        glm4.chat("hi", history=["a", "b"])
    with pytest.raises(TypeError, match="a query string or a list of message dicts, got NoneType"):
        glm4.chat(None)
    with pytest.raises(TypeError, match="not text"):
        glm4.generate("hello")
    for kw, msg in ((dict(temperature=float("nan")), "temperature must be a number"),
                    (dict(temperature="0.7"), "temperature must be a number"),
                    (dict(top_k=1.5), "top_k must be an integer")):
        with pytest.raises(ValueError, match=msg):
            glm4.generate([1, 2], do_sample=True, **kw)
    # a vanishing temperature is greedy, not NaN probabilities; any integer seeds
    greedy = glm4.generate([1, 2], max_new_tokens=4, stop_token_ids=[])
    assert glm4.generate([1, 2], max_new_tokens=4, stop_token_ids=[], do_sample=True, temperature=1e-45, seed=1) == greedy
    assert len(glm4.generate([1, 2], max_new_tokens=2, stop_token_ids=[], do_sample=True, seed=2**70)) == 2


def test_the_training_time_placeholder_is_filled_in_replies(glm4):
    """ChatGLM2/3 and GLM-4's chat code replaces "[[训练时间]]" in answers; streamed in pieces, it still is."""
    tok = glm4.tokenizer
    ids = tok.encode("我的训练截止于[[训练时间]]。")
    assert tok.decode(ids, reply=True) == "我的训练截止于2023年。" and "[[训练时间]]" in tok.decode(ids)
    dec = tok.stream_decoder(reply=True)
    assert "".join([dec.push(i) for i in ids] + [dec.flush()]) == "我的训练截止于2023年。"
    dec = tok.stream_decoder(reply=True)  # a reply that stops inside a would-be placeholder keeps its text
    assert "".join([dec.push(i) for i in tok.encode("见[[训")] + [dec.flush()]) == "见[[训"
