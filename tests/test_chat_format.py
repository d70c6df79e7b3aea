"""Chat formats: message validation, what each format can and cannot express, streamed answer assembly."""

import json

import pytest

import lowvram
from lowvram.chat import _Answer, assemble, normalize, tools_system_prompt
from tok_files import GLM4_N, rank_of, write_glm4_tokenizer

N = GLM4_N
GMASK, SOP, SYSTEM, USER, ASSISTANT, OBSERVATION = N + 2, N + 4, N + 6, N + 7, N + 8, N + 9
NL = ord("\n")


@pytest.fixture(scope="module")
def glm4(tmp_path_factory):
    return lowvram.load_tokenizer(write_glm4_tokenizer(tmp_path_factory.mktemp("glm4")))


def test_normalize():
    msgs = normalize([{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                          {"type": "text", "text": "b"}]},
                      {"role": "tool", "content": "r"}, {"role": "function", "content": "r2"},
                      {"role": "assistant", "content": None, "metadata": "m"}])
    assert [m["role"] for m in msgs] == ["system", "user", "observation", "observation", "assistant"]
    assert msgs[1]["content"] == "ab" and msgs[4] == {"role": "assistant", "content": "", "metadata": "m"}
    with pytest.raises(ValueError, match=r"messages\[0\]: content part of type 'image_url' is not supported"):
        normalize([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match=r"messages\[1\]: expected a dict with 'role'"):
        normalize([{"role": "user", "content": "a"}, "b"])
    with pytest.raises(ValueError, match="messages must be a list"):
        normalize("hello")
    with pytest.raises(ValueError, match=r"messages\[0\]: only assistant messages carry tool_calls"):
        normalize([{"role": "user", "content": "a", "tool_calls": [{"function": {"name": "f"}}]}])
    with pytest.raises(ValueError, match=r"messages\[0\]: content must be a string"):
        normalize([{"role": "user", "content": 3}])


def test_glm4_messages(glm4):
    # metadata goes right after the role token; empty messages are skipped like the original template does
    ids = glm4.apply_chat_template([{"role": "system", "content": ""}, {"role": "user", "content": "你好"},
                                    {"role": "assistant", "metadata": "hello", "content": "你"},
                                    {"role": "observation", "content": "hello"}], add_generation_prompt=False)
    assert ids == [GMASK, SOP, USER, NL, rank_of("你好".encode()), ASSISTANT, rank_of(b"hello"), NL,
                   rank_of("你".encode()), OBSERVATION, NL, rank_of(b"hello")]


def test_glm4_tools_prompt_keeps_the_users_system_message(glm4):
    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {}}}]
    ids = glm4.apply_chat_template([{"role": "system", "content": "hello"}, {"role": "user", "content": "你"}],
                                   tools=tools)
    head = [GMASK, SOP, SYSTEM] + glm4.encode("\n" + tools_system_prompt("glm4", tools))
    assert ids[:len(head)] == head
    assert ids[len(head):] == [SYSTEM, NL, rank_of(b"hello"), USER, NL, rank_of("你".encode()), ASSISTANT]
    text = tools_system_prompt("glm4", tools)
    assert text.endswith("## f\n\n" + json.dumps(tools[0]["function"], indent=4, ensure_ascii=False)
                         + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。")
    # bare function dicts are accepted too
    assert tools_system_prompt("glm4", [tools[0]["function"]]) == text


def test_answer_assembly_streams_what_it_returns(glm4):
    A = ASSISTANT
    cases = [
        glm4.encode("\n  hello world  \n\n"),  # surrounding whitespace is stripped, as the originals do
        glm4.encode("\nhello") + [A] + glm4.encode("\n你好"),  # two text segments join with a newline
        glm4.encode("\n\n\n"),  # nothing but whitespace
        glm4.encode("hello world"),  # no metadata line at all
        glm4.encode("\n你") + [0xE4],  # an invalid byte at the very end
    ]
    for ids in cases:
        ans = _Answer(glm4)
        deltas = [ans.push(i) for i in ids] + [ans.finish()]
        msg = assemble(glm4, ans.done)
        assert "".join(deltas) == msg["content"], ids
        assert not any(d.endswith(" ") for d in deltas[:-1])  # trailing whitespace waits
    assert msg["content"] == "你\ufffd"


def test_chatglm2_cannot_express(tmp_path):
    from tok_files import train_glm1_model

    train_glm1_model(tmp_path / "tokenizer.model")
    tok = lowvram.load_tokenizer(tmp_path, chat_format="chatglm2")
    with pytest.raises(ValueError, match=r"messages\[0\]: the ChatGLM2 chat format \(chatglm2\) has no system role"):
        tok.apply_chat_template([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}])
    with pytest.raises(ValueError, match="pass chat_format='chatglm3'"):
        tok.apply_chat_template([{"role": "user", "content": "y"}],
                                tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(ValueError, match="messages is empty"):
        tok.apply_chat_template([])
    # a finished conversation renders without the trailing 答：
    prompt = tok.decode(tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant",
                                                                                   "content": "b"}],
                                                add_generation_prompt=False))
    assert prompt == "[Round 1]\n\n问：a\n\n答：b\n\n"
    # chatglm3 on the same file: role tokens numbered after the pieces
    tok3 = lowvram.load_tokenizer(tmp_path, chat_format="chatglm3")
    n = tok3.sp.GetPieceSize()
    assert [tok3.special_ids[t] for t in ("[gMASK]", "sop", "<|system|>", "<|observation|>")] == \
        [n + 1, n + 3, n + 5, n + 8]
