"""ChatGLM2/3 tokenizer against the real tokenizer.model in ../shared/reference.

Expected ids are those of the original tokenizers as published (GLM_FACTS §4, and the tokenizer
test cases chatglm.cpp checks against the original THUDM tokenizers); where a case is new, the
ids are composed from the sentencepiece model itself following the documented rule, never from
lowvram's output.
"""

import json
import shutil

import pytest

import lowvram
from conftest import need_reference
from lowvram.tokenizer import TokenizerNotFound, load_tokenizer

GMASK, SOP = 64790, 64792
SYSTEM, USER, ASSISTANT, OBSERVATION = 64794, 64795, 64796, 64797


@pytest.fixture(scope="module")
def sp_file():
    return need_reference("tokenizers/chatglm3/tokenizer.model")


@pytest.fixture(scope="module")
def sp(sp_file):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(sp_file))


def make_dir(tmp_path, sp_file, name="ckpt", config=None, tok_config=None):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(sp_file, d / "tokenizer.model")
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    if tok_config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(tok_config))
    return d


@pytest.fixture
def glm3(tmp_path, sp_file):
    return lowvram.load_tokenizer(make_dir(tmp_path, sp_file, "glm3", {"_name_or_path": "THUDM/chatglm3-6b"}))


@pytest.fixture
def glm2(tmp_path, sp_file):
    return lowvram.load_tokenizer(make_dir(tmp_path, sp_file, "glm2", {"_name_or_path": "THUDM/chatglm2-6b"}))


# (text, ids of encode_prompt = [gMASK, sop] + sp ids), published for ChatGLM2/3
PUBLISHED = [
    ("你好", [64790, 64792, 36474, 54591]),
    ("[Round 1]\n\n问：你好\n\n答：",
     [64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13, 13, 55437, 31211]),
    ("def main():\n    print('hello world')\t# greeting",
     [64790, 64792, 884, 1301, 9427, 13, 296, 4466, 2029, 15616, 30914, 993, 3387, 12, 31010, 30174]),
]
# (CodeGeeX2 ships its own tokenizer.model, without the dummy-prefix space: not this file.)


@pytest.mark.parametrize("text,ids", PUBLISHED)
def test_published_encodings(glm3, text, ids):
    assert glm3.encode_prompt(text) == ids
    assert glm3.encode(text) == ids[2:]
    assert glm3.decode(ids) == text


def test_plain_chinese_emoji_and_code_round_trip(glm3, sp):
    for text in ["Hello, world! The quick brown fox.", "晚上睡不着应该怎么办", "你好👋！🦙🚀 ok",
                 "class A:\n\tdef f(self):\n\t\treturn  1   # two and three spaces\n"]:
        ids = glm3.encode(text)
        assert ids == sp.encode(text)  # no special tokens, nothing added
        assert glm3.decode(ids) == text
    # the emoji is not a piece: byte fallback, four byte pieces (published: 243 162 148 142)
    assert glm3.encode("👋")[-4:] == [243, 162, 148, 142]


def test_special_ids_and_stops(glm3, glm2):
    assert glm3.vocab_size == 64798 and glm2.vocab_size == 64794
    assert glm3.special_ids["[gMASK]"] == GMASK and glm3.special_ids["sop"] == SOP
    assert [glm3.special_ids[t] for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")] == \
        [SYSTEM, USER, ASSISTANT, OBSERVATION]
    assert sorted(glm3.stop_ids) == [2, USER, OBSERVATION]
    assert glm2.stop_ids == [2] and "<|user|>" not in glm2.special_ids
    # role-token strings typed by a user stay text
    assert USER not in glm3.encode("<|user|>")
    assert glm3.decode([GMASK, SOP, USER, 30910, 13, 36474, 54591, ASSISTANT]) == "\n 你好"
    assert glm3.decode([USER, 36474, 54591, ASSISTANT], skip_special_tokens=False) == "<|user|>你好<|assistant|>"
    assert glm3.decode([36474, 64900, 54591, 65023]) == "你好"  # padding rows of the 65024 embedding: no text


def test_chatglm3_single_and_multi_turn(glm3):
    assert glm3.apply_chat_template([{"role": "user", "content": "你好"}]) == \
        [64790, 64792, 64795, 30910, 13, 36474, 54591, 64796]  # GLM_FACTS §4
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好👋！我是人工智能助手 ChatGLM3-6B，很高兴见到你，欢迎问我任何问题。"},
        {"role": "user", "content": "晚上睡不着应该怎么办"},
    ]
    assert glm3.apply_chat_template(messages) == [
        64790, 64792, 64795, 30910, 13, 36474, 54591, 64796, 30910, 13, 36474, 54591, 243, 162, 148, 142, 31404,
        33030, 34797, 42481, 22011, 10461, 30944, 30966, 30941, 30978, 30949, 31123, 48895, 35214, 54622, 31123,
        32616, 39905, 31901, 31639, 31155, 64795, 30910, 13, 30910, 32820, 54266, 31876, 35153, 64796]
    assert glm3.apply_chat_template(messages, add_generation_prompt=False)[-1] == 35153


