"""GLM-4 tokenizer (tiktoken rank file) on a small rank file in the original format.

Expected ids are worked out by hand from the rank file in tok_files (byte b has rank b; merges
follow) with the BPE rule and the GLM-4 split pattern, not taken from lowvram.
"""

import json

import pytest

import lowvram
from lowvram.tokenizer import GLM4_SPECIALS, TokenizerError, load_tokenizer
from tok_files import GLM4_N, rank_of, write_glm4_tokenizer

N = GLM4_N
GMASK, SOP, SYSTEM, USER, ASSISTANT, OBSERVATION = N + 2, N + 4, N + 6, N + 7, N + 8, N + 9
NL = ord("\n")
NIHAO = rank_of("你好".encode())


@pytest.fixture
def tok(tmp_path):
    return lowvram.load_tokenizer(write_glm4_tokenizer(tmp_path / "glm4"))


def test_bpe_by_hand(tok):
    # "hello": he(256) -> ll(257) -> llo(258) -> hello(259); " world": " w", "or", " wor", "ld", " world"
    assert tok.encode("hello world") == [rank_of(b"hello"), rank_of(b" world")]
    assert tok.encode("你好") == [NIHAO]
    assert tok.encode("你") == [rank_of("你".encode())]
    # byte fallback: no merges for these, so one id per UTF-8 byte
    assert tok.encode("é👋") == list("é👋".encode())
    assert tok.decode(tok.encode("é👋 hello 你好")) == "é👋 hello 你好"


def test_split_pattern(tok):
    # \p{N}{1,3}: "33333" splits as "333" + "33"; BPE merges the leftmost "33" first in "333"
    assert tok.encode("33333") == [rank_of(b"33"), ord("3"), rank_of(b"33")]
    # \s*[\r\n]+ keeps "\n\n" together (one merge), letters split from it
    assert tok.encode("a\n\nb") == [ord("a"), rank_of(b"\n\n"), ord("b")]
    # "\s+(?!\S)" leaves the last space of a run to the word: "x  hello" -> "x", " ", " hello";
    # " hello" has no merge of its own: " " + (he, ll, o -> he, llo -> hello)
    assert tok.encode("x  hello") == [ord("x"), ord(" "), ord(" "), rank_of(b"hello")]


def test_specials(tok):
    assert tok.special_ids == {t: N + i for i, t in enumerate(GLM4_SPECIALS)}
    assert tok.special_ids["<|end_of_video|>"] == N + 13 and tok.vocab_size == N + 14
    assert sorted(tok.stop_ids) == [N, USER, OBSERVATION]  # <|endoftext|>, <|user|>, <|observation|>
    assert tok.encode_prompt("你好") == [GMASK, SOP, NIHAO]
    assert tok.encode("<|user|>") == list(b"<|user|>")  # special strings in text stay text
    assert tok.decode([GMASK, SOP, USER, NL, NIHAO, ASSISTANT]) == "\n你好"
    assert tok.decode([USER, NL, NIHAO, ASSISTANT], skip_special_tokens=False) == "<|user|>\n你好<|assistant|>"
    assert tok.decode([NIHAO, N + 20, N + 100]) == "你好"  # the embedding's padding rows have no text


def test_added_tokens_decoder_is_trusted(tmp_path):
    added = {str(N + i): {"content": t, "special": True} for i, t in enumerate(GLM4_SPECIALS)}
    added[str(N + 20)] = added.pop(str(N + 7))  # <|user|> declared elsewhere
    tok = load_tokenizer(write_glm4_tokenizer(tmp_path / "g", added))
    assert tok.special_ids["<|user|>"] == N + 20
    assert tok.apply_chat_template([{"role": "user", "content": "你好"}]) == [GMASK, SOP, N + 20, NL, NIHAO, ASSISTANT]


def test_chat_template(tok):
    assert tok.apply_chat_template([{"role": "user", "content": "你好"}]) == [GMASK, SOP, USER, NL, NIHAO, ASSISTANT]
    msgs = [{"role": "system", "content": "hello"}, {"role": "user", "content": "你好"},
            {"role": "assistant", "content": "hello world"}, {"role": "user", "content": "你"}]
    assert tok.apply_chat_template(msgs) == [
        GMASK, SOP, SYSTEM, NL, rank_of(b"hello"), USER, NL, NIHAO, ASSISTANT, NL, rank_of(b"hello"),
        rank_of(b" world"), USER, NL, rank_of("你".encode()), ASSISTANT]
    assert tok.apply_chat_template(msgs[:3], add_generation_prompt=False)[-1] == rank_of(b" world")
    # "<|role|>{metadata}\n{content}" is one text: "\n\n" + content merges across the metadata newline
    ids = tok.apply_chat_template([{"role": "observation", "content": "\nhello"}], add_generation_prompt=False)
    assert ids == [GMASK, SOP, OBSERVATION, rank_of(b"\n\n"), rank_of(b"hello")]


def test_stream_decoder_holds_partial_characters(tok):
    ids = tok.encode("a👋你好é")
    dec = tok.stream_decoder()
    deltas = [dec.push(i) for i in ids]
    assert deltas == ["a", "", "", "", "👋", "你好", "", "é"]
    assert dec.flush() == ""
    # an invalid byte at the very end comes out as U+FFFD on flush, as decode() renders it
    dec = tok.stream_decoder()
    assert [dec.push(i) for i in [ord("a"), 0xE4]] == ["a", ""]
    assert dec.flush() == "\ufffd" and tok.decode([ord("a"), 0xE4]) == "a\ufffd"


