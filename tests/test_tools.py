"""Tool calling round trips for ChatGLM3 and GLM-4: render the tools, parse an answer, send the result back.

The model answers are written out by hand in each model's documented answer syntax and turned into
ids with the tokenizer, as the model would have emitted them.
"""

import json
import shutil

import pytest

import lowvram
from lowvram.chat import _Answer, parse_response, parse_tool_call
from tok_files import GLM4_N, train_glm1_model, write_glm4_tokenizer

WEATHER = {"name": "get_weather", "description": "查询城市天气",
           "parameters": {"type": "object", "properties": {"city_name": {"type": "string"},
                                                           "days": {"type": "integer"}},
                          "required": ["city_name"]}}
TOOLS = [{"type": "function", "function": WEATHER}]


@pytest.fixture(scope="module")
def glm3(tmp_path_factory):
    """ChatGLM3 format on a small sentencepiece model: role tokens numbered after its pieces."""
    d = tmp_path_factory.mktemp("glm3")
    train_glm1_model(d / "tokenizer.model")
    (d / "config.json").write_text(json.dumps({"_name_or_path": "THUDM/chatglm3-6b"}))
    tok = lowvram.load_tokenizer(d)
    assert tok.chat_format == "chatglm3"
    return tok


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    return lowvram.load_tokenizer(write_glm4_tokenizer(tmp_path_factory.mktemp("glm4")))


def stream(tok, ids, tools=TOOLS):
    ans = _Answer(tok, tools)
    deltas = [ans.push(i) for i in ids] + [ans.finish()]
    from lowvram.chat import assemble

    return "".join(deltas), assemble(tok, ans.done, tools)