def test_chatglm2_multi_turn_round_prompt(glm2):
    messages = [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好👋！我是人工智能助手 ChatGLM2-6B，很高兴见到你，欢迎问我任何问题。"},
        {"role": "user", "content": "晚上睡不着应该怎么办"},
    ]
    assert glm2.apply_chat_template(messages) == [
        64790, 64792, 790, 30951, 517, 30910, 30939, 30996, 13, 13, 54761, 31211, 39701, 13, 13, 55437, 31211,
        39701, 243, 162, 148, 142, 31404, 33030, 34797, 42481, 22011, 10461, 30944, 30943, 30941, 30978, 30949,
        31123, 48895, 35214, 54622, 31123, 32616, 39905, 31901, 31639, 31155, 13, 13, 30995, 30951, 517, 30910,
        30943, 30996, 13, 13, 54761, 31211, 32820, 54266, 31876, 35153, 13, 13, 55437, 31211]
    assert glm2.apply_chat_template(messages[:1]) == PUBLISHED[1][1]  # one turn is still [Round 1]


# The ChatGLM3 tool-calling system prompt chatglm.cpp tests against the original tokenizer: the
# documented preamble + "\n" + the tools as indented JSON (this one in the early dict-of-tools form).
CPP_TOOLS = {
    "random_number_generator": {
        "name": "random_number_generator",
        "description": "Generates a random number x, s.t. range[0] <= x < range[1]",
        "params": [
            {"name": "seed", "description": "The random seed used by the generator", "type": "int", "required": True},
            {"name": "range", "description": "The range of the generated numbers", "type": "tuple[int, int]",
             "required": True},
        ],
    },
    "get_weather": {
        "name": "get_weather",
        "description": "Get the current weather for `city_name`",
        "params": [{"name": "city_name", "description": "The name of the city to be queried", "type": "str",
                    "required": True}],
    },
}
CPP_TOOLS_IDS = [
    64790, 64792, 64794, 30910, 13, 20115, 267, 1762, 2554, 362, 1077, 362, 344, 457, 30930, 809, 431, 1675, 289,
    267, 1762, 4159, 30954, 13, 30982, 13, 296, 30955, 16599, 30962, 11228, 30962, 7311, 1306, 2932, 729, 13, 352,
    30955, 2323, 2932, 449, 16599, 30962, 11228, 30962, 7311, 1306, 1252, 13, 352, 30955, 16302, 2932, 449, 9398,
    711, 260, 5402, 1276, 1994, 30932, 268, 30930, 30912, 30930, 2288, 30995, 30940, 30996, 14819, 1994, 906, 2288,
    30995, 30939, 30996, 1252, 13, 352, 30955, 12209, 2932, 790, 13, 753, 30982, 13, 647, 30955, 2323, 2932, 449,
    24794, 1252, 13, 647, 30955, 16302, 2932, 449, 1036, 5402, 9352, 1050, 422, 267, 17009, 1252, 13, 647, 30955,
    3543, 2932, 449, 592, 1252, 13, 647, 30955, 20379, 2932, 2033, 13, 753, 4143, 13, 753, 30982, 13, 647, 30955,
    2323, 2932, 449, 7855, 1252, 13, 647, 30955, 16302, 2932, 449, 1036, 2288, 290, 267, 7383, 3859, 1252, 13, 647,
    30955, 3543, 2932, 449, 30912, 16471, 30995, 592, 30932, 558, 30996, 1252, 13, 647, 30955, 20379, 2932, 2033,
    13, 753, 30983, 13, 352, 30996, 13, 296, 4143, 13, 296, 30955, 752, 30962, 27564, 2932, 729, 13, 352, 30955,
    2323, 2932, 449, 752, 30962, 27564, 1252, 13, 352, 30955, 16302, 2932, 449, 4867, 267, 1465, 5100, 332, 4256,
    17654, 30962, 2323, 31040, 1252, 13, 352, 30955, 12209, 2932, 790, 13, 753, 30982, 13, 647, 30955, 2323, 2932,
    449, 17654, 30962, 2323, 1252, 13, 647, 30955, 16302, 2932, 449, 1036, 1462, 290, 267, 1911, 289, 330, 580,
    266, 819, 1252, 13, 647, 30955, 3543, 2932, 449, 2069, 1252, 13, 647, 30955, 20379, 2932, 2033, 13, 753,
    30983, 13, 352, 30996, 13, 296, 30983, 13, 30983, 64795, 30910, 13, 30910, 36454, 31623, 37853, 54744, 64796]


def test_chatglm3_system_prompt_with_tools_published(glm3):
    system = ("Answer the following questions as best as you can. You have access to the following tools:\n"
              + json.dumps(CPP_TOOLS, indent=4, ensure_ascii=False))
    ids = glm3.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": "生成一个随机数"}])
    assert ids == CPP_TOOLS_IDS