def test_bad_rank_file(tmp_path):
    d = write_glm4_tokenizer(tmp_path / "bad")
    text = (d / "tokenizer.model").read_text().splitlines()
    text[3] = "!!notbase64 3"
    (d / "tokenizer.model").write_text("\n".join(text))
    # the first line still looks like a rank file, so it is read as one and the bad line is named
    with pytest.raises(TokenizerError, match=r"tokenizer.model:4: expected 'base64\(token\) rank'"):
        load_tokenizer(d)


def test_tokenizer_json_layout(tmp_path):
    """glm / glm4 (transformers-native) checkpoints: tokenizer.json via the `tokenizers` package."""
    d = tmp_path / "hf"
    _hf_tokenizer(d, model_type="glm")  # a byte-level BPE with no merges plus the GLM-4 specials as added tokens
    tok = load_tokenizer(d)
    assert tok.chat_format == "glm4" and tok.stop_ids == [256, 263, 265]
    user, asst = tok.special_ids["<|user|>"], tok.special_ids["<|assistant|>"]
    ids = tok.apply_chat_template([{"role": "user", "content": "hi 你好"}])
    assert ids[:3] == [tok.special_ids["[gMASK]"], tok.special_ids["<sop>"], user] and ids[-1] == asst
    assert tok.decode(ids) == "\nhi 你好"
    assert user not in tok.encode("say <|user|> please")
    assert tok.decode(tok.encode("say <|user|> please")) == "say <|user|> please"


# A chat template in the style of GLM-4-0414's (written for this test): system messages first, tools at the top
# through tojson, "<think>" after the assistant token, assistant metadata for tool calls.
TEMPLATE_0414 = """[gMASK]<sop>
{%- if tools -%}
<|system|>
# tools
{%- for tool in tools %}
{%- set fn = tool.function if tool.get("function") else tool %}

## {{ fn.name }}
{{ fn | tojson(indent=2, ensure_ascii=False) }}
{%- endfor %}
{%- endif -%}
{%- for m in messages if m.role == 'system' %}<|system|>
{{ m.content }}{%- endfor %}
{%- for m in messages if m.role != 'system' %}<|{{ m.role }}|>{{ m.get('metadata', '') }}
{{ m.content }}{%- endfor %}
{% if add_generation_prompt %}<|assistant|>
<think>{% endif %}"""
# glm-4-9b-chat's kind: tools only from a system message's own `tools`
TEMPLATE_ITEM_TOOLS = ("[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\nT:"
                       "{% for t in item['tools'] %}{{ t['function']['name'] }};{% endfor %}{% endif %}"
                       "{% if item['content'] %}<|{{ item['role'] }}|>\n{{ item['content'] }}{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _hf_tokenizer(d, template=None, model_type="glm4"):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    t = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(list(GLM4_SPECIALS))
    d.mkdir()
    t.save(str(d / "tokenizer.json"))
    (d / "config.json").write_text(json.dumps({"model_type": model_type, "eos_token_id": [256, 263, 265]}))
    if template is not None:
        (d / "chat_template.jinja").write_text(template)
    return t


def test_a_checkpoints_own_chat_template_is_used(tmp_path):
    """transformers-format checkpoints (glm-4-9b-chat-hf, the GLM-4-0414 family) prompt as their chat template
    says: the ids are those of the rendered text, special tokens included, as transformers encodes it."""
    raw = _hf_tokenizer(tmp_path / "t", TEMPLATE_0414)
    tok = load_tokenizer(tmp_path / "t")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"城市": "string"}}}]
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "system", "content": "Be brief."}, {"role": "user", "content": "天气?"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"城市": "北京"}'}}]},
            {"role": "tool", "content": "晴"}]
    fn = json.dumps(tools[0]["function"], indent=2, ensure_ascii=False)
    want = ("[gMASK]<sop><|system|>\n# tools\n## get_weather\n" + fn + "<|system|>\nBe brief.<|user|>\nhi"
            "<|assistant|>\nyo<|user|>\n天气?<|assistant|>get_weather\n{\"城市\": \"北京\"}<|observation|>\n晴"
            "<|assistant|>\n<think>")
    assert tok.apply_chat_template(msgs, tools=tools) == raw.encode(want, add_special_tokens=False).ids
    # tools on a system message reach a top-level template too; a format asked for by name bypasses the template
    sys_tools = [{"role": "system", "content": "Be brief.", "tools": tools}, {"role": "user", "content": "x"}]
    assert tok.decode(tok.apply_chat_template(sys_tools), skip_special_tokens=False).startswith(
        "[gMASK]<sop><|system|>\n# tools\n## get_weather")
    assert load_tokenizer(tmp_path / "t", chat_format="glm4").template is None


def test_tools_reach_a_template_that_reads_them_from_a_system_message(tmp_path):
    raw = _hf_tokenizer(tmp_path / "t", TEMPLATE_ITEM_TOOLS)
    tok = load_tokenizer(tmp_path / "t")
    tools = [{"type": "function", "function": {"name": "f"}}]
    want = "[gMASK]<sop><|system|>\nT:f;<|user|>\nx<|assistant|>"
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], tools=tools) == raw.encode(want).ids


def test_a_template_this_renderer_cannot_run_falls_back_with_a_warning(tmp_path):
    _hf_tokenizer(tmp_path / "t", "{{ messages | no_such_filter }}")
    tok = load_tokenizer(tmp_path / "t")
    with pytest.warns(UserWarning, match="chat template failed"):
        ids = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert ids[:3] == [tok.special_ids["[gMASK]"], tok.special_ids["<sop>"], tok.special_ids["<|user|>"]]