def args_of(msg):
    (call,) = msg["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    return call["function"]["name"], json.loads(call["function"]["arguments"])


# ---- ChatGLM3 ---------------------------------------------------------------------------------


def test_chatglm3_round_trip(glm3):
    A, O, U = (glm3.special_ids[t] for t in ("<|assistant|>", "<|observation|>", "<|user|>"))
    prompt = glm3.apply_chat_template([{"role": "user", "content": "北京天气"}], tools=TOOLS)
    shown = glm3.decode(prompt, skip_special_tokens=False)
    # (sentencepiece gives each separately encoded text its dummy-prefix space: "\n" then " Answer")
    assert shown.startswith("[gMASK]sop<|system|>\n Answer the following questions as best as you can. "
                            "You have access to the following tools:\n[\n    {\n        \"name\": \"get_weather\"")
    assert "查询城市天气" in shown  # ensure_ascii=False
    # the model's answer: "<|assistant|>get_weather\n```python\ntool_call(...)\n```" then <|observation|>
    call = "```python\ntool_call(city_name='北京', days=3, opts={'unit': 'c'}, span=(1, 2))\n```"
    answer = glm3.encode("get_weather\n") + glm3.encode(call)
    msg = parse_response(glm3, answer, TOOLS)
    assert msg["content"] is None and "error" not in msg
    assert args_of(msg) == ("get_weather", {"city_name": "北京", "days": 3, "opts": {"unit": "c"}, "span": [1, 2]})
    text, streamed = stream(glm3, answer)
    assert text == "" and args_of(streamed) == args_of(msg)  # a tool call is not streamed as text
    # the result goes back as an observation; the call is re-rendered the way the model writes it
    history = [{"role": "user", "content": "北京天气"}, msg, {"role": "tool", "content": "晴，25度"}]
    ids = glm3.apply_chat_template(history)
    expected_call = "```python\ntool_call(city_name='北京', days=3, opts={'unit': 'c'}, span=[1, 2])\n```"
    tail = ([A] + glm3.encode("get_weather\n") + glm3.encode(expected_call) + [O] + glm3.encode("\n")
            + glm3.encode("晴，25度") + [A])
    assert ids[-len(tail):] == tail
    assert U in ids[:-len(tail)]


def test_chatglm3_code_interpreter(glm3):
    A = glm3.special_ids["<|assistant|>"]
    answer = (glm3.encode("\n好的，我来算。") + [A] + glm3.encode("interpreter\n")
              + glm3.encode("```python\nprint(1 + 1)\n```"))
    msg = parse_response(glm3, answer)
    assert msg["content"] == "好的，我来算。"
    assert args_of(msg) == ("interpreter", {"code": "print(1 + 1)"})
    text, streamed = stream(glm3, answer)
    assert text == "好的，我来算。" == streamed["content"]
    # back into the prompt as <|assistant|>interpreter + the fenced code
    ids = glm3.apply_chat_template([{"role": "user", "content": "1+1"}, msg, {"role": "observation", "content": "2"}])
    assert glm3.decode(ids, skip_special_tokens=False).endswith(
        "<|assistant|>\n 好的，我来算。<|assistant|>interpreter\n ```python\nprint(1 + 1)\n```<|observation|>\n 2<|assistant|>")


def test_chatglm3_plain_answer(glm3):
    msg = parse_response(glm3, glm3.encode("\n你好！我是人工智能助手。"))
    assert msg == {"role": "assistant", "content": "你好！我是人工智能助手。"}


MALFORMED_CHATGLM3 = [
    ("get_weather", "```python\ntool_call(city_name=open('/tmp/lowvram_tool_pwned', 'w'))\n```", "not a literal"),
    ("get_weather", "```python\ntool_call(city_name=__import__('os').system('true'))\n```", "not a literal"),
    ("get_weather", "```python\ntool_call('北京')\n```", "keyword arguments only"),
    ("get_weather", "```python\ntool_call(**{'city_name': 'x'})\n```", "kwargs"),
    ("get_weather", "```python\nprint('x')\n```", "single tool_call"),
    ("get_weather", "```python\ntool_call(city_name='x'\n```", "not a tool_call"),
    ("get_weather", "```python\ntool_call(city_name=b'x')\n```", "not a JSON value"),
    ("get_weather", "tool_call(a=" + "[" * 5000 + "]" * 5000 + ")", ""),
    ("rm_rf", "```python\ntool_call(path='/')\n```", "not among the tools"),
]


@pytest.mark.parametrize("name,body,why", MALFORMED_CHATGLM3, ids=lambda v: str(v)[:40])
def test_chatglm3_malformed_answers(glm3, name, body, why):
    err = parse_tool_call("chatglm3", name, body, TOOLS)
    assert set(err) == {"error", "name", "raw"} and why in err["error"] and err["raw"] == body
    msg = parse_response(glm3, glm3.encode(name + "\n") + glm3.encode(body), TOOLS)
    assert "tool_calls" not in msg
    assert msg["error"]["type"] == "tool_call_parse_error" and why in msg["error"]["message"]
    assert msg["content"].startswith(name)  # the raw answer stays visible
    import os

    assert not os.path.exists("/tmp/lowvram_tool_pwned")


def test_chatglm3_call_without_fence(glm3):
    assert parse_tool_call("chatglm3", "get_weather", "tool_call(city_name='x', days=-1)", TOOLS) == \
        {"name": "get_weather", "arguments": {"city_name": "x", "days": -1}}


# ---- GLM-4 ------------------------------------------------------------------------------------


def test_glm4_round_trip(glm4):
    S, U, A, O = (glm4.special_ids[t] for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"))
    prompt = glm4.apply_chat_template([{"role": "user", "content": "你好"}], tools=TOOLS)
    system = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
              "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
              "\n\n## get_weather\n\n" + json.dumps(WEATHER, indent=4, ensure_ascii=False)
              + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。")
    assert prompt == ([GLM4_N + 2, GLM4_N + 4, S] + glm4.encode("\n" + system) + [U] + glm4.encode("\n你好") + [A])
    # the answer: "<|assistant|>get_weather\n{json}" then <|observation|>
    answer = glm4.encode('get_weather\n{"city_name": "北京", "days": 2}')
    msg = parse_response(glm4, answer, TOOLS)
    assert msg["content"] is None and args_of(msg) == ("get_weather", {"city_name": "北京", "days": 2})
    text, streamed = stream(glm4, answer)
    assert text == "" and args_of(streamed) == args_of(msg)
    history = [{"role": "user", "content": "你好"}, msg, {"role": "tool", "tool_call_id": "x", "content": "晴"}]
    ids = glm4.apply_chat_template(history)
    arguments = msg["tool_calls"][0]["function"]["arguments"]
    assert ids == ([GLM4_N + 2, GLM4_N + 4, U] + glm4.encode("\n你好") + [A] + glm4.encode("get_weather\n" + arguments)
                   + [O] + glm4.encode("\n晴") + [A])


def test_glm4_plain_answer_streams(glm4):
    answer = glm4.encode("\n你好 hello world\n\n")
    text, msg = stream(glm4, answer)
    assert text == "你好 hello world" == msg["content"] and "tool_calls" not in msg


@pytest.mark.parametrize("name,body,why", [
    ("get_weather", '{"city_name": "北京"', "not valid JSON"),
    ("get_weather", '["北京"]', "must be a JSON object"),
    ("get_weather", "北京", "not valid JSON"),
])
def test_glm4_malformed_answers(glm4, name, body, why):
    err = parse_tool_call("glm4", name, body, TOOLS)
    assert why in err["error"] and err["name"] == name
    msg = parse_response(glm4, glm4.encode(f"{name}\n{body}"), TOOLS)
    assert msg["error"]["type"] == "tool_call_parse_error" and "tool_calls" not in msg
    assert msg["content"] == f"{name}\n{body}"


def test_glm4_first_line_that_names_no_tool_is_text(glm4):
    # as GLM-4's own server decides: a call only when the first line names one of the tools
    assert "not among the tools" in parse_tool_call("glm4", "send_email", '{"to": "x"}', TOOLS)["error"]
    text, msg = stream(glm4, glm4.encode('send_email\n{"to": "x"}'))
    assert msg == {"role": "assistant", "content": 'send_email\n{"to": "x"}'} and text == msg["content"]
    text, msg = stream(glm4, glm4.encode("hello world"), tools=None)  # no metadata line at all
    assert text == msg["content"] == "hello world"


def test_chatglm3_tools_described_by_hand(glm3):
    """Tools written into a system prompt by hand (no `tools=`): the <|observation|> stop marks the call."""
    answer = glm3.encode("get_weather\n") + glm3.encode("```python\ntool_call(city_name='x')\n```")
    text, msg = stream(glm3, answer, tools=None)
    assert "tool_calls" not in msg and text == msg["content"] == "get_weather\n ```python\ntool_call(city_name='x')\n```"
    msg = parse_response(glm3, answer + [glm3.special_ids["<|observation|>"]])
    assert args_of(msg) == ("get_weather", {"city_name": "x"}) and msg["content"] == text


def test_bad_tools_argument(glm4):
    with pytest.raises(ValueError, match=r"tools\[0\]"):
        glm4.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"type": "function", "function": {}}])
    with pytest.raises(ValueError, match="only 'function'"):
        glm4.apply_chat_template([{"role": "user", "content": "x"}], tools=[{"type": "retrieval"}])
    with pytest.raises(ValueError, match="arguments are not valid JSON"):
        glm4.apply_chat_template([{"role": "assistant", "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}])


def test_chatglm3_tools_with_the_real_tokenizer(tmp_path):
    from conftest import need_reference

    src = need_reference("tokenizers/chatglm3/tokenizer.model")
    shutil.copy(src, tmp_path / "tokenizer.model")
    tok = lowvram.load_tokenizer(tmp_path, chat_format="chatglm3")
    # chatglm.cpp's published answer for its random-number tool, as ids of the real tokenizer
    answer = tok.encode("random_number_generator\n") + tok.encode("```python\ntool_call(seed=42, range=(0, 100))\n```")
    msg = parse_response(tok, answer + [64797])  # it stops on <|observation|>
    assert args_of(msg) == ("random_number_generator", {"seed": 42, "range": [0, 100]})


class Scripted:
    """Stands in for a model that answers with fixed ids, to drive ChatStream through a tool call
    (generation itself is tested on real tiny models in test_tok_chat_api.py)."""

    def __init__(self, tok, answer):
        self.tokenizer, self.answer, self.ctx, self.path = tok, answer, 4096, None

    def stream_generate(self, ids, max_new_tokens, stop_token_ids, **kw):
        def gen():
            for i in self.answer[:max_new_tokens]:
                if i in stop_token_ids:
                    return
                yield i

        return gen()


def test_tool_call_through_the_chat_api(glm4, glm3):
    from lowvram.chat import chat, chat_completion, stream_chat

    obs = glm4.special_ids["<|observation|>"]
    model = Scripted(glm4, glm4.encode('get_weather\n{"city_name": "北京"}') + [obs, 1, 2, 3])
    msg = chat_completion(model, [{"role": "user", "content": "北京天气"}], tools=TOOLS)
    assert msg["content"] is None and args_of(msg) == ("get_weather", {"city_name": "北京"})
    s = stream_chat(model, "北京天气", tools=TOOLS)
    assert list(s) == [] and s.finish_reason == "tool_calls" and s.ended_on_observation
    assert s.usage["completion_tokens"] == len(model.answer) - 4  # stops at <|observation|>
    response, history = chat(model, "北京天气", tools=TOOLS)
    assert response == {"name": "get_weather", "arguments": {"city_name": "北京"}}
    assert history[-1]["tool_calls"][0]["function"]["name"] == "get_weather"
    # a malformed call: an error object, no exception
    model = Scripted(glm4, glm4.encode('get_weather\n{"city_name": 北京}') + [obs])
    response, history = chat(model, "北京天气", tools=TOOLS)
    assert response["type"] == "tool_call_parse_error" and "not valid JSON" in response["message"]
    s = stream_chat(model, "北京天气", tools=TOOLS)  # held back while it looked like a call, shown at the end
    assert "".join(s) == s.message["content"] == 'get_weather\n{"city_name": 北京}'
    assert s.finish_reason == "stop"
    # ChatGLM3: text, then its code interpreter
    a3 = glm3.special_ids["<|assistant|>"]
    model = Scripted(glm3, glm3.encode("\n我来算一下。") + [a3] + glm3.encode("interpreter\n```python\nprint(2 ** 10)\n```")
                     + [glm3.special_ids["<|observation|>"]])
    s = stream_chat(model, "2 的 10 次方")
    assert "".join(s) == "我来算一下。" == s.message["content"]
    code = {"code": "print(2 ** 10)"}  # ChatGLM3's original calls the arguments "parameters": both are there
    assert s.finish_reason == "tool_calls" and s.response == {"name": "interpreter", "arguments": code, "parameters": code}


def test_tools_on_a_system_message_the_thudm_way(glm4, glm3):
    """THUDM's demos put the tools on the system message (ChatGLM3's README, GLM-4's API server) instead of
    passing `tools=`: ChatGLM3's build_chat_input appends them, as given, to the system text; GLM-4's template
    renders its tools block there. Either way the model sees them and its calls are parsed."""
    from lowvram.chat import stream_chat

    sys3 = {"role": "system", "content": "Answer the following questions as best as you can. You have access to the "
            "following tools:", "tools": [WEATHER]}
    got = glm3.apply_chat_template([sys3, {"role": "user", "content": "北京天气"}])
    want = ([glm3.token_id("[gMASK]"), glm3.token_id("sop"), glm3.special_ids["<|system|>"]] + glm3.encode("\n")
            + glm3.encode(sys3["content"] + "\n" + json.dumps([WEATHER], indent=4, ensure_ascii=False))
            + [glm3.special_ids["<|user|>"]] + glm3.encode("\n") + glm3.encode("北京天气") + [glm3.special_ids["<|assistant|>"]])
    assert got == want
    for tok, sys_msg in ((glm4, {"role": "system", "content": None, "tools": TOOLS}), (glm3, sys3)):
        by_arg = tok.apply_chat_template([{"role": "user", "content": "x"}], tools=TOOLS)
        if tok is glm4:  # the same prompt as tools=
            assert tok.apply_chat_template([sys_msg, {"role": "user", "content": "x"}]) == by_arg
        body = 'get_weather\n{"city_name": "北京"}' if tok is glm4 else "get_weather\n```python\ntool_call(city_name='北京')\n```"
        answer = tok.encode(body) if tok is glm4 else tok.encode("get_weather\n") + tok.encode(body.split("\n", 1)[1])
        s = stream_chat(Scripted(tok, answer + [tok.special_ids["<|observation|>"]]), [sys_msg, {"role": "user", "content": "北京天气"}])
        s.run()
        assert s.finish_reason == "tool_calls" and s.response["arguments"] == {"city_name": "北京"}
    with pytest.raises(ValueError, match=r"messages\[0\]: only system messages carry tools"):
        glm4.apply_chat_template([{"role": "user", "content": "x", "tools": TOOLS}])