def test_chatglm3_openai_tools_rendered_like_the_tool_demo(glm3, sp):
    fn = {"name": "get_weather", "description": "Get the current weather for `city_name`",
          "parameters": {"type": "object", "properties": {"city_name": {"type": "string", "description": "城市"}},
                         "required": ["city_name"]}}
    ids = glm3.apply_chat_template([{"role": "user", "content": "北京天气"}],
                                   tools=[{"type": "function", "function": fn}])
    # ChatGLM3's tool demo: system content = preamble, tools = list of functions; the tokenizer
    # appends "\n" + json.dumps(tools, indent=4, ensure_ascii=False) to the content.
    system = ("Answer the following questions as best as you can. You have access to the following tools:\n"
              + json.dumps([fn], indent=4, ensure_ascii=False))
    expected = ([GMASK, SOP, SYSTEM] + sp.encode("\n") + sp.encode(system) + [USER] + sp.encode("\n")
                + sp.encode("北京天气") + [ASSISTANT])
    assert ids == expected


def test_observation_and_metadata(glm3, sp):
    ids = glm3.apply_chat_template([
        {"role": "user", "content": "列出100以内的所有质数"},
        {"role": "assistant", "metadata": "interpreter", "content": "```python\nprint(2)\n```"},
        {"role": "tool", "content": "[2]"},
    ])
    assert ids == ([GMASK, SOP, USER] + sp.encode("\n") + sp.encode("列出100以内的所有质数") + [ASSISTANT]
                   + sp.encode("interpreter\n") + sp.encode("```python\nprint(2)\n```") + [OBSERVATION]
                   + sp.encode("\n") + sp.encode("[2]") + [ASSISTANT])


def test_stream_decoder_never_splits_utf8(glm3):
    text = "你好👋！我是人工智能助手 ChatGLM3-6B 🦙"
    ids = glm3.encode(text)
    dec = glm3.stream_decoder()
    deltas = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(deltas) == glm3.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    # the four byte pieces of 👋: nothing comes out until the last one
    i = ids.index(243)
    assert deltas[i:i + 3] == ["", "", ""] and deltas[i + 3].startswith("👋")


# ---- ChatGLM2 vs ChatGLM3 from the checkpoint's own metadata ---------------------------------


def test_detection_from_metadata(tmp_path, sp_file):
    def fmt(name, **kw):
        return load_tokenizer(make_dir(tmp_path, sp_file, name, **kw)).chat_format

    assert fmt("a", config={"_name_or_path": "THUDM/chatglm2-6b"}) == "chatglm2"
    assert fmt("b", config={"_name_or_path": "THUDM/codegeex2-6b"}) == "chatglm2"
    assert fmt("c", tok_config={"name_or_path": "THUDM/chatglm3-6b-32k"}) == "chatglm3"
    assert fmt("d", tok_config={"added_tokens_decoder": {"64795": {"content": "<|user|>"}}}) == "chatglm3"
    assert fmt("e", tok_config={"chat_template": "{% for m in messages %}...{% endfor %}"}) == "chatglm3"
    d = make_dir(tmp_path, sp_file, "f")
    (d / "tokenization_chatglm.py").write_text('prompt += "[Round {}]\\n\\n问：{}\\n\\n答：".format(i, q)\n')
    assert load_tokenizer(d).chat_format == "chatglm2"
    d = make_dir(tmp_path, sp_file, "g")
    (d / "tokenization_chatglm.py").write_text('role_special_tokens = ["<|system|>", "<|user|>", "<|observation|>"]')
    assert load_tokenizer(d).chat_format == "chatglm3"
    undecided = load_tokenizer(make_dir(tmp_path, sp_file, "h", config={"_name_or_path": "/data/mymodel"}))
    assert undecided.chat_format == "chatglm3" and "default" in undecided.format_reason
    override = load_tokenizer(make_dir(tmp_path, sp_file, "i", config={"_name_or_path": "THUDM/chatglm3-6b"}),
                              chat_format="chatglm2")
    assert override.chat_format == "chatglm2"
    with pytest.raises(ValueError, match="chat_format='glm4'"):
        load_tokenizer(make_dir(tmp_path, sp_file, "j"), chat_format="glm4")
    with pytest.raises(ValueError, match="expected one of"):
        load_tokenizer(make_dir(tmp_path, sp_file, "k"), chat_format="chatglm5")


def test_model_generation_follows_tokenizer(tiny, sp_file):
    path = tiny("chatglm3-6b", padded_vocab_size=64798)
    shutil.copy(sp_file, path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({"name_or_path": "THUDM/chatglm3-6b"}))
    model = lowvram.load(path)
    assert model.tokenizer.chat_format == "chatglm3" and model.config.generation == "chatglm3-6b"
    model2 = lowvram.load(path, chat_format="chatglm2")
    assert model2.tokenizer.chat_format == "chatglm2" and model2.config.generation == "chatglm2-6b"


def test_no_tokenizer_files(tmp_path, tiny):
    with pytest.raises(TokenizerNotFound, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    model = lowvram.load(tiny("chatglm2-6b"))
    assert model.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer"):
        model.chat("你好")


def test_corrupt_model_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model"):
        load_tokenizer(tmp_path)
